"""Distillation in a real Lightning Trainer: the exact mixed loss, the schedule, a frozen float teacher
outside the student, with GradualPruning + QAT and with ChannelPruning, and bad arguments refused."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from conftest import make_loader, make_trainer, tiny_mobilenet
from distillation.helpers import RecordLoss, batchnorm_state, student, train_teacher
from sparselite import ChannelPruning, Distillation, GradualPruning, QuantizationAwareTraining, SparseliteError
from sparselite.distillation.loss import kd_loss
from sparselite.models.classifier import ImageClassifier
from sparselite.pruning.pruner import MASK_BUFFER


def out_channels(module: torch.nn.Module) -> list[int]:
    return [m.out_channels for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, fmnist_train) -> ImageClassifier:
    return train_teacher(tmp_path_factory.mktemp("teacher"), fmnist_train)


def test_first_step_loss_is_the_exact_mix(tmp_path, teacher, fmnist_train):
    module, record = student(), RecordLoss()
    distillation = Distillation(teacher=teacher, temperature=3.0, weight=0.7)
    make_trainer(tmp_path, 1, [distillation, record]).fit(module, make_loader(fmnist_train, 32))
    images, labels = fmnist_train[0][:32], fmnist_train[1][:32]
    replay = student()  # the same initial weights, in train mode as Lightning ran them
    replay.load_state_dict(record.first_weights)
    logits = replay.train()(images)
    with torch.no_grad():
        teacher_logits = teacher(images)
    expected = 0.3 * F.cross_entropy(logits, labels) + 0.7 * kd_loss(logits, teacher_logits, 3.0)
    assert record.losses == [pytest.approx(float(expected.detach()), rel=1e-5)]
    assert "training_step" not in module.__dict__  # the wrapper is gone after fit


def test_student_moves_towards_the_teacher_and_teacher_stays_frozen(tmp_path, teacher, fmnist_train):
    bn_before = batchnorm_state(teacher)
    weights_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.train()  # Lightning-style .train() on the teacher object must not matter
    module = student()
    distillation = Distillation(teacher=teacher, weight=1.0, temperature=1.0)
    images = fmnist_train[0][:256]
    calls = []
    handle = teacher.register_forward_hook(lambda m, i, o: calls.append(m.training))
    trainer = make_trainer(tmp_path, 16, [distillation])
    trainer.fit(module, make_loader(fmnist_train, 256))
    handle.remove()
    plain = student()  # the same initialization, trained as long without the teacher
    make_trainer(tmp_path, 16, [], name="plain").fit(plain, make_loader(fmnist_train, 256))
    with torch.no_grad():
        gap_plain = float(kd_loss(plain.eval()(images), teacher.eval()(images), 1.0))
        gap_distilled = float(kd_loss(module.eval()(images), teacher(images), 1.0))
    assert gap_distilled < 0.7 * gap_plain, (gap_plain, gap_distilled)  # deterministic: 0.0035 vs 0.0063
    assert len(calls) == 16 and not any(calls)  # once per batch, always in eval mode
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for name, value in weights_before.items():
        assert torch.equal(teacher.state_dict()[name], value), name
    assert batchnorm_state(teacher).keys() == bn_before.keys()
    # The teacher is not part of the student: not a submodule, not in its optimizer or checkpoint.
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not any(id(p) in teacher_ids for p in module.parameters())
    assert not any(m is teacher for m in module.modules())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & teacher_ids
    state = distillation.state_dict()
    assert set(state) == {"source", "fingerprint"} and state["source"] == "module ImageClassifier"


def test_schedule_runs_the_teacher_only_when_needed(tmp_path, teacher, fmnist_train):
    module, record = student(), RecordLoss()
    steps = []
    handle = teacher.register_forward_hook(lambda m, i, o: steps.append(len(record.losses)))
    make_trainer(tmp_path, 8, [Distillation(teacher=teacher, begin_step=3, end_step=6), record]).fit(
        module, make_loader(fmnist_train, 256))
    handle.remove()
    # Step 0: the shape check before any training; then only steps 3, 4, 5.
    assert steps == [0, 3, 4, 5]
    plain = student()
    plain_record = RecordLoss()
    make_trainer(tmp_path, 8, [plain_record], name="plain").fit(plain, make_loader(fmnist_train, 256))
    assert record.losses[:3] == plain_record.losses[:3]  # before begin_step the loss is the user's alone


class CallsTheNetworkDirectly(ImageClassifier):
    """A LightningModule whose training_step calls ``self.model(x)``, not ``self(x)``."""

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self.model(images), labels)


def test_student_submodule_is_found_when_training_step_bypasses_forward(tmp_path, teacher, fmnist_train):
    pl.seed_everything(0, verbose=False)
    module, record = CallsTheNetworkDirectly(tiny_mobilenet(), lr=5e-3), RecordLoss()
    distillation = Distillation(teacher=teacher, temperature=4.0, weight=0.5)
    make_trainer(tmp_path, 1, [distillation, record]).fit(module, make_loader(fmnist_train, 32))
    assert distillation.distiller.student == "model"
    images, labels = fmnist_train[0][:32], fmnist_train[1][:32]
    replay = CallsTheNetworkDirectly(tiny_mobilenet(), lr=5e-3)
    replay.load_state_dict(record.first_weights)
    logits = replay.train().model(images)
    with torch.no_grad():
        expected = 0.5 * F.cross_entropy(logits, labels) + 0.5 * kd_loss(logits, teacher.model(images), 4.0)
    assert record.losses == [pytest.approx(float(expected.detach()), rel=1e-5)]


def test_with_gradual_pruning_and_qat_the_teacher_stays_float_and_dense(tmp_path, teacher, fmnist_train):
    module = student()
    pruning = GradualPruning(final_sparsity=0.75, begin_step=0, end_step=8, frequency=2, min_params=100)
    qat = QuantizationAwareTraining(begin_step=4, freeze_step=10, averaging_constant=0.1)
    record = RecordLoss()
    teacher_types = {name: type(m) for name, m in teacher.named_modules()}
    make_trainer(tmp_path, 12, [pruning, qat, Distillation(teacher=teacher), record]).fit(
        module, make_loader(fmnist_train, 256))
    assert pruning.pruner.sparsity()["overall"] == pytest.approx(0.75, abs=5e-3)
    assert any("sparselite_weight_quant" in name for name, _ in module.named_modules())
    assert {name: type(m) for name, m in teacher.named_modules()} == teacher_types  # no fake-quant, no masks
    assert not any(MASK_BUFFER in name or "sparselite" in name for name in teacher.state_dict())
    assert len(record.losses) == 12 and all(torch.isfinite(torch.tensor(record.losses)))


def test_initial_teacher_with_channel_pruning_keeps_every_channel(tmp_path, fmnist_train):
    module = student()
    channels = ChannelPruning(final_sparsity=0.5, begin_step=0, end_step=4, frequency=2)
    distillation = Distillation(teacher="initial")
    make_trainer(tmp_path, 8, [channels, distillation, QuantizationAwareTraining(begin_step=6)]).fit(
        module, make_loader(fmnist_train, 256))
    assert out_channels(module) == [8, 8, 8, 8, 16]
    assert out_channels(distillation.teacher) == [8, 8, 16, 16, 32]  # stem, then (depthwise, pointwise) x 2
    assert not any("sparselite" in name for name in distillation.teacher.state_dict())
    assert distillation.state_dict()["source"] == "initial"


def test_wrong_output_shape_is_refused_before_any_update(tmp_path, fmnist_train):
    module, record = student(), RecordLoss()
    seven_classes = ImageClassifier(tiny_mobilenet(num_classes=7))
    with pytest.raises(SparseliteError, match=r"teacher's output \(32, 7\) does not match the student's \(32, 10\)"):
        make_trainer(tmp_path, 4, [record, Distillation(teacher=seven_classes, begin_step=2)]).fit(
            module, make_loader(fmnist_train, 64))
    assert record.losses == []  # refused in the first step, before backward: no weight has changed
    for name, value in module.named_parameters():
        assert torch.equal(value, record.first_weights[name]), name
    assert "training_step" not in module.__dict__


def test_missing_checkpoint_is_refused_at_setup(tmp_path, fmnist_train):
    missing = tmp_path / "runs" / "dense" / "nope.ckpt"
    with pytest.raises(SparseliteError, match=r"teacher checkpoint .*nope.ckpt does not exist"):
        make_trainer(tmp_path, 2, [Distillation(teacher=str(missing))]).fit(student(), make_loader(fmnist_train, 64))


@pytest.mark.parametrize("kwargs, message", [
    ({"teacher": ""}, r"teacher='' must be an nn.Module, a checkpoint path, or 'initial'"),
    ({"teacher": 3}, r"teacher=3 must be"),
    ({"teacher": "initial", "temperature": 0}, r"temperature=0 must be a finite number > 0"),
    ({"teacher": "initial", "temperature": float("nan")}, r"temperature=nan"),
    ({"teacher": "initial", "weight": 0.0}, r"weight=0.0 must be in \(0, 1\]"),
    ({"teacher": "initial", "weight": 1.5}, r"weight=1.5"),
    ({"teacher": "initial", "begin_step": -1}, r"begin_step=-1 must be a whole number >= 0"),
    ({"teacher": "initial", "begin_step": 5, "end_step": 5}, r"end_step=5 must be a whole number above begin_step=5"),
    ({"teacher": "initial", "student": 3}, r"student=3 must be a submodule name"),
])
def test_invalid_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(SparseliteError, match=message):
        Distillation(**kwargs)


def test_teacher_that_is_the_student_is_refused(tmp_path, fmnist_train):
    module = student()
    with pytest.raises(SparseliteError, match="teacher is the model being trained; pass teacher='initial'"):
        make_trainer(tmp_path, 1, [Distillation(teacher=module)]).fit(module, make_loader(fmnist_train, 32))
    with pytest.raises(SparseliteError, match="shares parameters with the model being trained"):
        make_trainer(tmp_path, 1, [Distillation(teacher=module.model)]).fit(module, make_loader(fmnist_train, 32))
