"""export_tflite on a tiny QAT-trained, pruned model: a loadable int8 file that agrees with torch, atomically written."""

from __future__ import annotations

import copy
import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_loader, tiny_mobilenet
from sparselite import ExportReport, GradualPruning, LiteRTModel, QuantizationAwareTraining, SparseliteError, export_tflite
from sparselite.export.destination import size_bound
from sparselite.tflite.flatbuffer import read_model
from sparselite.tflite.constant_values import weight_sparsity
from sparselite.models.classifier import ImageClassifier
from sparselite.models.mobilenet import MobileNetLite
from sparselite.pruning.pruner import MASK_BUFFER
from sparselite.quantization.qat import learned_ranges, strip_fake_quant

PRUNED = ["model.features.2.0", "model.features.4.0", "model.classifier"]


@pytest.fixture(scope="module")
def trained(fmnist_train, tmp_path_factory):
    """ImageClassifier trained 240 real steps: pruning to 70% by step 90, QAT from step 60, frozen at 210.

    Twice the conftest model's width: the 8-channel one stays below ~70% accuracy, and with int8 logits
    many of its predictions are exact ties, which a 1-LSB difference flips (top-1 agreement ~98.5%)."""
    pl.seed_everything(0, verbose=False)
    model = MobileNetLite(stem_channels=16, blocks=((32, 1), (64, 2)))
    module = ImageClassifier(model, lr=2e-2)
    callbacks = [GradualPruning(final_sparsity=0.7, begin_step=0, end_step=90, frequency=10, min_params=200),
                 QuantizationAwareTraining(begin_step=60, freeze_step=210, averaging_constant=0.05)]
    trainer = pl.Trainer(accelerator="cpu", max_steps=240, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, make_loader(fmnist_train, 2048, batch_size=64))  # 32 batches per epoch
    images, labels = fmnist_train
    with torch.no_grad():
        accuracy = float((module.eval()(images[:512]).argmax(1) == labels[:512]).float().mean())
    assert accuracy > 0.6  # a confident model: near-tied logits would make top-1 agreement a coin flip
    return module


@pytest.fixture(scope="module")
def heldout_batches(fmnist_heldout):
    images, _ = fmnist_heldout
    return [images[i : i + 128] for i in range(0, 512, 128)]


@pytest.fixture(scope="module")
def exported(trained, heldout_batches, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "model.tflite"
    report = export_tflite(trained, torch.zeros(1, 1, 28, 28), path, verify_data=heldout_batches)
    return path, report


def test_file_exists_and_loads_on_xnnpack_and_reference(trained, exported, heldout_batches):
    path, report = exported
    assert path.is_file() and path.stat().st_size == report.file_bytes > 0
    assert report.file_bytes <= size_bound(trained)  # the free-space check before the export asks for enough
    x = heldout_batches[0][:16].numpy()
    outputs = {}
    for accelerator in ("xnnpack", "reference"):
        model = LiteRTModel(path, accelerator=accelerator)
        assert model.input_dtype == np.float32 and model.input_shape == (1, 1, 28, 28)
        outputs[accelerator] = model(x)
        assert outputs[accelerator].shape == (16, 10) and np.isfinite(outputs[accelerator]).all()
    scale = report.parity.output_scale
    assert np.abs(outputs["xnnpack"] - outputs["reference"]).max() <= 2 * scale + 1e-6
    assert (outputs["xnnpack"].argmax(1) == outputs["reference"].argmax(1)).mean() >= 0.9


def test_parity_with_the_fake_quant_model(exported):
    _, report = exported
    parity = report.parity
    assert parity.reference == "fake-quant"
    assert parity.examples == 512
    assert parity.top1_agreement >= 0.99
    assert parity.max_logit_diff_lsb <= 4
    assert parity.kernel_agreement is None  # the noise floor is measured only for a file below min_agreement
    assert report.ranges_learned > 0 and report.ranges_calibrated == 0


def test_the_noise_floor_of_a_small_net_is_near_exact(exported, heldout_batches):
    from sparselite.export.parity import measure_noise_floor

    path, report = exported
    parity = copy.deepcopy(report.parity)
    measure_noise_floor(parity, path, heldout_batches)
    assert parity.kernel_agreement >= 0.99 and parity.kernel_max_lsb <= 4
    assert "noise floor: XNNPACK vs TFLite's builtin kernels" in ExportReport(**{**report.__dict__, "parity": parity}).summary()


def test_sparsity_read_from_the_file_equals_training(trained, exported):
    path, report = exported
    training = {name: float((trained.get_submodule(name).weight == 0).float().mean()) for name in PRUNED}
    assert all(value == pytest.approx(0.7, abs=0.01) for value in training.values())
    assert sorted(layer.layer for layer in report.layers) == sorted(PRUNED)
    in_file = weight_sparsity(path.read_bytes())  # decoded independently of the report
    for layer in report.layers:
        assert layer.sparsity_in_training == pytest.approx(training[layer.layer], abs=1e-9)
        assert abs(in_file[layer.tensor] - training[layer.layer]) <= 0.005, layer
        assert layer.sparsity_in_file == pytest.approx(in_file[layer.tensor])
    assert report.overall_sparsity_in_file == pytest.approx(0.7, abs=0.01)
    assert not [note for note in report.notes if "matched pruned layers" in note]


def test_weight_tensors_carry_their_torch_module_names(trained, exported):
    """Every conv / FC weight is named '<module>;1', the classifier too (its converter name is
    torch.export's wrapper), and the export report matches pruned layers to those same names."""
    path, report = exported
    weights = set(weight_sparsity(path.read_bytes()))
    convs_and_linears = {name for name, m in trained.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert weights == {f"{name};1" for name in convs_and_linears}
    assert {layer.layer: layer.tensor for layer in report.layers} == {name: f"{name};1" for name in PRUNED}


def test_report_serializes_to_json(exported, tmp_path):
    _, report = exported
    data = json.loads(report.to_json())
    assert data["parity"]["top1_agreement"] == report.parity.top1_agreement
    assert data["io_dtype"] == "float32" and len(data["layers"]) == 3
    report.save(tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text()) == data
    assert "parity vs fake-quant" in report.summary()
    # The summary puts the compressed sizes of both storages side by side (the download-size question).
    assert f"with dense weight storage {report.dense_int8_bytes:,} B (xz -9: {report.dense_int8_xz_bytes:,} B)" in report.summary()
    assert 0 < report.xz_bytes < report.file_bytes < report.dense_int8_bytes
    assert 0 < report.dense_int8_xz_bytes < report.dense_int8_bytes
    assert isinstance(report, ExportReport)


def test_training_module_is_left_untouched(trained):
    # Export works on a copy: the LightningModule keeps its masks and fake-quant.
    assert all(hasattr(trained.get_submodule(name), MASK_BUFFER) for name in PRUNED)
    assert hasattr(trained, "sparselite_input_quant") and len(learned_ranges(trained)) == 7


def test_int8_io_variant(trained, exported, heldout_batches, tmp_path):
    path = tmp_path / "model_int8.tflite"
    report = export_tflite(trained, torch.zeros(1, 1, 28, 28), path, io_dtype="int8", verify_data=heldout_batches[:1])
    assert report.io_dtype == "int8"
    model = LiteRTModel(path)
    assert model.input_dtype == np.int8 and model.output_dtype == np.int8
    scale, zero_point = model.input_quantization
    assert scale > 0 and -128 <= zero_point <= 127
    # The same int8 graph as the float-I/O file, which only adds the (de)quantization at its ends.
    x = heldout_batches[1].numpy()
    np.testing.assert_array_equal(model(x), LiteRTModel(exported[0])(x))
    subgraph = read_model(path.read_bytes()).subgraphs[0]
    assert subgraph.tensors[subgraph.inputs[0]].type == 9  # INT8
    float_model = LiteRTModel(exported[0])
    x = heldout_batches[0][:32].numpy()
    assert np.abs(model(x) - float_model(x)).max() <= 2 * exported[1].parity.output_scale + 1e-6


@pytest.fixture(scope="module")
def float_module():
    torch.manual_seed(0)
    return tiny_mobilenet().eval()


def test_plain_module_without_qat_needs_calibration(float_module, tmp_path):
    with pytest.raises(SparseliteError, match="no QAT ranges and no calibration"):
        export_tflite(float_module, torch.zeros(1, 1, 28, 28), tmp_path / "m.tflite")
    assert not (tmp_path / "m.tflite").exists()


def test_plain_module_with_calibration(float_module, fmnist_train, heldout_batches, tmp_path):
    path = tmp_path / "m.tflite"
    report = export_tflite(float_module, torch.zeros(1, 1, 28, 28), path, calibration_data=[fmnist_train[0][:64]],
                           verify_data=heldout_batches[:2])
    assert path.is_file()
    assert report.ranges_learned == 0 and report.ranges_calibrated > 0
    assert report.parity.reference == "float" and report.parity.examples == 256
    assert report.layers == []  # nothing was pruned


def write_old_file(path):
    # Starts like a TFLite flatbuffer: an export refuses to overwrite a file that is not a model.
    path.write_bytes(b"\x1c\x00\x00\x00TFL3 old model, must survive a failed export")
    return path.read_bytes(), path.stat().st_mtime_ns


def test_op_that_cannot_be_int8_fails_and_writes_nothing(fmnist_train, tmp_path):
    from sparselite.models.sequence import GRUClassifier

    torch.manual_seed(0)
    path = tmp_path / "model.tflite"
    old = write_old_file(path)
    with pytest.raises(SparseliteError, match="no int8 TFLite kernel") as info:
        export_tflite(GRUClassifier(hidden=8).eval(), torch.zeros(1, 1, 28, 28), path, calibration_data=[fmnist_train[0][:8]])
    message = str(info.value)
    # Each op type once, with the user's module name (the GRU), and the way out; one line.
    assert "\n" not in message and "(gru" in message and message.count("TANH") == 1
    assert "--float-fallback" in message
    assert (path.read_bytes(), path.stat().st_mtime_ns) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.tflite"]  # no temp files left behind


def test_failed_verification_leaves_the_old_file_untouched(trained, heldout_batches, tmp_path):
    float_trained = copy.deepcopy(trained)
    strip_fake_quant(float_trained)  # a trained float model, so its predictions vary with the input
    path = tmp_path / "model.tflite"
    old = write_old_file(path)
    # Calibrated on blank images, the input range is [0, 0]: the int8 file sees every image as near-blank
    # and cannot follow the float model.
    with pytest.raises(SparseliteError, match="nothing was written") as info:
        export_tflite(float_trained, torch.zeros(1, 1, 28, 28), path, calibration_data=[torch.zeros(8, 1, 28, 28)],
                      verify_data=heldout_batches[:1], min_agreement=0.9)
    assert "agrees with the torch model on only" in str(info.value)
    assert "at which XNNPACK and TFLite's builtin kernels agree" in str(info.value)  # broken on both: no floor hides it
    assert (path.read_bytes(), path.stat().st_mtime_ns) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.tflite"]


def test_successful_export_replaces_an_old_file(float_module, fmnist_train, tmp_path):
    path = tmp_path / "model.tflite"
    write_old_file(path)
    export_tflite(float_module, torch.zeros(1, 1, 28, 28), path, calibration_data=[fmnist_train[0][:16]])
    LiteRTModel(path)  # the new file, loadable
    assert path.read_bytes()[4:8] == b"TFL3"


@pytest.mark.parametrize("kwargs, message", [
    (dict(io_dtype="int16"), "io_dtype='int16'"),
    (dict(min_agreement=1.01), "min_agreement=1.01"),
    (dict(min_agreement=-0.1), "min_agreement=-0.1"),
    (dict(verify_data=[]), "verify_data gave no batches"),
    (dict(verify_batches=[torch.zeros(1, 1, 28, 28)]), "verify_batches=.* must be a whole number"),
    (dict(calibration=[torch.zeros(1, 1, 28, 28)]), r"unknown export option\(s\) \['calibration'\]"),
])
def test_argument_validation(float_module, fmnist_train, tmp_path, kwargs, message):
    path = tmp_path / "model.tflite"
    kwargs.setdefault("calibration_data", [fmnist_train[0][:4]])
    with pytest.raises(SparseliteError, match=message):
        export_tflite(float_module, torch.zeros(1, 1, 28, 28), path, **kwargs)
    assert not path.exists()


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)  # torch.export cannot trace this branch


def test_untraceable_model_is_a_user_error_with_its_cause(tmp_path):
    with pytest.raises(SparseliteError, match="torch.export cannot trace this model") as info:
        export_tflite(DataDependent(), torch.ones(1, 4), tmp_path / "m.tflite", calibration_data=[torch.ones(2, 4)])
    assert info.value.__cause__ is not None  # the API keeps torch's error; the CLI prints one line


def test_a_model_whose_output_verification_cannot_run_is_refused_before_the_conversion(tmp_path):
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return {"out": self.fc(x), "aux": x}

    with pytest.raises(SparseliteError, match=r"one tensor output, but forward returned a dict with keys \['aux', 'out'\]"):
        export_tflite(TwoHeads(), torch.ones(1, 4), tmp_path / "m.tflite", calibration_data=[torch.ones(2, 4)],
                      verify_data=[torch.ones(2, 4)])
    assert not (tmp_path / "m.tflite").exists()


def test_a_bug_in_sparselite_keeps_its_own_type_and_traceback(float_module, monkeypatch, tmp_path):
    from sparselite.export import conversion

    def broken(*args, **kwargs):
        raise KeyError("a sparselite bug")

    monkeypatch.setattr(conversion, "quantize_pt2e", broken)
    with pytest.raises(KeyError, match="a sparselite bug"):
        export_tflite(float_module, torch.zeros(1, 1, 28, 28), tmp_path / "m.tflite", calibration_data=[torch.zeros(2, 1, 28, 28)])


def test_a_pruned_layer_is_found_in_the_file_though_one_half_rounded_the_other_way():
    """The converter rounds a few exact halves of weight * scale away from torch's rounding (seen on 3 of 9
    layers of a sensitivity recipe's file): the layer is still the tensor that holds it, and its sparsity is read."""
    from sparselite.export.stages import _same_weight

    expected = np.random.default_rng(0).integers(-127, 128, (256, 1, 1, 128)).astype(np.int8)
    stored = expected.copy()
    stored[3, 0, 0, 7] += 1
    assert _same_weight(stored, expected) and _same_weight(expected, expected)
    other = np.random.default_rng(1).integers(-127, 128, expected.shape).astype(np.int8)
    assert not _same_weight(other, expected)  # another layer of the same shape
    stored[:4] = np.clip(stored[:4].astype(np.int16) + 1, -127, 127)  # many values: not a rounding difference
    assert not _same_weight(stored, expected)
    assert not _same_weight(expected.astype(np.float32) + 0.5, expected.astype(np.float32))  # float: exact only
