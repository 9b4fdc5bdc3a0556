"""Reparameterizable blocks (RepVGG, MobileOne, FastViT, ...) with trained norms are switched to their deploy form
before pruning and QAT, so that the pruned, fake-quantized conv is the one the int8 file holds; blocks whose
norms never ran (a model from scratch) keep their training form, and the user is told.

The block here is written as RepVGG's code writes it (three branches summed; ``reparameterize()`` builds the
one conv they add up to), from plain torch; one test uses timm's own ``RepVggBlock``."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from conftest import make_loader, make_trainer, xnnpack_partitions
from sparselite import GradualPruning, QuantizationAwareTraining, export_tflite
from sparselite.deploy_form import deploy_form_blocks, to_deploy_form, training_form_blocks, warn_if_kept
from sparselite.models.classifier import ImageClassifier
from sparselite.tflite.flatbuffer import builtin_code, builtin_name, read_model


def _fold(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class RepBlock(nn.Module):
    """3x3 conv+BN, 1x1 conv+BN and (same shape) an identity BN, summed, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.shape = (cin, cout, stride)
        self.conv3 = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
        self.conv1 = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout))
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()
        self.fused: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.act(self.fused(x))
        y = self.conv3(x) + self.conv1(x)
        return self.act(y if self.identity is None else y + self.identity(x))

    def reparameterize(self) -> None:
        if self.fused is not None:
            return
        cin, cout, stride = self.shape
        kernel, bias = _fold(self.conv3[0].weight, self.conv3[1])
        k1, b1 = _fold(F.pad(self.conv1[0].weight, [1, 1, 1, 1]), self.conv1[1])
        kernel, bias = kernel + k1, bias + b1
        if self.identity is not None:
            eye = torch.zeros_like(kernel)
            eye[range(cout), range(cin), 1, 1] = 1
            ki, bi = _fold(eye, self.identity)
            kernel, bias = kernel + ki, bias + bi
        self.fused = nn.Conv2d(cin, cout, 3, stride, 1)
        self.fused.weight.data, self.fused.bias.data = kernel.detach().clone(), bias.detach().clone()
        del self.conv3, self.conv1, self.identity


class Sampler(nn.Module):
    """A VAE-style ``reparameterize(mu, logvar)``: a method of that name that is no deploy switch."""

    def __init__(self) -> None:
        super().__init__()
        self.called = False

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        self.called = True
        return mu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class NoOpSwitch(nn.Module):
    """``switch_to_deploy()`` with nothing to switch (a module without re-parameterizable branches)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(32, 32, 1)

    def switch_to_deploy(self) -> None:
        self.deployed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class RepNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(RepBlock(16, 16), RepBlock(16, 32, stride=2), RepBlock(32, 32))
        self.sampler, self.tail = Sampler(), NoOpSwitch()
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tail(self.sampler(self.blocks(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _randomize_batchnorms(model: nn.Module) -> nn.Module:
    """Running statistics as trained (or pretrained) weights have them."""
    generator = torch.Generator().manual_seed(0)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator) * 0.1)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
        bn.weight.data.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
    return model


def test_blocks_switch_once_and_compute_what_their_branches_computed(caplog):
    torch.manual_seed(0)
    model = RepNet().eval()
    _randomize_batchnorms(model)  # trained statistics, and no batch count (as pretrained weights often load)
    x = torch.randn(4, 1, 28, 28)
    before = model(x)
    assert to_deploy_form(model) == ["blocks.0", "blocks.1", "blocks.2"]  # not the sampler, not the no-op
    with caplog.at_level("WARNING", logger="sparselite"):
        warn_if_kept(model)
    assert not caplog.records and training_form_blocks(model) == []  # trained norms: nothing kept
    assert not model.sampler.called and model.tail.deployed
    assert all(b.fused is not None and not hasattr(b, "conv1") for b in model.blocks)
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)
    fused = model.blocks[0].fused
    assert to_deploy_form(model) == ["blocks.0", "blocks.1", "blocks.2"] and model.blocks[0].fused is fused
    assert deploy_form_blocks(model) == ["blocks.0", "blocks.1", "blocks.2"]


def test_blocks_whose_norms_never_ran_keep_their_training_form(caplog):
    """From scratch, a deploy form trains without normalization: the blocks keep their branches, and a fit is
    told once."""
    model = RepNet()
    assert to_deploy_form(model) == [] and training_form_blocks(model) == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(b.fused is None and hasattr(b, "conv1") for b in model.blocks)
    with caplog.at_level("WARNING", logger="sparselite"):
        warn_if_kept(model), warn_if_kept(model)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "3 reparameterizable blocks keep their training form" in warning and "blocks.0, blocks.1, blocks.2" in warning


def _compression_callbacks() -> list:
    return [GradualPruning(final_sparsity=0.6, begin_step=0, end_step=60, frequency=10, min_params=1000),
            QuantizationAwareTraining(begin_step=70, freeze_step=140)]


def _op_types(path) -> list[str]:
    model = read_model(path)
    return [builtin_name(builtin_code(model, op)) for op in model.subgraphs[0].operators]


def test_pruning_and_qat_train_the_deploy_form_and_the_int8_file_holds_it(fmnist_train, fmnist_heldout, tmp_path):
    """A plain Trainer with GMP + QAT: the pruned and fake-quantized convs are the fused ones, the strict
    export writes one CONV_2D per block (no ADD of branches), with the training sparsity and parity."""
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(_randomize_batchnorms(RepNet()), lr=5e-3)  # fine-tuning trained weights
    callbacks = _compression_callbacks()
    make_trainer(tmp_path, 160, callbacks).fit(module, make_loader(fmnist_train, 2048, batch_size=64))
    assert deploy_form_blocks(module) == ["model.blocks.0", "model.blocks.1", "model.blocks.2"]
    assert {"model.blocks.1.fused", "model.blocks.2.fused"} <= set(callbacks[0].pruner.layers)
    images = fmnist_heldout[0]
    path = tmp_path / "rep.tflite"
    report = export_tflite(module.eval(), images[:1], path, verify_data=[images[:256], images[256:]])
    ops = _op_types(path)
    assert "ADD" not in ops and ops.count("CONV_2D") == 4, ops  # the stem and one conv per block
    assert report.float_islands == [] and report.ranges_calibrated == 0 and xnnpack_partitions(path) == 1
    assert any("3 reparameterizable blocks exported in their deploy form" in note for note in report.notes)
    fused = {layer.layer: layer for layer in report.layers if layer.layer.endswith(".fused")}
    assert len(fused) == 3
    for layer in fused.values():  # what training pruned is what the file holds (and weights int8 rounds to 0)
        assert layer.sparsity_in_training - 1e-6 <= layer.sparsity_in_file <= layer.sparsity_in_training + 0.005
        assert layer.sparsity_in_file == pytest.approx(0.6, abs=0.01)
    assert report.parity.top1_agreement >= 0.99 and round(report.parity.max_logit_diff_lsb) <= 4, report.parity


def test_a_resumed_run_switches_before_its_checkpoint_loads(fmnist_train, tmp_path):
    """Exact resume: the fresh module is switched at set-up, so the checkpoint's fused weights, masks and
    ranges load into the same structure, and the resumed run ends where the uninterrupted one did."""
    loader = lambda: make_loader(fmnist_train, 512, batch_size=64)  # noqa: E731
    pl.seed_everything(0, verbose=False)
    module_a = ImageClassifier(_randomize_batchnorms(RepNet()), lr=5e-3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=40, save_top_k=-1, filename="{step}")
    make_trainer(tmp_path, 80, [*_compression_callbacks(), checkpoint], checkpointing=True, name="a").fit(module_a, loader())

    pl.seed_everything(1, verbose=False)
    module_b = ImageClassifier(_randomize_batchnorms(RepNet()), lr=5e-3)  # built as run A was: pretrained
    make_trainer(tmp_path, 80, _compression_callbacks(), name="b").fit(module_b, loader(),
                                                                       ckpt_path=tmp_path / "ckpt" / "step=40.ckpt")
    state_a, state_b = module_a.state_dict(), module_b.state_dict()
    assert state_a.keys() == state_b.keys() and any(k.endswith("fused.weight") for k in state_a)
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def test_from_scratch_the_file_holds_the_training_form_and_says_so(fmnist_train, fmnist_heldout, tmp_path, caplog):
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(RepNet(), lr=5e-3)
    with caplog.at_level("WARNING", logger="sparselite"):
        make_trainer(tmp_path, 120, [QuantizationAwareTraining(begin_step=40, freeze_step=100)]).fit(
            module, make_loader(fmnist_train, 2048, batch_size=64))
    assert [r for r in caplog.records if "keep their training form" in r.getMessage()]
    images = fmnist_heldout[0]
    path = tmp_path / "scratch.tflite"
    report = export_tflite(module.eval(), images[:1], path, verify_data=[images[:256], images[256:]])
    assert _op_types(path).count("ADD") >= 3  # the branches, summed in int8
    assert any("3 reparameterizable blocks exported in their training form" in note for note in report.notes)
    assert report.parity.top1_agreement >= 0.99 and round(report.parity.max_logit_diff_lsb) <= 4, report.parity


def test_timm_repvgg_blocks_export_fused(fmnist_train, fmnist_heldout, tmp_path):
    pytest.importorskip("timm")
    from timm.models.byobnet import RepVggBlock

    class TimmRepNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(RepVggBlock(1, 16, stride=2), RepVggBlock(16, 16), RepVggBlock(16, 32, stride=2))
            self.head = nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(F.adaptive_avg_pool2d(self.blocks(x), 1).flatten(1))

    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(_randomize_batchnorms(TimmRepNet()), lr=5e-3)  # as from pretrained weights
    make_trainer(tmp_path, 120, [QuantizationAwareTraining(begin_step=40, freeze_step=100)]).fit(
        module, make_loader(fmnist_train, 2048, batch_size=64))
    images = fmnist_heldout[0]
    path = tmp_path / "timm_rep.tflite"
    report = export_tflite(module.eval(), images[:1], path, verify_data=[images[:256], images[256:]])
    ops = _op_types(path)
    # One conv per block (the first, reading one channel, is written as a DEPTHWISE_CONV_2D).
    assert "ADD" not in ops and ops.count("CONV_2D") + ops.count("DEPTHWISE_CONV_2D") == 3, ops
    assert report.float_islands == [] and report.ranges_calibrated == 0
    assert report.parity.top1_agreement >= 0.99 and round(report.parity.max_logit_diff_lsb) <= 4, report.parity
