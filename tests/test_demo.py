"""The demo's baseline cache: reused only when it was trained from the same config, recipe and model code."""

from __future__ import annotations

import pytest
import torch

from sparselite import demo
from sparselite.errors import SparseliteError


def _fresh_baseline() -> torch.nn.Module:
    return demo.build_lightning_cli(["-c", str(demo.CONFIG), "-c", str(demo.DENSE_RECIPE)], run=False).model


def test_cached_baseline_with_matching_fingerprint_is_loaded_not_retrained(tmp_path, capsys):
    trained = _fresh_baseline()
    with torch.no_grad():
        trained.model.classifier.bias.fill_(0.25)  # a value a fresh model would not have
    path = tmp_path / "baseline_state.pt"
    torch.save({"fingerprint": demo._baseline_fingerprint(), "state_dict": trained.state_dict()}, path)

    loaded = demo._cached_baseline(path, retrain=False)

    assert "(cached)" in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))



def _saved_baseline(tmp_path):
    baseline = _fresh_baseline()
    path = tmp_path / "dense" / "baseline_state.pt"
    path.parent.mkdir(parents=True)
    torch.save({"fingerprint": demo._baseline_fingerprint(), "state_dict": baseline.state_dict()}, path)
    return baseline, path


def test_compressed_recipe_distils_from_the_cached_baseline(tmp_path):
    import yaml

    _, teacher = _saved_baseline(tmp_path)
    copy = demo._recipe_exporting_to(tmp_path / "int8.tflite", tmp_path / "run" / "recipe.yaml", teacher=teacher)
    callbacks = {cb["class_path"].rsplit(".", 1)[-1]: cb["init_args"]
                 for cb in yaml.safe_load(copy.read_text())["trainer"]["callbacks"]}
    assert callbacks["Distillation"]["teacher"] == str(teacher)
    assert callbacks["TFLiteExport"]["path"] == str(tmp_path / "int8.tflite")
    # The recipe without a teacher is the demo's comparison run; the distilling one refuses to run without one.
    demo._recipe_exporting_to(tmp_path / "plain.tflite", tmp_path / "plain" / "recipe.yaml", demo.UNDISTILLED_RECIPE)
    with pytest.raises(SparseliteError, match="teacher"):
        demo._recipe_exporting_to(tmp_path / "x.tflite", tmp_path / "x" / "recipe.yaml")


def _marked_baseline(tmp_path):
    """A saved baseline with a bias a fresh model would not have."""
    baseline, path = _saved_baseline(tmp_path)
    with torch.no_grad():
        baseline.model.classifier.bias.fill_(0.25)
    torch.save({"fingerprint": demo._baseline_fingerprint(), "state_dict": baseline.state_dict()}, path)
    return baseline, path


def test_cached_baseline_file_is_a_teacher_for_the_demo_model(tmp_path):
    """The cache file (tensors and a fingerprint string) loads, as tensors only, into a float copy of the student."""
    from sparselite.distillation.teacher import resolve_teacher

    baseline, path = _marked_baseline(tmp_path)
    student = _fresh_baseline()
    teacher = resolve_teacher(str(demo._teacher_file(path)), student)
    assert torch.equal(teacher.model.classifier.bias, baseline.model.classifier.bias)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_cached_baseline_file_is_where_the_compressed_runs_start(tmp_path):
    """The compressed runs get ``--initial_weights <cache file>``: it loads, as tensors only, into a fresh model."""
    from sparselite.lightning_cli import load_initial_weights

    baseline, path = _marked_baseline(tmp_path)
    student = _fresh_baseline()
    load_initial_weights(student, path)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), baseline.state_dict().values()))


def test_teacher_file_refuses_a_foreign_run_config_above_it(tmp_path):
    _, path = _saved_baseline(tmp_path / "elsewhere" / "out")
    (tmp_path / "elsewhere" / "config.yaml").write_text("trainer: {}\n")
    with pytest.raises(SparseliteError, match="another --out"):
        demo._teacher_file(path)


def test_table_says_the_file_is_distilled_and_shows_the_comparison_row():
    layer = "model.features.2.0"
    summary = {
        "accuracy": {"fp32_dense_torch": 0.9027, "fp32_dense_tflite_xnnpack": 0.9027, "fake_quant_torch": 0.9001,
                     "int8_sparse_tflite_xnnpack": 0.9001, "int8_sparse_no_distillation_tflite_xnnpack": 0.8955},
        "distillation": {"teacher": "runs/demo/dense/baseline_state.pt", "temperature": 4.0, "weight": 0.9},
        "parity_test_set": {"top1_agreement": 1.0, "max_logit_diff_lsb": 0.0},
        "sparsity_in_file": {layer: 0.8}, "sparsity_in_training": {layer: 0.8}, "overall_sparsity_in_file": 0.8,
        "bytes": {k: 1000 for k in ("fp32_tflite", "fp32_tflite_xz", "int8_dense_tflite", "int8_dense_tflite_xz",
                                    "int8_sparse_tflite", "int8_sparse_tflite_xz")},
        "latency_ms": {"fp32": {"median_ms": 0.1, "p90_ms": 0.11}, "int8": {"median_ms": 0.04, "p90_ms": 0.05}},
        "int8_vs_fp32_latency": 0.4, "wall_seconds": 120.0,
    }
    text = demo.format_table(summary)
    assert "80% sparse, distilled: int8 (.tflite)" in text and "90.01%" in text
    assert "no teacher: int8 (.tflite)" in text and "89.55%" in text
    assert "T=4, weight 0.9" in text and "benchmarks/distillation.py" not in text
    del summary["accuracy"]["int8_sparse_no_distillation_tflite_xnnpack"]
    text = demo.format_table(summary)
    assert "no teacher" not in text and "benchmarks/distillation.py" in text
