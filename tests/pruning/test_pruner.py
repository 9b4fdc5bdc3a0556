"""MagnitudePruner on a plain nn.Module (no Lightning): selection, exact zeros under optimizers, overrides, policy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_mobilenet
from sparselite.errors import SparseliteError
from sparselite.pruning.pruner import MASK_BUFFER, MagnitudePruner
from sparselite.pruning.schedule import PolynomialDecay
from sparselite.pruning.selection import LayerSelection

POINTWISE = ["features.2.0", "features.4.0"]


def make_pruner(final=0.8, begin=0, end=4, frequency=1, **kwargs) -> MagnitudePruner:
    """A pruner on a short schedule; selection keywords (include, min_params, ...) go to LayerSelection."""
    selection = {key: kwargs.pop(key) for key in ("include", "exclude", "skip_depthwise", "min_params", "policy") if key in kwargs}
    selection.setdefault("min_params", 100)
    schedule = PolynomialDecay(final_sparsity=final, begin_step=begin, end_step=end, frequency=frequency)
    return MagnitudePruner(schedule, selection=LayerSelection(**selection), **kwargs)


def train_steps(model, pruner, optimizer, data, steps, start=0, apply=True):
    images, labels = data
    for step in range(start, start + steps):
        pruner.step(step)
        x, y = images[(step % 8) * 32 : (step % 8 + 1) * 32], labels[(step % 8) * 32 : (step % 8 + 1) * 32]
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if apply:
            pruner.apply_masks()


def test_default_selection_skips_depthwise_and_small_layers(tiny_model):
    layers = make_pruner().prepare(tiny_model)
    # stem (72 weights) < min_params, depthwise convs skipped; 1x1 convs (128, 512) and classifier (320) kept.
    assert list(layers) == ["features.2.0", "features.4.0", "classifier"]
    for name in layers:
        mask = getattr(tiny_model.get_submodule(name), MASK_BUFFER)
        assert mask.dtype == torch.bool and mask.shape == tiny_model.get_submodule(name).weight.shape and bool(mask.all())
    assert MASK_BUFFER not in dict(tiny_model.get_submodule("features.1.0").named_buffers())


def test_min_params_default_skips_all_tiny_layers_with_a_clear_error(tiny_model):
    with pytest.raises(SparseliteError, match="no layer was selected"):
        make_pruner(min_params=1024).prepare(tiny_model)


def test_skip_depthwise_false_and_explicit_include(tiny_model):
    layers = make_pruner(skip_depthwise=False, min_params=0).prepare(tiny_model)
    assert "features.1.0" in layers and "features.3.0" in layers and "features.0.0" in layers
    model = tiny_mobilenet()
    # An explicit include overrides the default skips (depthwise, min_params).
    assert list(make_pruner(include=[r"features\.1\.0"], min_params=1024).prepare(model)) == ["features.1.0"]


def test_include_and_exclude_regexes(tiny_model):
    layers = make_pruner(include=[r"features\.\d\.0"], exclude=[r"features\.2\.0"]).prepare(tiny_model)
    assert list(layers) == ["features.0.0", "features.1.0", "features.3.0", "features.4.0"]
    model = tiny_mobilenet()
    assert list(make_pruner(exclude=["classifier"]).prepare(model)) == POINTWISE


@pytest.mark.parametrize("kind", ["include", "exclude"])
def test_regex_matching_nothing_is_an_error(tiny_model, kind):
    with pytest.raises(SparseliteError, match="matches no module") as info:
        make_pruner(**{kind: [r"features\.9"]}).prepare(tiny_model)
    assert str(info.value).startswith(f"{kind} pattern 'features\\.9'")
    assert "features.0.0" in str(info.value)  # it shows what names look like


def test_invalid_regex_and_scope_are_errors(tiny_model):
    with pytest.raises(SparseliteError, match="not a valid regular expression"):
        make_pruner(include=["features.(("]).prepare(tiny_model)
    with pytest.raises(SparseliteError, match="scope='channel'"):
        make_pruner(scope="channel")
    with pytest.raises(SparseliteError, match="unknown pruning pattern"):
        make_pruner(pattern="dense")


@pytest.mark.parametrize(
    "optimizer_factory",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
    ],
    ids=["sgd_momentum_wd", "adamw"],
)
def test_pruned_weights_stay_exactly_zero_under_optimizers(tiny_model, fmnist_train, optimizer_factory):
    pruner = make_pruner(final=0.7, begin=2, end=6, frequency=2)
    pruner.prepare(tiny_model)
    optimizer = optimizer_factory(tiny_model.parameters())
    # Dense steps first, so the optimizer state (momentum, Adam moments) is non-zero for every weight.
    train_steps(tiny_model, pruner, optimizer, fmnist_train, steps=12)
    for name, layer in pruner.layers.items():
        weight = layer.module.weight
        assert torch.equal(weight[~layer.mask], torch.zeros_like(weight[~layer.mask])), name
        assert float((~layer.mask).float().mean()) == pytest.approx(0.7, abs=1e-2)
    assert pruner.sparsity()["overall"] == pytest.approx(0.7, abs=1e-2)
    # The optimizer alone would revive pruned weights: this is what apply_masks() is there for.
    train_steps(tiny_model, pruner, optimizer, fmnist_train, steps=1, start=12, apply=False)
    revived = sum(int((l.module.weight[~l.mask] != 0).sum()) for l in pruner.layers.values())
    assert revived > 0


def test_masks_only_grow(tiny_model, fmnist_train):
    pruner = make_pruner(final=0.9, begin=0, end=10, frequency=2)
    pruner.prepare(tiny_model)
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=0.1, momentum=0.9)
    previous = {n: l.mask.clone() for n, l in pruner.layers.items()}
    updates = 0
    for step in range(12):
        train_steps(tiny_model, pruner, optimizer, fmnist_train, steps=1, start=step)
        for name, layer in pruner.layers.items():
            assert not bool((layer.mask & ~previous[name]).any()), f"{name} revived a pruned weight at step {step}"
            updates += int(not torch.equal(layer.mask, previous[name]))
            previous[name] = layer.mask.clone()
    assert updates >= 6
    assert pruner.last_update_step == 10
    for layer in pruner.layers.values():
        assert float((~layer.mask).float().mean()) == pytest.approx(0.9, abs=1e-2)


def test_step_off_schedule_changes_nothing(tiny_model):
    pruner = make_pruner(begin=10, end=20, frequency=5)
    pruner.prepare(tiny_model)
    assert pruner.step(3) is False
    assert pruner.last_update_step is None
    assert all(bool(l.mask.all()) for l in pruner.layers.values())
    assert pruner.step(10) is True and pruner.last_update_step == 10


def test_step_before_prepare_raises():
    with pytest.raises(RuntimeError, match="prepare"):
        make_pruner().step(0)


def test_per_layer_overrides(tiny_model):
    pruner = make_pruner(
        final=0.8, overrides={"classifier": {"final_sparsity": 0.5}, r"features\.4\.0": {"pattern": "1x16"}}
    )
    pruner.prepare(tiny_model)
    pruner.step(4)
    sparsity = pruner.sparsity()
    assert sparsity["classifier"] == pytest.approx(0.5)
    assert sparsity["features.2.0"] == round(0.8 * 128) / 128
    assert sparsity["features.4.0"] == round(0.8 * 32) / 32  # 1x16 on a 32x16 1x1 conv: 26 of 32 blocks
    blocks = pruner.layers["features.4.0"].mask.reshape(32, 16)  # 1x1 conv: [out, in]; 1x16 = one whole row
    assert torch.equal(blocks.amin(1), blocks.amax(1))
    assert str(pruner.layers["features.2.0"].pattern) == "unstructured"


def test_bad_overrides_are_errors(tiny_model):
    with pytest.raises(SparseliteError, match="override 'head' matches no pruned layer"):
        make_pruner(overrides={"head": {"final_sparsity": 0.5}}).prepare(tiny_model)
    with pytest.raises(SparseliteError, match=r"unknown keys \['sparsity'\]"):
        make_pruner(overrides={"classifier": {"sparsity": 0.5}})
    with pytest.raises(SparseliteError, match="unknown pruning pattern"):
        make_pruner(overrides={"classifier": {"pattern": "3-4"}})


def test_pattern_that_does_not_tile_a_layer_is_rejected_at_prepare(tiny_model):
    # features.2.0 is 16x8 (1x1): 8 input channels are not a multiple of 16.
    with pytest.raises(SparseliteError, match="block 1x16 does not tile layer 'features.2.0'"):
        make_pruner(pattern="1x16").prepare(tiny_model)


def test_n_m_needs_matching_final_sparsity(tiny_model):
    with pytest.raises(SparseliteError, match="set final_sparsity to 0.5"):
        make_pruner(pattern="2:4", final=0.8).prepare(tiny_model)
    pruner = make_pruner(pattern="2:4", final=0.5)
    pruner.prepare(tiny_model)
    pruner.step(4)
    for layer in pruner.layers.values():
        from sparselite.pruning.masks import to_tflite_2d

        assert int(to_tflite_2d(layer.mask.int()).reshape(-1, 4).sum(1).max()) <= 2


def test_global_scope_shares_one_threshold(tiny_model):
    with torch.no_grad():
        tiny_model.classifier.weight.mul_(10.0)  # much larger weights: a global threshold spares them
    pruner = make_pruner(final=0.6, scope="global")
    pruner.prepare(tiny_model)
    before = {n: l.module.weight.detach().clone() for n, l in pruner.layers.items()}
    pruner.step(4)
    sparsity = pruner.sparsity()
    assert sparsity["overall"] == pytest.approx(0.6, abs=1e-3)
    assert sparsity["classifier"] < 0.5 < sparsity["features.2.0"]
    pruned_max = max(float(before[n][~l.mask].abs().max()) for n, l in pruner.layers.items())
    kept_min = min(float(before[n][l.mask].abs().min()) for n, l in pruner.layers.items())
    assert pruned_max <= kept_min


def test_state_dict_round_trip(tiny_model):
    pruner = make_pruner()
    pruner.prepare(tiny_model)
    pruner.step(2)
    state = pruner.state_dict()
    assert state == {"last_update_step": 2}
    assert f"classifier.{MASK_BUFFER}" in tiny_model.state_dict()
    other = make_pruner()
    other.load_state_dict(state)
    assert other.last_update_step == 2


def test_state_dict_of_older_checkpoints_still_loads():
    """Checkpoints written before the write-only entries were dropped carry "config" and "layers"."""
    pruner = make_pruner()
    pruner.load_state_dict({"config": {"final_sparsity": 0.8}, "last_update_step": 5, "layers": ["classifier"]})
    assert pruner.last_update_step == 5


def test_xnnpack_latency_policy_rejects_a_non_conforming_model(tiny_model):
    # The stem runs over 1 input channel: XNNPACK's sparse path needs a 3-channel 3x3 stride-2 stem.
    with pytest.raises(SparseliteError, match=r"first conv 'features\.0\.0' must be 3x3, stride 2, over 3 input channels"):
        make_pruner(policy="xnnpack_latency").prepare(tiny_model)


def test_xnnpack_latency_policy_rejects_a_dense_3x3_conv_in_the_trunk():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 16, 3, 1, 1), nn.AdaptiveAvgPool2d(1))
    with pytest.raises(SparseliteError, match="conv '1' is neither 1x1 nor depthwise"):
        make_pruner(policy="xnnpack_latency").prepare(model)


def test_xnnpack_latency_policy_selects_only_1x1_convs():
    torch.manual_seed(0)
    model = tiny_mobilenet(in_channels=3)
    layers = make_pruner(policy="xnnpack_latency", min_params=0).prepare(model)
    assert list(layers) == POINTWISE


def test_unknown_policy_is_an_error_at_construction():
    with pytest.raises(SparseliteError, match="unknown layer policy 'fast'"):
        make_pruner(policy="fast")


@pytest.mark.parametrize("overrides, message", [
    ({"features.*": "abc"}, "override 'features.*' is 'abc'"),
    ({"features.*": None}, "override 'features.*' is None"),
    ({"features.*": {"final_sparsity": None}}, "final_sparsity=None"),
    ({"features.*": {"final_sparsity": float("nan")}}, "final_sparsity=nan"),
    ({"features.*": {"pattern": None}}, "pattern=None"),
    (["features.*"], "must map a layer-name regex"),
])
def test_malformed_overrides_are_refused_at_construction(overrides, message):
    with pytest.raises(SparseliteError, match=message.replace("*", r"\*").replace("(", r"\(")):
        MagnitudePruner(PolynomialDecay(), overrides=overrides)
