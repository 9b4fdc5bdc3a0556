"""TFLiteExport at the end of a real Lightning fit: the file, its JSON report, and clear errors."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest

from conftest import make_loader, tiny_mobilenet
from sparselite import QuantizationAwareTraining, SparseliteError, TFLiteExport
from sparselite.models.classifier import ImageClassifier


def _trainer(callbacks: list, limit_val_batches: int = 1) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_steps=8, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=limit_val_batches)


def test_fit_ends_with_the_file_and_its_report(tmp_path, fmnist_train, fmnist_heldout):
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(tiny_mobilenet(), lr=5e-3)
    path = tmp_path / "out" / "model.tflite"
    export = TFLiteExport(str(path), verify_batches=2, calibration_batches=1, min_agreement=0.0)
    _trainer([QuantizationAwareTraining(begin_step=2), export]).fit(
        module, make_loader(fmnist_train, 256), make_loader(fmnist_heldout, 128))
    assert path.is_file() and export.report.file_bytes == path.stat().st_size
    saved = json.loads(path.with_suffix(".json").read_text())
    assert saved == json.loads(json.dumps(export.report.to_dict()))
    assert saved["parity"]["examples"] == 64 and saved["ranges_learned"] > 0  # 2 verify batches of 32
    # The loader's labels give each model's accuracy on the same examples (the report page's first table).
    accuracy = saved["accuracy"]
    assert set(accuracy) == {"fp32", "fake_quant", "file", "examples"} and accuracy["examples"] == 64
    assert all(0.0 <= accuracy[key] <= 1.0 for key in ("fp32", "fake_quant", "file"))
    assert "labelled verification examples" in export.report.summary()


def test_fit_without_validation_data_is_a_clear_error(tmp_path, fmnist_train):
    module = ImageClassifier(tiny_mobilenet(), lr=5e-3)
    export = TFLiteExport(str(tmp_path / "model.tflite"))
    with pytest.raises(SparseliteError, match="needs validation data"):
        _trainer([export], limit_val_batches=0).fit(module, make_loader(fmnist_train, 64))


@pytest.mark.parametrize("kwargs, message", [
    ({"io_dtype": "uint8"}, "io_dtype='uint8'"),
    ({"verify_batches": 0}, "verify_batches=0 must be a whole number >= 1, or None"),
    ({"min_agreement": 2}, "min_agreement=2 must be a number in"),
    ({"float_fallback": "gpu"}, "float_fallback='gpu' must be"),
    ({"path": "model.onnx"}, "should end in .tflite"),
])
def test_invalid_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(SparseliteError, match=message):
        TFLiteExport(**kwargs)


def test_auto_chooses_once_and_the_checkpoint_keeps_the_choice(tmp_path, fmnist_train, fmnist_heldout):
    """precision='auto' measures at the end of fit, stores its choice in the last checkpoint, and a run
    resumed from that checkpoint exports the same choice without measuring again."""
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from sparselite.export.auto_precision import CHECKPOINT_KEY

    def run(export: TFLiteExport, resume: str | None = None) -> None:
        pl.seed_everything(0, verbose=False)
        module = ImageClassifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 256), torch.nn.ReLU(),
                                                     torch.nn.Linear(256, 10)), lr=1e-3)
        checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        pl.Trainer(accelerator="cpu", max_steps=8, callbacks=[export, checkpoints], logger=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1).fit(
            module, make_loader(fmnist_train, 256), make_loader(fmnist_heldout, 128), ckpt_path=resume)

    first = TFLiteExport(str(tmp_path / "first.tflite"), precision="auto", verify_batches=2)
    run(first)
    choice = first.report.precision_choice
    assert choice is not None and first.precision_choice == choice
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)[CHECKPOINT_KEY] == choice

    again = TFLiteExport(str(tmp_path / "again.tflite"), precision="auto", verify_batches=2)
    run(again, resume=str(last))  # max_steps already reached: fit ends at once, and exports
    assert again.report.precision_choice is None  # nothing measured
    assert again.report.precision == choice["precision"] and again.precision_choice == choice
    assert (tmp_path / "again.tflite").read_bytes() == (tmp_path / "first.tflite").read_bytes()
