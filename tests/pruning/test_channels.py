"""ChannelPruner without Lightning: groups, masking, shrink == masked, rounding, safety, reload of a shrunk model."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from pruning.channel_models import ConcatNet, SigmoidGateNet, TinyResNet
from conftest import tiny_mobilenet
from sparselite import SparseliteError
from sparselite.models.mobilenet import MobileNetLite
from sparselite.pruning.channels import CHANNEL_MASK, PLAN_KEY, ChannelPruner, kept_channels
from sparselite.pruning.pruner import MASK_BUFFER, MagnitudePruner
from sparselite.pruning.schedule import PolynomialDecay
from sparselite.pruning.selection import LayerSelection

EXAMPLE = torch.zeros(1, 1, 28, 28)


def schedule(final: float = 0.5, end: int = 4) -> PolynomialDecay:
    return PolynomialDecay(final_sparsity=final, begin_step=0, end_step=end, frequency=2)


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Trained-looking BN (non-trivial scale, shift and statistics), so equivalence is not checked on identities."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.weight.data = torch.rand(c, generator=generator) + 0.5
            module.bias.data = torch.rand(c, generator=generator) - 0.5
            module.running_mean = torch.rand(c, generator=generator) * 0.4 - 0.2
            module.running_var = torch.rand(c, generator=generator) + 0.5
    return model


def pruned(model: nn.Module, final: float = 0.5, **kwargs) -> ChannelPruner:
    pruner = ChannelPruner(schedule(final), **kwargs)
    pruner.prepare(model, EXAMPLE)
    for step in range(5):
        pruner.step(step)
    return pruner


FAMILIES = {
    "mobilenet_depthwise": lambda: MobileNetLite(stem_channels=16, blocks=((32, 1), (64, 2), (64, 1))),
    "resnet_residual_add": TinyResNet,
    "inception_concat": ConcatNet,
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_shrunk_model_equals_masked_model(family):
    torch.manual_seed(0)
    model = randomize_batchnorm(FAMILIES[family]()).eval()
    pruner = pruned(model)
    assert pruner.groups and not pruner.skipped
    images = torch.randn(8, 1, 28, 28)
    masked = model(images)
    params_before = sum(p.numel() for p in model.parameters())
    pruner.shrink()
    shrunk = model(images)
    assert torch.allclose(shrunk, masked, atol=1e-5), (shrunk - masked).abs().max()
    assert sum(p.numel() for p in model.parameters()) < 0.5 * params_before
    assert not any(CHANNEL_MASK in m._buffers for m in model.modules())
    assert pruner.size()["macs"] < 0.5 * pruner.before["macs"]


def test_kept_channels_are_multiples_of_round_to_and_respect_the_minimum():
    assert kept_channels(64, 0.5, 8, 8) == 32
    assert kept_channels(64, 0.6, 8, 8) == 24  # 25.6 -> 24
    assert kept_channels(24, 0.9, 8, 16) == 16  # the minimum wins over the ratio
    assert kept_channels(8, 0.5, 8, 8) == 8  # at the minimum already: left whole
    assert kept_channels(64, 0.0, 8, 8) == 64

    torch.manual_seed(0)
    model = MobileNetLite(stem_channels=16, blocks=((40, 1), (64, 2)))
    pruner = pruned(model, final=0.75, min_channels=16)
    pruner.shrink()
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            assert module.out_channels % 8 == 0 and module.out_channels >= 16, module
    assert model.classifier.out_features == 10  # the classifier's outputs are never pruned


def test_masks_grow_gradually_and_zero_whole_channels_with_their_batchnorm():
    torch.manual_seed(0)
    model = tiny_mobilenet()
    pruner = ChannelPruner(PolynomialDecay(final_sparsity=0.5, begin_step=0, end_step=8, frequency=2))
    pruner.prepare(model, EXAMPLE)
    removed = []
    for step in range(9):
        pruner.step(step)
        removed.append(pruner.channel_ratio()["overall"])
    assert removed == sorted(removed) and removed[0] == 0.0 and removed[-1] == pytest.approx(0.5)
    root = next(iter(pruner.groups))
    gone = ~pruner.mask(root)
    for member in pruner.groups[root].group.members:
        if member.out:
            rows = member.module.weight[[c for c, r in zip(member.channels, member.root_channels) if gone[r]]]
            assert torch.count_nonzero(rows) == 0, member.name


def test_a_group_that_masking_cannot_remove_exactly_is_left_alone_with_a_warning():
    torch.manual_seed(0)
    model = SigmoidGateNet()
    with pytest.warns(UserWarning, match="leaves group 'gate.0' alone.*masking is not removal"):
        pruner = pruned(model)
    assert "gate.0" in pruner.skipped and pruner.groups
    pruner.shrink()
    assert model.gate[0].out_channels == 32  # untouched
    assert model.out[0].out_channels == 16


def test_shrunk_state_dict_loads_into_a_fresh_model_and_gives_the_same_outputs():
    torch.manual_seed(0)
    model = randomize_batchnorm(TinyResNet()).eval()
    pruned(model).shrink()
    state = model.state_dict()
    assert PLAN_KEY in state
    images = torch.randn(4, 1, 28, 28)

    torch.manual_seed(1)
    fresh = TinyResNet().eval()
    ChannelPruner(schedule()).prepare(fresh, EXAMPLE)
    fresh.load_state_dict(state)  # the plan rebuilds the smaller structure before the weights load
    assert torch.equal(fresh(images), model(images))

    with pytest.raises(RuntimeError, match="size mismatch|Unexpected key"):
        TinyResNet().load_state_dict(state)  # without the pruner, the original class does not fit


def test_shrink_hands_the_optimizer_the_new_parameters_with_sliced_state_and_slices_unstructured_masks():
    torch.manual_seed(0)
    model = tiny_mobilenet()
    unstructured = MagnitudePruner(PolynomialDecay(final_sparsity=0.5, begin_step=0, end_step=1, frequency=1),
                                   selection=LayerSelection(min_params=100))
    unstructured.prepare(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    optimizer.step()
    unstructured.step(1)
    pruner = pruned(model)
    loss = model(torch.randn(4, 1, 28, 28)).sum()  # a graph still alive across the shrink, as in a training loop
    pruner.shrink([optimizer])
    assert [id(p) for p in model.parameters()] == [id(p) for group in optimizer.param_groups for p in group["params"]]
    del loss
    for p in model.parameters():
        for value in optimizer.state[p].values():
            if value.dim():
                assert value.shape == p.shape
    for layer in unstructured.layers.values():
        assert layer.mask.shape == layer.module.weight.shape
        assert torch.equal(layer.module.weight != 0, layer.module.weight.ne(0) & layer.mask)
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    optimizer.step()  # trains on after the shrink
    unstructured.apply_masks()


def test_invalid_arguments_say_what_to_change():
    with pytest.raises(SparseliteError, match="importance='l3'"):
        ChannelPruner(schedule(), importance="l3")
    with pytest.raises(SparseliteError, match="round_to=0"):
        ChannelPruner(schedule(), round_to=0)
    with pytest.raises(SparseliteError, match="exclude pattern 'nope' matches no layer"):
        ChannelPruner(schedule(), exclude=["nope"]).prepare(tiny_mobilenet(), EXAMPLE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SparseliteError, match="no group it can prune"):
            ChannelPruner(schedule(), min_channels=4096).prepare(tiny_mobilenet(), EXAMPLE)


def test_excluded_layers_keep_their_channels():
    torch.manual_seed(0)
    model = tiny_mobilenet()
    pruner = pruned(model, exclude=["features\\.2\\.0"])
    pruner.shrink()
    assert model.features[2][0].out_channels == 16
    assert model.features[4][0].out_channels == 16  # 32 -> 16
    assert MASK_BUFFER not in model.features[2][0]._buffers


@pytest.mark.slow
@pytest.mark.parametrize("family", ["resnet_residual_add", "inception_concat"])
def test_shrunk_residual_and_concat_nets_export_to_int8(tmp_path, family, fmnist_train):
    from sparselite.export.tflite import export_tflite

    torch.manual_seed(0)
    model = randomize_batchnorm(FAMILIES[family]()).eval()
    pruned(model).shrink()
    images = fmnist_train[0]
    report = export_tflite(model, images[:1], tmp_path / "model.tflite", calibration_data=[images[:64]],
                           verify_data=[images[64:128]], min_agreement=0.9)
    # Beyond the gate's batch: the shrunk model and its file agree on images neither saw before.
    from sparselite.runtime.litert import LiteRTModel

    unseen = images[128:256]
    with torch.no_grad():
        expected = model(unseen).argmax(1).numpy()
    assert (LiteRTModel(tmp_path / "model.tflite")(unseen.numpy()).argmax(1) == expected).mean() >= 0.9
    assert report.parity.examples == 64
