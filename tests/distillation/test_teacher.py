"""Finding the teacher: modules frozen in place, checkpoints read as tensors only (with or without their run's
config.yaml), pickled code refused with one line, 'initial' copies without compression state, fingerprints,
and the faster copy that runs."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import tiny_mobilenet
from distillation.helpers import student
from sparselite import GradualPruning, QuantizationAwareTraining, SparseliteError
from sparselite.distillation.teacher import fingerprint, inference_form, resolve_teacher
from sparselite.models.classifier import ImageClassifier

RUN_CONFIG = """
seed_everything: 7
model:
  class_path: sparselite.models.classifier.ImageClassifier
  init_args:
    model:
      class_path: sparselite.models.mobilenet.MobileNetLite
      init_args: {stem_channels: 8, blocks: [[16, 1], [32, 2]], num_classes: 10}
trainer:
  max_steps: 1
"""


class RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def trained_like(seed: int) -> ImageClassifier:
    module = student(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.1)
    return module


def test_module_teacher_is_frozen_in_place():
    teacher = trained_like(1).train()
    assert resolve_teacher(teacher, student()) is teacher
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_checkpoint_with_its_run_config_is_rebuilt_from_it(tmp_path):
    teacher = trained_like(1)
    run = tmp_path / "runs" / "dense"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(RUN_CONFIG)
    torch.save({"state_dict": teacher.state_dict(), "global_step": 1}, run / "checkpoints" / "last.ckpt")
    fresh = student()
    torch.manual_seed(123)
    random.seed(5)
    expected = (torch.rand(1), random.random())
    torch.manual_seed(123)
    random.seed(5)
    loaded = resolve_teacher(str(run / "checkpoints" / "last.ckpt"), fresh)
    assert (torch.rand(1), random.random()) == expected  # the config's seed_everything did not reseed the fit
    assert fingerprint(loaded) == fingerprint(teacher) and not loaded.training


def test_checkpoint_without_run_config_loads_into_a_copy_of_the_student(tmp_path):
    teacher = trained_like(1)
    torch.save({"state_dict": teacher.state_dict()}, tmp_path / "teacher.ckpt")
    pruned_student = student()
    GradualPruning(min_params=100).prepare(pruned_student)  # the student already carries masks and fake-quant
    QuantizationAwareTraining(begin_step=0).prepare(pruned_student)
    loaded = resolve_teacher(tmp_path / "teacher.ckpt", pruned_student)
    assert fingerprint(loaded) == fingerprint(teacher)
    assert not any("sparselite" in name for name in loaded.state_dict())
    images = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(loaded(images), teacher.eval()(images))


def test_checkpoint_of_another_architecture_without_config_is_one_line(tmp_path):
    other = ImageClassifier(tiny_mobilenet(num_classes=7))
    torch.save({"state_dict": other.state_dict()}, tmp_path / "other.ckpt")
    with pytest.raises(SparseliteError, match=r"other.ckpt does not fit the model's architecture") as err:
        resolve_teacher(tmp_path / "other.ckpt", student())
    assert "\n" not in str(err.value)


def test_checkpoint_with_pickled_code_is_refused_before_it_runs(tmp_path, capsys):
    torch.save({"state_dict": student().state_dict(), "payload": RunsCodeWhenUnpickled()}, tmp_path / "evil.ckpt")
    with pytest.raises(SparseliteError, match="holds Python objects other than tensors") as err:
        resolve_teacher(tmp_path / "evil.ckpt", student())
    assert "\n" not in str(err.value)
    assert "this ran" not in capsys.readouterr().out


def test_missing_and_unreadable_files_are_one_line(tmp_path):
    with pytest.raises(SparseliteError, match="does not exist"):
        resolve_teacher(tmp_path / "missing.ckpt", student())
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(SparseliteError, match="notes.ckpt") as err:
        resolve_teacher(tmp_path / "notes.ckpt", student())
    assert "\n" not in str(err.value)


def test_initial_is_a_float_copy_without_compression_state():
    module = student()
    QuantizationAwareTraining(begin_step=0).prepare(module)
    GradualPruning(min_params=100).prepare(module)
    teacher = resolve_teacher("initial", module)
    assert teacher is not module and not any("sparselite" in n for n, _ in teacher.named_modules())
    assert not any("sparselite" in n for n in teacher.state_dict())
    assert teacher._trainer is None
    assert fingerprint(teacher) == fingerprint(module)  # compression state is not part of the fingerprint
    with torch.no_grad():
        next(module.parameters()).add_(1.0)
    assert fingerprint(teacher) != fingerprint(module)


def with_trained_norms(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for bn in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        for tensor, low, high in ((bn.running_mean, -1, 1), (bn.running_var, 0.5, 2), (bn.weight, 0.5, 1.5), (bn.bias, -1, 1)):
            tensor.data.copy_(torch.empty_like(tensor).uniform_(low, high, generator=generator))
    return module


def test_inference_form_folds_norms_and_computes_the_same_logits():
    teacher = resolve_teacher(with_trained_norms(student(3)), student(4))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    fast = inference_form(teacher)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert not any(p.requires_grad for p in fast.parameters()) and not fast.training
    images = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fast(images), teacher(images), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # the teacher is untouched
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())


class DataDependentBranch(torch.nn.Module):
    """fx cannot trace a branch on a tensor's value: the norms stay, and the copy is still right."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        x = x.relu() if x.mean() > 0 else -x
        return self.head(x.mean((2, 3)))


def test_inference_form_on_cpu_keeps_conv_weights_channels_last():
    fast = inference_form(resolve_teacher(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()), student(4)))
    assert fast[0].weight.is_contiguous(memory_format=torch.channels_last) and not fast[0].weight.is_contiguous()


def test_inference_form_of_a_model_fx_cannot_trace_keeps_its_norms():
    teacher = resolve_teacher(with_trained_norms(DataDependentBranch()), student(4))
    fast = inference_form(teacher)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    images = torch.randn(8, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(fast(images), teacher(images), rtol=1e-4, atol=1e-5)
