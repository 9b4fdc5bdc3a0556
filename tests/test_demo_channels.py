"""`sparselite demo --channels`: its rows in the demo table (the run itself is too long for the suite)."""

from __future__ import annotations

from sparselite import demo_channels


def test_channel_rows_compare_with_the_dense_and_sparse_int8_files():
    summary = {
        "channels": {"accuracy": 0.9012, "bytes": 400_000},
        "bytes": {"int8_dense_tflite": 1_000_000},
        "latency_ms": {"int8": {"median_ms": 2.0}, "int8_channels": {"median_ms": 0.7}},
    }
    text = "\n".join(demo_channels.table_rows(summary))
    assert "90.12%" in text and "400,000" in text and "0.40x" in text and "0.35x" in text
    assert demo_channels.CHANNEL_RECIPE.is_file()
