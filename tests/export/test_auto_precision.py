"""``precision="auto"``: per-layer choice from measured latency and the accuracy budget.

Which layers come out faster depends on the machine, so the tests check what must hold whatever the
timings: a depthwise conv is never made dynamic-range, every layer gets a row with its reason, the file
holds what the table says, parity holds, and the printed precision reproduces the file byte for byte.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ai_edge_litert.schema_py_generated import TensorType
from torch import nn

from sparselite import SparseliteError, export_tflite
from sparselite.export.stages import STAGE_TITLES


class DepthwiseThenLinear(nn.Module):
    """One depthwise conv (no dynamic-range kernel) and two linears (one large enough to gain from it)."""

    def __init__(self) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(1, 1, 3, padding=1, groups=1)  # one channel: a DEPTHWISE_CONV_2D in the file
        self.hidden = nn.Linear(28 * 28, 512)
        self.head = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.hidden(F.relu(self.depthwise(x)).flatten(1))))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return DepthwiseThenLinear().eval()


def test_auto_chooses_per_layer_and_says_why(model, fmnist_heldout, tmp_path):
    from sparselite.tflite.flatbuffer import read_model

    images = fmnist_heldout[0][:128]
    path = tmp_path / "auto.tflite"
    report = export_tflite(model, images[:1], path, verify_data=[images], precision="auto")
    choice = report.precision_choice
    rows = {row["layer"]: row for row in choice["layers"]}
    assert set(rows) == {"depthwise", "hidden", "head"} and choice["file"] == "mixed"  # no ranges: no int8 file
    assert rows["depthwise"]["precision"] == "fp32" and "no dynamic-range kernel" in rows["depthwise"]["reason"]
    for row in rows.values():  # dynamic exactly where it measured faster (alone, or the file whole) within the budget
        assert (row["precision"] == "dynamic_int8") == row["reason"].startswith(("faster", "the file is faster whole"))
        if row["dynamic_vs_fp32"] is not None:
            assert row["fp32_share"] > 0
    assert report.layer_precisions == {layer: row["precision"] for layer, row in rows.items()}
    assert choice["top1_drop"]["mixed"] <= choice["max_accuracy_drop"] == 0.5
    assert choice["measured_in"] == "agreement with the float model"  # no labels given
    assert "the fully int8 file was not tried" in " ".join(choice["notes"])
    # The file holds the table's precisions, and computes what the simulation does.
    subgraph = read_model(path).subgraphs[0]
    int8_weights = [t for t in subgraph.tensors if t.type == TensorType.INT8]
    assert len(int8_weights) == sum(row["precision"] == "dynamic_int8" for row in rows.values())
    assert report.parity.max_logit_diff_lsb < 1e-4 and report.precision == "auto"
    assert "precision auto chose" in report.summary()

    # The choice, given back as an explicit precision, gives the same file without measuring again.
    again = tmp_path / "again.tflite"
    export_tflite(model, images[:1], again, verify_data=[images], precision=choice["precision"])
    assert again.read_bytes() == path.read_bytes()


def test_auto_with_calibration_batches_also_weighs_the_fully_int8_file(model, fmnist_heldout, tmp_path):
    images, labels = fmnist_heldout[0][:128], fmnist_heldout[1][:128]
    report = export_tflite(model, images[:1], tmp_path / "m.tflite", verify_data=[images], verify_labels=[labels],
                           calibration_data=[images[:32]], precision="auto", max_accuracy_drop=5.0)
    choice = report.precision_choice
    assert choice["measured_in"] == "accuracy"  # the labels were given: flips to the right class count for it
    assert set(choice["latency_vs_fp32"]) == {"mixed", "int8"} and set(choice["top1_drop"]) == {"mixed", "int8"}
    if choice["file"] == "int8":  # no slower than the mixed file, and within the budget
        assert choice["latency_vs_fp32"]["int8"] <= choice["latency_vs_fp32"]["mixed"]
        assert report.ranges_calibrated > 0 and report.layer_precisions == {}
    else:
        assert any(note.startswith("the fully int8 file was not taken") for note in choice["notes"])


def test_labels_that_do_not_match_the_batches_are_refused(model, fmnist_heldout, tmp_path):
    images = fmnist_heldout[0][:64]
    with pytest.raises(SparseliteError, match="verify_labels has 10 labels for 64 verification examples"):
        export_tflite(model, images[:1], tmp_path / "m.tflite", verify_data=[images],
                      verify_labels=[fmnist_heldout[1][:10]], precision="auto")


def test_auto_needs_verification_batches(model, tmp_path):
    path = tmp_path / "m.tflite"
    with pytest.raises(SparseliteError, match="precision='auto' measures accuracy on verification batches"):
        export_tflite(model, torch.zeros(1, 1, 28, 28), path, precision="auto")
    assert not path.exists()


def test_the_choice_is_a_stage_of_its_own():
    assert list(STAGE_TITLES)[:3] == ["prepare", "choose", "convert"]


def test_the_int8_file_with_dynamic_range_islands_is_a_candidate(fmnist_train, fmnist_heldout, tmp_path):
    """A transformer's int8 file keeps its attention float (no int8 kernel around it on XNNPACK): auto also
    weighs that file with the attention's linears dynamic-range, and the choice reproduces its file."""
    from model_blocks import TransformerBlockNet

    torch.manual_seed(0)
    model = TransformerBlockNet().eval()
    images, labels = fmnist_heldout[0][:128], fmnist_heldout[1][:128]
    path = tmp_path / "auto.tflite"
    report = export_tflite(model, images[:1], path, verify_data=[images], verify_labels=[labels],
                           calibration_data=[fmnist_train[0][:64]], precision="auto", max_accuracy_drop=100.0)
    choice = report.precision_choice
    assert set(choice["latency_vs_fp32"]) == {"mixed", "int8", "int8+dynamic"}
    if choice["file"] == "int8+dynamic":
        assert choice["precision"]["default"] == "int8" and report.layer_precisions == {"attn": "dynamic_int8"}
    again = tmp_path / "again.tflite"
    export_tflite(model, images[:1], again, verify_data=[images], calibration_data=[fmnist_train[0][:64]],
                  precision=choice["precision"], min_agreement=0.0)
    assert again.read_bytes() == path.read_bytes()


def test_an_int8_file_with_dynamic_range_islands_is_given_back_as_a_mapping():
    from sparselite.export.auto_precision import INT8_DYNAMIC, LayerChoice, PrecisionChoice

    rows = [LayerChoice("blocks.0.attn", "FULLY_CONNECTED", "dynamic_int8", "float in the int8 file"),
            LayerChoice("blocks.0.mlp", "FULLY_CONNECTED", "int8", "the int8 file")]
    choice = PrecisionChoice(INT8_DYNAMIC, rows, {"mixed": 0.8, INT8_DYNAMIC: 0.6}, {}, 0.5, "accuracy")
    assert choice.as_precision() == {"default": "int8", r"blocks\.0\.attn": "dynamic_int8"}
    assert choice.table().startswith("precision auto: the int8 file with dynamic-range islands")
