"""QuantizationSimulator without Lightning: where ranges are taken, phases, strip, and BN folding vs int8 weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_mobilenet
from sparselite.errors import SparseliteError
from sparselite.quantization.fake_quant import LEARNED_RANGE_ATTR, ActivationFakeQuant, WeightFakeQuant
from sparselite.quantization.fusion import FusedChain, find_fused_chains, fold_batchnorm
from sparselite.quantization.qat import QuantizationSimulator, learned_ranges, strip_fake_quant
from sparselite.quantization.int8_rounding import mean_on_input_grid, window_sizes
from sparselite.quantization.spec import (
    SCALE_EPS, activation_qparams, average_as_depthwise, batchnorm_fold_factor, quantize_weight, weight_scales,
)

RELU6_CHAINS = ["features.0.0", "features.1.0", "features.2.0", "features.3.0", "features.4.0"]


def train(model, simulator, data, steps, start=0, lr=0.05):
    images, labels = data
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for step in range(start, start + steps):
        model.train()
        if simulator is not None:
            simulator.step(step)
        i = step % 16
        loss = F.cross_entropy(model(images[i * 64 : (i + 1) * 64]), labels[i * 64 : (i + 1) * 64])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_fused_chains_of_mobilenet(tiny_model):
    chains = find_fused_chains(tiny_model)
    assert chains[0] == FusedChain("features.0.0", "features.0.1", "features.0.2")
    assert [c.producer for c in chains] == RELU6_CHAINS + ["classifier"]
    assert chains[-1] == FusedChain("classifier", None, None)
    assert chains[0].output_module == "features.0.2" and chains[-1].output_module == "classifier"


class _ShapeBranching(nn.Module):
    """A block fx cannot trace as a whole (control flow on a shape, as attention blocks that fold patches
    have), with traceable children: a conv chain, and a conv whose output leaves its child."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 1))
        self.norm = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.stem(x)
        if x.shape[-1] % 2:  # fx cannot branch on a traced size
            x = F.pad(x, (0, 1, 0, 1))
        y = self.branch(x)
        return self.norm(y) + y


def test_chains_inside_the_children_of_a_block_fx_cannot_trace():
    model = _ShapeBranching().eval()
    chains = find_fused_chains(model)
    assert FusedChain("stem.0", "stem.1", "stem.2") in chains
    # branch.0's output leaves its child, to the norm and to the add: no fold, the norm heads its own chain
    assert FusedChain("branch.0", None, None) in chains and FusedChain("norm", None, None) in chains
    for bn in (model.stem[1], model.norm):  # statistics of a trained norm, so the fold changes the weights
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    images = torch.randn(2, 3, 9, 9)
    expected = model(images)
    fold_batchnorm(model, chains)
    assert isinstance(model.stem[1], nn.Identity) and isinstance(model.norm, nn.BatchNorm2d)
    torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-5)


def test_prepare_attaches_fake_quant(tiny_model):
    simulator = QuantizationSimulator()
    chains = simulator.prepare(tiny_model)
    assert len(chains) == 6
    for chain in chains:
        producer = tiny_model.get_submodule(chain.producer)
        assert isinstance(producer, (nn.Conv2d, nn.Linear)) and type(producer) not in (nn.Conv2d, nn.Linear)
        assert isinstance(producer.sparselite_weight_quant, WeightFakeQuant)
        assert isinstance(producer.sparselite_output_quant, ActivationFakeQuant)
    assert isinstance(tiny_model.sparselite_input_quant, ActivationFakeQuant)
    assert learned_ranges(tiny_model) == {}  # nothing observed yet
    assert simulator.prepare(tiny_model) is chains  # idempotent


def test_ranges_are_observed_after_the_fused_activation(tiny_model, fmnist_train):
    simulator = QuantizationSimulator(averaging_constant=0.2)
    simulator.prepare(tiny_model)
    # What a pre-activation range would see: BN outputs are negative as well.
    bn_min = {}
    hooks = [tiny_model.get_submodule(f"features.{i}.1").register_forward_hook(
        lambda m, a, out, i=i: bn_min.__setitem__(i, min(bn_min.get(i, 0.0), float(out.detach().min())))) for i in range(5)]
    train(tiny_model, simulator, fmnist_train, steps=6)
    for hook in hooks:
        hook.remove()
    assert all(value < 0 for value in bn_min.values())
    ranges = learned_ranges(tiny_model)
    assert set(ranges) == {""} | set(RELU6_CHAINS) | {"classifier"}
    for name in RELU6_CHAINS:
        lo, hi = ranges[name]
        assert lo == 0.0 and 0.0 < hi <= 6.0, (name, lo, hi)
    lo, hi = ranges["classifier"]  # logits: no activation, both signs
    assert lo < 0.0 < hi
    lo, hi = ranges[""]  # the normalized input
    assert lo == pytest.approx(-0.2860 / 0.3530, abs=1e-4) and hi > 2.0


def test_before_begin_step_the_model_is_float(tiny_model, fmnist_train):
    reference = copy.deepcopy(tiny_model).eval()
    simulator = QuantizationSimulator(begin_step=10)
    simulator.prepare(tiny_model)
    simulator.step(9)
    tiny_model.train()
    tiny_model(fmnist_train[0][:32])
    assert learned_ranges(tiny_model) == {}
    x = fmnist_train[0][:16]
    tiny_model.eval()
    reference.load_state_dict({k: v for k, v in tiny_model.state_dict().items() if "sparselite" not in k})
    assert torch.equal(tiny_model(x), reference(x))
    simulator.step(10)
    tiny_model.train()
    tiny_model(x)
    tiny_model.eval()
    assert len(learned_ranges(tiny_model)) == 7
    assert not torch.equal(tiny_model(x), reference(x))


def test_freeze_step_stops_range_updates_and_keeps_batchnorm_training(tiny_model, fmnist_train):
    simulator = QuantizationSimulator(begin_step=0, freeze_step=4, averaging_constant=0.5)
    simulator.prepare(tiny_model)
    train(tiny_model, simulator, fmnist_train, steps=4)
    ranges_before = learned_ranges(tiny_model)
    bn = tiny_model.get_submodule("features.2.1")
    tracked_before = int(bn.num_batches_tracked)
    weight_before = tiny_model.get_submodule("features.2.0").weight.detach().clone()
    train(tiny_model, simulator, fmnist_train, steps=4, start=4)  # calls model.train() before each step
    assert learned_ranges(tiny_model) == ranges_before
    # BN keeps normalizing with batch statistics (and tracking them) until export folds it.
    assert bn.training and int(bn.num_batches_tracked) == tracked_before + 4
    assert not torch.equal(tiny_model.get_submodule("features.2.0").weight, weight_before)  # still training
    assert all(q.enabled and not q.observing for q in tiny_model.modules() if isinstance(q, ActivationFakeQuant))


def test_ranges_keep_moving_without_freeze(tiny_model, fmnist_train):
    simulator = QuantizationSimulator(begin_step=0, averaging_constant=0.5)
    simulator.prepare(tiny_model)
    train(tiny_model, simulator, fmnist_train, steps=3)
    before = learned_ranges(tiny_model)
    train(tiny_model, simulator, fmnist_train, steps=2, start=3)
    assert learned_ranges(tiny_model) != before


def test_strip_restores_plain_classes_and_removes_hooks(fmnist_train):
    from model_blocks import InvertedResidualNet

    torch.manual_seed(0)
    model = InvertedResidualNet()
    float_keys = set(model.state_dict())
    simulator = QuantizationSimulator()
    simulator.prepare(model, (fmnist_train[0][:1],))  # functional-op sites too: the residual adds
    assert simulator.op_sites == ["sparselite_op_quant.block1/add_0", "sparselite_op_quant.block2/add_0"]
    train(model, simulator, fmnist_train, steps=2)
    assert any(len(m._forward_hooks) for m in model.modules())
    strip_fake_quant(model)
    for name, module in model.named_modules():
        assert "sparselite_" not in name
        assert not module._forward_hooks and not module._forward_pre_hooks, name
        assert not module._load_state_dict_pre_hooks, name
    assert type(model.stem[0]) is nn.Conv2d and type(model.classifier) is nn.Linear
    assert set(model.state_dict()) == float_keys
    torch.manual_seed(0)
    fresh = InvertedResidualNet()
    fresh.load_state_dict(model.state_dict())
    x = fmnist_train[0][:8]
    assert torch.equal(model.eval()(x), fresh.eval()(x))


class _DenseBlock(nn.ModuleDict):
    """DenseNet's block: a container whose forward runs each of its children on the concatenation of
    everything before it."""

    def __init__(self) -> None:
        super().__init__({f"layer{i}": nn.Sequential(nn.Conv2d(4 + 4 * i, 4, 3, padding=1), nn.ReLU()) for i in range(2)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class _DenseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, stride=2)
        self.block = _DenseBlock()
        self.head = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_containers_that_run_their_children_run_only_the_models_own(fmnist_train):
    """The concatenations' fake-quants sit in the root's registry, not in the container whose forward
    calls them: there, the container's loop would run one as a layer (DenseNet failed so)."""
    torch.manual_seed(0)
    model = _DenseNet()
    simulator = QuantizationSimulator()
    simulator.prepare(model, (fmnist_train[0][:1],))
    # The first layer's concatenation of the block input alone is that input: no call site.
    assert simulator.op_sites == [f"sparselite_op_quant.block/cat_{i}" for i in range(2)]
    assert set(model.block.keys()) == {"layer0", "layer1"}
    train(model, simulator, fmnist_train, steps=2)
    assert set(learned_ranges(model)) >= set(simulator.op_sites)


def test_strip_fake_quant_works_on_a_deep_copy(tiny_model, fmnist_train):
    simulator = QuantizationSimulator()
    simulator.prepare(tiny_model)
    train(tiny_model, simulator, fmnist_train, steps=1)
    clone = copy.deepcopy(tiny_model)
    assert learned_ranges(clone) == learned_ranges(tiny_model)
    strip_fake_quant(clone)
    assert learned_ranges(clone) == {}
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in clone.modules())
    assert type(clone.classifier) is nn.Linear
    assert len(learned_ranges(tiny_model)) == 7  # the original keeps its fake-quant


def test_invalid_arguments_and_models():
    with pytest.raises(SparseliteError, match="begin_step=-1"):
        QuantizationSimulator(begin_step=-1)
    with pytest.raises(SparseliteError, match="freeze_step=5 must be after begin_step=5"):
        QuantizationSimulator(begin_step=5, freeze_step=5)
    with pytest.raises(SparseliteError, match="averaging_constant=0"):
        QuantizationSimulator(averaging_constant=0)
    with pytest.raises(SparseliteError, match="no nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d/2d or nn.Linear"):
        QuantizationSimulator().prepare(nn.Sequential(nn.ReLU(), nn.Flatten()))


def folded_int8_matches(model: nn.Module) -> tuple[int, int, int]:
    """(mismatched int8 weights, weights compared, channels whose folded scale sits on the eps floor)."""
    model = copy.deepcopy(model).eval()
    strip_fake_quant(model)  # as export does: fold the float model
    chains = [c for c in find_fused_chains(model) if c.batchnorm]
    unfolded = {c.producer: model.get_submodule(c.producer).weight.detach().clone() for c in chains}
    signs = {c.producer: torch.sign(model.get_submodule(c.batchnorm).weight.detach()) for c in chains}
    factors = {c.producer: batchnorm_fold_factor(model.get_submodule(c.batchnorm)) for c in chains}
    fold_batchnorm(model, chains)
    mismatches = total = floored = 0
    for chain in chains:
        folded = model.get_submodule(chain.producer).weight.detach()
        q_train = quantize_weight(unfolded[chain.producer], factors[chain.producer]).int() * signs[chain.producer].reshape(-1, 1, 1, 1).int()
        q_export = quantize_weight(folded).int()
        mismatches += int((q_train != q_export).sum())
        total += q_train.numel()
        floored += int((weight_scales(folded) <= SCALE_EPS).sum())
    return mismatches, total, floored


def test_bn_folding_changes_no_int8_weight(fmnist_train):
    """Per-channel symmetric int8 is invariant to BN's per-channel factor gamma / sqrt(var + eps): the
    weights exported after folding are the ones QAT trained with (a negative gamma flips their sign)."""
    torch.manual_seed(0)
    model = tiny_mobilenet()
    simulator = QuantizationSimulator(averaging_constant=0.1)
    simulator.prepare(model)
    train(model, simulator, fmnist_train, steps=12)
    with torch.no_grad():
        bn = model.get_submodule("features.2.1")
        bn.weight[3] = -abs(float(bn.weight[3])) - 0.5
        model.get_submodule("features.0.1").weight[1] *= -1.0
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(int(b.num_batches_tracked) == 12 for b in bns)
    assert any(float((b.running_var - 1).abs().max()) > 0.1 for b in bns)  # non-trivial statistics
    assert any(float((b.weight - 1).abs().max()) > 0.01 for b in bns)
    assert sum(int((b.weight < 0).sum()) for b in bns) >= 2
    mismatches, total, floored = folded_int8_matches(model)
    assert floored == 0, "a folded channel reached the 2**-12 scale floor; that case has its own test below"
    assert total == 72 + 72 + 128 + 144 + 512
    assert mismatches == 0


def _trained_chain(fmnist_train):
    """A tiny MobileNet after 12 QAT steps, and one of its conv -> BN -> ReLU6 chains (BN gain negative
    in one channel)."""
    torch.manual_seed(0)
    model = tiny_mobilenet()
    simulator = QuantizationSimulator(averaging_constant=0.1)
    simulator.prepare(model)
    train(model, simulator, fmnist_train, steps=12)
    conv, bn = model.get_submodule("features.2.0"), model.get_submodule("features.2.1")
    with torch.no_grad():
        bn.weight[3] = -abs(float(bn.weight[3])) - 0.5
    return model, conv, bn


def test_eval_mode_computes_a_conv_chain_as_the_int8_file_does(fmnist_train):
    """In eval mode a conv -> BN chain outputs the value the file holds: the int8 input times the folded
    conv's int8 weights, summed exactly, plus the folded bias on the int32 grid input scale x weight
    scale, requantized with XNNPACK's float32 multiplier onto the output's grid. Float sums and a float
    BN land between grid values (off the file by a rounding here and there, which deep nets carry on)."""
    model, conv, bn = _trained_chain(fmnist_train)
    seen = {}
    conv.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    bn.register_forward_hook(lambda m, args, out: seen.update(out=out.clone()))  # before an in-place ReLU
    with torch.no_grad():
        model.eval()(fmnist_train[0][:8])
    x = seen["x"]
    input_scale, _ = activation_qparams(*getattr(x, LEARNED_RANGE_ATTR))
    output_scale, output_zero_point = conv.sparselite_output_quant.qparams()
    gain = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    folded_weight = conv.weight.detach() * gain.reshape(-1, 1, 1, 1)
    weight_scale = weight_scales(folded_weight)
    int8_weight = torch.round(folded_weight / weight_scale.reshape(-1, 1, 1, 1)).double()
    int32_bias = torch.round((bn.bias.detach() - bn.running_mean * gain).double() / (input_scale * weight_scale).double())
    sums = F.conv2d(torch.round(x / input_scale).double(), int8_weight, int32_bias, conv.stride, conv.padding,
                    conv.dilation, conv.groups)
    multiplier = (input_scale * weight_scale / output_scale).float().reshape(-1, 1, 1)
    q = torch.round(sums.float() * multiplier).clamp(-128 - output_zero_point, 127 - output_zero_point)
    file = q * output_scale
    assert float((seen["out"] - file).abs().max()) <= float(output_scale) * 1e-4
    unrounded = sums.float() * multiplier * output_scale
    assert float((seen["out"] - unrounded).abs().max()) > float(output_scale) / 10  # the rounding is there to see
    model.train()
    with torch.no_grad():
        model(fmnist_train[0][:8])
    assert float((seen["out"] - file).abs().max()) > float(output_scale)  # training: batch statistics, no fold


def test_eval_mode_passes_gradients_straight_through_the_int8_arithmetic(fmnist_train):
    """With gradients on in eval mode (saliency, adversarial examples), the values are still the file's
    and the gradient is the float layer's."""
    model, conv, bn = _trained_chain(fmnist_train)
    model.eval()
    images = fmnist_train[0][:8]
    with torch.no_grad():
        expected = model(images)
    inputs = images.clone().requires_grad_(True)
    out = model(inputs)
    out.sum().backward()
    assert torch.equal(out.detach(), expected)
    assert inputs.grad is not None and float(inputs.grad.abs().sum()) > 0
    assert conv.weight.grad is not None and float(conv.weight.grad.abs().sum()) > 0


def test_the_simulators_own_arithmetic_is_no_call_site(fmnist_train):
    """The eval-mode int8 arithmetic of a conv and of a BatchNorm that follows no conv runs adds and
    muls inside the model's forward: the op-sites mode must not take them for the model's own, or it
    gives them fake-quants (it did, for the BN's gain and shift) that round the simulator's sums."""
    torch.manual_seed(0)
    model = Wrapped(nn.Sequential(nn.Conv2d(1, 8, 3, 2), nn.ReLU(), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)))
    simulator = QuantizationSimulator(averaging_constant=0.1)
    images = fmnist_train[0][:64]
    assert FusedChain("body.2", None, "body.3") in find_fused_chains(model)  # a BN that follows no conv
    simulator.prepare(model, (images[:1],))
    train(model, simulator, fmnist_train, steps=4)
    with torch.no_grad():
        model.eval()(images)
    assert simulator.op_sites == [], simulator.op_sites  # the model calls no add, mul or cat of its own
    assert "sparselite_op_quant" not in dict(model.named_children())


def test_a_layer_read_only_by_a_concatenation_is_computed_on_the_concatenations_grid(fmnist_train):
    """The converter writes such a layer (a fire module's expand convs, DenseNet's layers) straight onto
    the concatenation's grid: its eval-mode int8 arithmetic requantizes onto that grid, so what reaches
    the concatenation is already on it."""

    class Fire(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.squeeze = nn.Sequential(nn.Conv2d(1, 4, 3, 2), nn.ReLU())
            self.left = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
            self.right = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            x = self.squeeze(x)
            return self.head(torch.cat([self.left(x), self.right(x)], 1).mean((2, 3)))

    torch.manual_seed(0)
    model = Fire()
    simulator = QuantizationSimulator(averaging_constant=0.1)
    images = fmnist_train[0][:64]
    simulator.prepare(model, (images[:1],))
    train(model, simulator, fmnist_train, steps=4)
    concatenation = model.sparselite_op_quant["cat_0"]
    for branch in (model.left[0], model.right[0]):
        assert branch.sparselite_output_quant.rounded_by_consumer
        assert branch.sparselite_output_quant.consumer_quant is concatenation
    seen = {}
    model.left[2].register_forward_hook(lambda m, args, out: seen.update(left=out.clone()))
    model.right[1].register_forward_hook(lambda m, args, out: seen.update(right=out.clone()))
    with torch.no_grad():
        model.eval()(images)
    scale, _ = concatenation.qparams()
    for value in seen.values():
        steps = value / scale
        assert float((steps - steps.round()).abs().max()) < 1e-3  # on the concatenation's grid already


def test_layers_after_pooling_and_reshapes_find_their_inputs_grid():
    """The int32 bias of a linear after max-pool and flatten is on the grid of the conv chain before them
    (TFLite keeps the scale through both), which training passes on with the tensor."""
    model = Wrapped(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 13 * 13, 3)))
    simulator = QuantizationSimulator()
    example = torch.randn(2, 1, 28, 28)
    simulator.prepare(model, (example,))
    model(example)  # observe ranges
    seen = {}
    model.body[4].register_forward_pre_hook(lambda m, args: seen.update(grid=getattr(args[0], LEARNED_RANGE_ATTR, None)))
    with torch.no_grad():
        model.eval()(example)
    assert seen["grid"] is model.body[0].sparselite_output_quant.min_max


class Wrapped(nn.Module):
    """A root of its own for an nn.Sequential (QAT refuses a Sequential root)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x)


def test_bn_folding_with_a_tiny_bn_factor_changes_no_int8_weight():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)
    with torch.no_grad():
        conv.weight.mul_(0.5)
        bn.running_var.fill_(400.0)  # a large-variance output: factor 1/20
    model = nn.Sequential(conv, bn, nn.ReLU6()).eval()
    mismatches, total, floored = folded_int8_matches(model)
    assert floored > 0
    assert mismatches == 0
    # ...and QAT's weight fake-quant simulates exactly those values: it rounds on the scale that
    # export will use for the folded weight, mapped back through the BN factor.
    QuantizationSimulator().prepare(Wrapped(model))
    quant = model[0].sparselite_weight_quant
    assert quant.batchnorm is model[1]
    scales = weight_scales(model[0].weight, batchnorm_fold_factor(model[1])).reshape(-1, 1, 1, 1)
    simulated = torch.round(quant(model[0].weight) / scales).to(torch.int8)
    assert torch.equal(simulated, quantize_weight(model[0].weight, batchnorm_fold_factor(model[1])))
    assert not torch.equal(simulated, quantize_weight(model[0].weight))  # the eps floor matters here


@pytest.mark.parametrize("start, freeze, expected", [(800, 1100, 0.01), (100, 130, 0.1), (0, 2, 1.0), (50, None, 0.01)])
def test_the_default_averaging_constant_lets_ranges_settle_within_the_qat_window(start, freeze, expected):
    assert QuantizationSimulator(begin_step=start, freeze_step=freeze).averaging_constant == pytest.approx(expected)
    assert QuantizationSimulator(begin_step=start, freeze_step=freeze, averaging_constant=0.3).averaging_constant == 0.3


def test_a_conv_called_twice_gets_one_chain_and_exports(tmp_path):
    """Weight sharing: the same conv applied to two tensors. Its fake-quant serves both calls (no BN or
    activation is fused into it, since each call may be followed by something else)."""
    from sparselite import export_tflite
    from sparselite.quantization.qat import learned_ranges

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.relu = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc((self.relu(self.bn(self.conv(x))) + self.conv(x.flip(-1))).mean((2, 3)))

    torch.manual_seed(0)
    model, x = Shared(), torch.randn(32, 1, 8, 8)
    # The BN after one of the calls follows no conv of its own: a chain of its own (a depthwise conv in the file).
    assert find_fused_chains(model) == [FusedChain("conv", None, None), FusedChain("fc", None, None), FusedChain("bn", None, "relu")]
    QuantizationSimulator().prepare(model, (x[:1],))
    model.train()
    with torch.no_grad():
        model(x)
    report = export_tflite(model.eval(), x[:1], tmp_path / "shared.tflite", calibration_data=[x], verify_data=[x])
    assert report.float_islands == [] and "conv" in learned_ranges(model)


def test_sigmoid_tanh_and_silu_insides_train_on_the_grids_tflite_fixes():
    """LOGISTIC's int8 output is always on a 1/256 grid, TANH's on 1/128, and export writes SiLU as
    x * LOGISTIC(x): QAT rounds there too, so the int8 file and the fake-quant model agree."""

    class Gates(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.silu, self.gate = nn.Conv2d(1, 4, 3, padding=1), nn.SiLU(), nn.Sigmoid()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            y = self.silu(self.conv(x))
            y = y * self.gate(y.mean((2, 3), keepdim=True)) + torch.tanh(y)
            return self.fc(y.mean((2, 3)))

    torch.manual_seed(0)
    model, x = Gates(), torch.randn(8, 1, 6, 6)
    simulator = QuantizationSimulator()
    simulator.prepare(model, (x[:1],))
    seen = {}
    for name in ("silu", "gate"):  # after prepare: these hooks see the fake-quantized outputs
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, (i[0], o)))
    simulator.step(0)
    model.train()
    model(x)
    gate = seen["gate"][1]
    assert torch.equal(gate * 256, torch.round(gate * 256))  # LOGISTIC's grid
    conv_out = seen["silu"][0]
    inner = torch.round(torch.sigmoid(conv_out) * 256) / 256
    silu_quant = getattr(model.silu, "sparselite_output_quant").eval()  # its range as the forward left it
    assert torch.allclose(seen["silu"][1], silu_quant(conv_out * inner))  # x * LOGISTIC(x), then its own range
    simulator.strip()
    assert not any("sparselite" in name for name, _ in model.named_modules())


def test_pooled_means_and_hardswish_insides_train_on_the_grids_export_derives():
    """TFLite's MEAN keeps its input's scale, so a pooled mean is rounded onto that grid; hardswish is
    x * (relu6(x + 3) / 6) with each step on the range export derives from x's learned range."""
    from sparselite.quantization.spec import activation_qparams

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.act, self.pool = nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.Hardswish(), nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.pool(self.act(self.bn(self.conv(x))))

    torch.manual_seed(0)
    model, x = Net(), torch.randn(16, 1, 8, 8)
    simulator = QuantizationSimulator()
    simulator.prepare(model, (x[:1],))
    seen = {}
    for name in ("act", "pool"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, (i[0], o)))
    simulator.step(0)
    model.train()
    model(x)
    model.eval()
    with torch.no_grad():
        model(x)
    scale, zero_point = getattr(model.act, "sparselite_output_quant").qparams()
    pooled = seen["pool"][1] / scale + zero_point
    assert torch.allclose(pooled, torch.round(pooled), atol=1e-3)  # on the hardswish output's grid

    conv_out = seen["act"][0]
    low, high = (min(max(v + 3.0, 0.0), 6.0) for v in getattr(model.conv, "sparselite_output_quant").min_max.tolist())

    def on(values, lo, hi):
        s, z = activation_qparams(torch.tensor(lo), torch.tensor(hi))
        return torch.fake_quantize_per_tensor_affine(values, float(s), int(z), -128, 127)

    inner = conv_out * on(on(torch.clamp(conv_out + 3, 0, 6), low, high) / 6, low / 6, high / 6)
    assert torch.allclose(seen["act"][1], getattr(model.act, "sparselite_output_quant")(inner), atol=1e-6)


def _tied_means(size: int):
    """Values on a grid with an odd zero point, in windows of ``size`` x ``size``: (learned range, scale,
    zero point, x, the exact means of its integers)."""
    learned = (-1.3, 2.9)  # no power-of-two scale (float sums of its multiples are inexact), an odd zero point
    scale, zero_point = activation_qparams(torch.tensor(learned[0]), torch.tensor(learned[1]))
    assert int(zero_point) % 2 == 1
    integers = torch.randint(-128, 128, (64, 256, size, size)) - zero_point  # on the grid, zero point taken out
    exact = integers.sum(dim=(2, 3)).double() / size**2
    return learned, scale, int(zero_point), integers.float() * scale, exact


def test_means_the_file_keeps_round_ties_as_xnnpacks_mean_does():
    """XNNPACK's int8 MEAN averages the integers, adds the zero point and rounds half to even (measured
    on MEANs cut out of files: all ties). The same mean taken in float lands a tie on either side by
    the float error of the sum, so training averages the integers too. A 6x6 window stays a MEAN
    (a depthwise conv's float scale of 1/36 would decide its ties)."""
    torch.manual_seed(0)
    learned, scale, zero_point, x, exact = _tied_means(6)
    assert int((exact - exact.floor() == 0.5).sum()) > 100
    pooled = mean_on_input_grid(torch.mean, (x, (2, 3)), {}, learned)
    xnnpack = torch.round(exact + zero_point) - zero_point
    assert torch.equal(torch.round(pooled.double() / float(scale)), xnnpack)
    assert not torch.equal(torch.round(exact), xnnpack)  # half to even before the zero point: the other way
    assert not torch.equal(torch.round(x.mean(dim=(2, 3)) / scale).double(), xnnpack)  # the float mean


@pytest.mark.parametrize("average, args, kwargs", [
    (torch.mean, ((2, 3),), {}), (torch.Tensor.mean, ((-1, -2),), {"keepdim": True}), (F.adaptive_avg_pool2d, (1,), {}),
    (F.avg_pool2d, (2,), {}), (F.avg_pool2d, ((2, 2), 2, 0), {}),
])
def test_small_windows_round_as_the_depthwise_conv_export_writes_them(average, args, kwargs):
    """Export writes an average over at most 25 values, odd or a power of two in number, as a depthwise
    conv of ones (``export/xnnpack_pool_forms.py``), which rounds the integers' mean half to even, then adds the
    zero point: the tied means of 2x2 windows go the other way from MEAN's."""
    torch.manual_seed(0)
    learned, scale, zero_point, x, exact = _tied_means(2)
    assert int((exact - exact.floor() == 0.5).sum()) > 1000  # a quarter of the means are ties
    pooled = mean_on_input_grid(average, (x, *args), kwargs, learned)
    assert torch.equal(torch.round(pooled.double() / float(scale)).reshape(exact.shape), torch.round(exact))


def test_which_averages_export_writes_as_depthwise_convs():
    x = torch.zeros(1, 4, 6, 6)
    assert [average_as_depthwise(n) for n in (1, 2, 4, 9, 16, 25)] == [True] * 6
    assert [average_as_depthwise(n) for n in (6, 12, 36, 49, 64)] == [False] * 5
    assert int(window_sizes(torch.mean, (x, (2, 3)), {}, x.mean((2, 3)))) == 36
    assert window_sizes(torch.mean, (x, 1), {}, x.mean(1)) is None  # a channel mean: a MEAN over channels
    # Padding left out of the count (SAME), a window ceil_mode cuts short: AVERAGE_POOL_2Ds with other counts.
    assert window_sizes(F.avg_pool2d, (x, 3, 1, 1), {"count_include_pad": False}, x[..., :6, :6]) is None
    assert window_sizes(F.avg_pool2d, (x, 3, 2), {"ceil_mode": True}, F.avg_pool2d(x, 3, 2, ceil_mode=True)) is None
    assert int(window_sizes(F.avg_pool2d, (x, 3, 1, 1), {}, F.avg_pool2d(x, 3, 1, 1))) == 9  # PAD, then VALID
    # An adaptive pool over a map it does not tile (5 -> 3: windows of 2, 3 and 2 pixels): each window's
    # count, as torch's windows have them (which pixels reach each output).
    x = torch.zeros(1, 4, 5, 5)
    counts = window_sizes(F.adaptive_avg_pool2d, (x, 3), {}, F.adaptive_avg_pool2d(x, 3))
    one_pixel_each = torch.eye(25).reshape(25, 1, 5, 5)
    assert torch.equal(counts, (F.adaptive_avg_pool2d(one_pixel_each, 3) > 0).sum(0)[0])
    assert counts.tolist() == [[4, 6, 4], [6, 9, 6], [4, 6, 4]]


def test_a_value_read_only_by_a_concatenation_is_rounded_once_on_its_grid():
    """The converter writes such a value straight onto the concatenation's scale (a fire module's
    expand convs), so training leaves its rounding to the concatenation; a value read elsewhere too
    keeps its own."""

    class Fire(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.squeeze, self.left, self.right = nn.Conv2d(1, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            s = torch.relu(self.squeeze(x))
            right = self.right(s)
            out = torch.cat([self.left(s), right], 1) + right.mean()  # right is read twice
            return self.head(out.mean((2, 3)))

    model = Fire()
    simulator = QuantizationSimulator()
    simulator.prepare(model, (torch.randn(1, 1, 8, 8),))
    assert model.left.sparselite_output_quant.rounded_by_consumer
    assert not model.right.sparselite_output_quant.rounded_by_consumer
    assert not model.squeeze.sparselite_output_quant.rounded_by_consumer
    model.train()
    model(torch.randn(4, 1, 8, 8))  # observe
    model.eval()
    seen = {}
    model.left.register_forward_hook(lambda m, args, out: seen.update(left=out))
    with torch.no_grad():
        model(torch.randn(2, 1, 8, 8))
    assert model.left.sparselite_output_quant.initialized
    scale, zero_point = model.left.sparselite_output_quant.qparams()
    off_grid = seen["left"] / scale + zero_point
    assert not torch.allclose(off_grid, torch.round(off_grid), atol=1e-3)  # not rounded on its own range


def test_a_sequential_root_is_refused_with_what_to_do():
    """QAT adds its input fake-quant as a child of the root; an nn.Sequential would run it as a last layer."""
    with pytest.raises(SparseliteError, match="wrap the nn.Sequential"):
        QuantizationSimulator().prepare(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()))


def test_a_grouped_transposed_conv_keeps_its_batchnorm_apart(tmp_path):
    """Its weight is [in, out / groups, k, k]: the BN after it cannot fold per output channel (torch's
    fold raised at export), so it stays a BN of its own, with its own chain; an ungrouped one folds."""
    from sparselite import export_tflite

    class Upsampler(nn.Module):
        def __init__(self, groups: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, 2, 1)
            self.up = nn.ConvTranspose2d(8, 8, 2, 2, groups=groups, bias=False)
            self.bn = nn.BatchNorm2d(8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(torch.relu(self.bn(self.up(self.conv(x)))).mean((2, 3)))

    assert FusedChain("up", "bn", None) in find_fused_chains(Upsampler(groups=1))
    grouped = Upsampler(groups=8)
    assert FusedChain("bn", None, None) in find_fused_chains(grouped)
    x = torch.randn(16, 1, 8, 8)
    simulator = QuantizationSimulator()
    simulator.prepare(grouped, (x[:1],))
    grouped(x)
    report = export_tflite(grouped.eval(), x[:1], tmp_path / "m.tflite", calibration_data=[x], verify_data=[x], min_agreement=0.0)
    assert report.float_islands == []


class ConcatenatedConvs(nn.Module):
    """Two convs over halves of the stem's output, concatenated into one BN and a ReLU (MixNet's mixed
    convs); ``with_input``: the input joins the concatenation, so the BN reads more than convs."""

    def __init__(self, with_input: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 2), nn.ReLU())
        self.wide, self.narrow = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 10, 1, bias=False)
        self.with_input = with_input
        self.bn, self.relu = nn.BatchNorm2d(16 + 8 * with_input), nn.ReLU()
        self.head = nn.Linear(16 + 8 * with_input, 10)

    def forward(self, x):
        x = self.stem(x)
        a, b = x.chunk(2, 1)
        parts = [self.wide(a), self.narrow(b)] + ([x] if self.with_input else [])
        return self.head(self.relu(self.bn(torch.cat(parts, 1))).mean((2, 3)))


def test_a_norm_after_a_concatenation_of_convs_folds_into_each_convs_slice(fmnist_train):
    """Each conv takes the BN's channels it wrote; its fold is exact, the convs share the BN's range (after
    the ReLU), and the concatenation is no rounding point. A BN that also reads the input stays whole."""
    torch.manual_seed(0)
    assert [c for c in find_fused_chains(ConcatenatedConvs()) if c.batchnorm] == [
        FusedChain("wide", "bn", "relu", None, (0, 6)), FusedChain("narrow", "bn", "relu", None, (6, 16))]
    assert all(c.channels is None for c in find_fused_chains(ConcatenatedConvs(with_input=True)))

    model = ConcatenatedConvs()
    train(model, None, fmnist_train, steps=8)
    images = fmnist_train[0][:64]
    folded = fold_batchnorm(copy.deepcopy(model).eval(), find_fused_chains(model))
    assert isinstance(folded.bn, nn.Identity) and isinstance(folded.relu, nn.Identity)  # each conv clamps its slice
    torch.testing.assert_close(folded(images), model.eval()(images), rtol=1e-4, atol=1e-5)
    assert float(folded.wide(folded.stem(images)[:, :4]).min()) == 0.0

    simulator = QuantizationSimulator(averaging_constant=0.1)
    simulator.prepare(model, (images[:1],))
    train(model, simulator, fmnist_train, steps=4)
    assert model.wide.sparselite_output_quant is model.narrow.sparselite_output_quant
    ranges = learned_ranges(model)
    assert ranges["wide"] == ranges["narrow"] and ranges["wide"][0] >= 0.0  # observed after the ReLU
    assert simulator.op_sites == []  # the concatenation is numbered, not rounded
    assert "sparselite_op_quant" not in dict(model.named_children())
