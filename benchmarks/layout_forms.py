"""What each of export's file rewrites for XNNPACK (``sparselite/export/xnnpack_forms.py``) buys, per precision.

For each rewrite, a small model that has the pattern it targets (random weights: the rewrites leave every
value as it was but the int8 averages' ties, so training would change nothing measured here) is exported twice, in fp32 and in int8
(calibrated), once as export writes it and once with that one rewrite switched off. The four files are
timed interleaved on XNNPACK, 1 thread; the table gives medians, the ratio of each form to its own
precision's old form, and the op types and XNNPACK partitions that differ.

    .venv/bin/python -m benchmarks.layout_forms [--size 128] [--rounds 7] [--rewrites NAME ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks._common import environment, environment_line, fmt, quiet_logs, table, write_json
from sparselite import export_tflite
from sparselite.export import xnnpack_forms
from sparselite.export.conversion import export_float_tflite
from sparselite.runtime.bench import interleaved_benchmark
from sparselite.runtime.litert import xnnpack_delegated_ops
from sparselite.tflite.flatbuffer import builtin_code, builtin_name, read_model


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TopDown(nn.Module):
    """An FPN's top-down path: two nearest 2x upsamplings, each added to the finer map."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = _conv(3, width, 2), _conv(width, width, 2), _conv(width, width, 2)
        self.m2, self.m1, self.head = _conv(width, width), _conv(width, width), nn.Conv2d(width, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1 = self.c1(x)
        c2 = self.c2(c1)
        p2 = self.m2(c2 + F.interpolate(self.c3(c2), scale_factor=2.0, mode="nearest"))
        return self.head(self.m1(c1 + F.interpolate(p2, scale_factor=2.0, mode="nearest")))


class Decoder(nn.Module):
    """A U-Net's decoder: transposed convs (BN, ReLU) back up, each concatenated with its skip."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = _conv(3, width, 2), _conv(width, width, 2), _conv(width, width, 2)
        self.up3 = nn.Sequential(nn.ConvTranspose2d(width, width, 2, 2, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.up2 = nn.Sequential(nn.ConvTranspose2d(2 * width, width, 2, 2, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Conv2d(2 * width, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1 = self.c1(x)
        c2 = self.c2(c1)
        u2 = torch.cat([c2, self.up3(self.c3(c2))], 1)
        return self.head(torch.cat([c1, self.up2(u2)], 1))


class _SqueezeExcite(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(width, width // 4, 1), nn.Conv2d(width // 4, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


class PooledTail(nn.Module):
    """Averages over small maps: a DenseNet-style transition (2x2 average pool), squeeze-excites over
    4x4 and 2x2 (MobileNetV3's last stages at 64x64), the classifier's global mean over 2x2."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.c1, self.c2 = _conv(3, width, 2), _conv(width, width, 2)
        self.c3, self.c4, self.c5 = _conv(width, width, 2), _conv(width, width, 2), _conv(width, width, 2)
        self.se4, self.se5, self.fc = _SqueezeExcite(width), _SqueezeExcite(width), nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(self.c2(self.c1(x)), 2)
        x = self.se5(self.c5(self.se4(self.c4(self.c3(x)))))
        return self.fc(x.mean((2, 3)))


class WideKernelTail(nn.Module):
    """MobileNetV3-small's last blocks as they run at 64x64: 96 -> 576 -> 96 channels around a 5x5
    depthwise conv over a 2x2 map (the input brought down to 2x2 by strided convs that cost little)."""

    def __init__(self, width: int = 96, wide: int = 576, blocks: int = 3) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, width, 8, 8), nn.ReLU(), nn.Conv2d(width, width, 4, 4), nn.ReLU(),
                                  nn.Conv2d(width, width, 2, 2), nn.ReLU())  # 128 -> 2
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(width, wide, 1), nn.ReLU(),
                                                    nn.Conv2d(wide, wide, 5, padding=2, groups=wide), nn.ReLU(),
                                                    nn.Conv2d(wide, width, 1))
                                      for _ in range(blocks)])
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.down(x)).mean((2, 3)))


class PooledStem(nn.Module):
    """ResNet's and ShuffleNet's stem: a strided conv, a ReLU and a 3x3 max pool of stride 2 padded by
    1, then a ShuffleNet-sized 1x1 conv."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self.stem, self.conv = _conv(3, width, 2), _conv(width, 2 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.max_pool2d(self.stem(x), 3, 2, 1))


class MixedKernels(nn.Module):
    """MixNet's mixed depthwise convs: a quarter of the channels each through a 3x3, 5x5, 7x7 and 9x9 depthwise
    conv, concatenated, twice (the last two kernels have more than XNNPACK's 25 fast taps)."""

    def __init__(self, width: int = 96) -> None:
        super().__init__()
        self.stem = _conv(3, width, 4)
        quarter = width // 4
        self.mixes = nn.ModuleList(nn.ModuleList(nn.Conv2d(quarter, quarter, k, padding=k // 2, groups=quarter)
                                                 for k in (3, 5, 7, 9)) for _ in range(2))
        self.projects = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for mix, project in zip(self.mixes, self.projects):
            parts = x.chunk(4, dim=1)
            x = torch.relu(project(torch.relu(torch.cat([conv(part) for conv, part in zip(mix, parts)], dim=1))))
        return x


class PatchStem(nn.Module):
    """A ViT's patch embedding (8x8 patches of 3 channels, to 96) and a token-wise MLP (1x1 convs)."""

    def __init__(self, width: int = 96) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, width, 8, 8)
        self.mlp = nn.Sequential(nn.Conv2d(width, 2 * width, 1), nn.ReLU(), nn.Conv2d(2 * width, width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.patches(x))


# rewrite (a function that export/xnnpack_forms.py applies) -> the model with its pattern
CASES = {
    "nearest_upsampling_as_depth_to_space": TopDown,
    "fuse_activations_into_transpose_convs": Decoder,
    "averages_as_depthwise_convs": PooledTail,
    "crop_kernels_to_their_input": WideKernelTail,
    "pads_as_rows": PooledStem,
    "large_depthwise_kernels_on_tflite": MixedKernels,
    "patch_convs_as_space_to_depth": PatchStem,
}


@contextmanager
def _switched_off(name: str):
    original = getattr(xnnpack_forms, name)
    setattr(xnnpack_forms, name, lambda model, *args: 0)
    try:
        yield
    finally:
        setattr(xnnpack_forms, name, original)


def _ops(path: Path) -> dict[str, int]:
    model = read_model(path)
    counts: dict[str, int] = {}
    for op in model.subgraphs[0].operators:
        name = builtin_name(builtin_code(model, op))
        counts[name] = counts.get(name, 0) + 1
    return counts


def _partitions(path: Path) -> str:
    """Ops XNNPACK does not take (each splits its graph)."""
    delegated, _ = xnnpack_delegated_ops(path.read_bytes())
    model = read_model(path)
    left = [builtin_name(builtin_code(model, op)) for i, op in enumerate(model.subgraphs[0].operators)
            if delegated is not None and i not in delegated and builtin_name(builtin_code(model, op)) not in ("QUANTIZE", "DEQUANTIZE")]
    return ", ".join(sorted(set(left))) or "-"


def measure(name: str, size: int, rounds: int, runs: int, folder: Path) -> dict:
    torch.manual_seed(0)
    model = CASES[name]().eval()
    images = torch.randn(16, 3, size, size)
    files = {}
    for form in ("new", "old"):
        with _switched_off(name) if form == "old" else nullcontext():
            files[f"fp32_{form}"] = folder / f"{name}_fp32_{form}.tflite"
            export_float_tflite(model, images[:1], files[f"fp32_{form}"])
            files[f"int8_{form}"] = folder / f"{name}_int8_{form}.tflite"
            export_tflite(model, images[:1], files[f"int8_{form}"], calibration_data=[images], verify_data=[images],
                          min_agreement=0.0)
    latency = interleaved_benchmark({k: str(v) for k, v in files.items()}, threads=1, rounds=rounds, runs_per_round=runs)
    result = {"rewrite": name, "model": CASES[name].__name__, "size": size}
    for key, path in files.items():
        result[key] = {"median_ms": latency[key].median_ms, "ops": _ops(path), "left_to_tflite": _partitions(path)}
    for precision in ("fp32", "int8"):
        result[f"{precision}_ratio"] = latency[f"{precision}_new"].median_ms / latency[f"{precision}_old"].median_ms
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="input height and width (3 channels)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=20, help="runs per file per round")
    parser.add_argument("--rewrites", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--json")
    args = parser.parse_args()
    quiet_logs()
    env = environment()
    print(environment_line(env))
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.rewrites:
            results.append(measure(name, args.size, args.rounds, args.runs, Path(folder)))
    rows = []
    for r in results:
        for precision in ("fp32", "int8"):
            old, new = r[f"{precision}_old"], r[f"{precision}_new"]
            changed = sorted(op for op in set(old["ops"]) | set(new["ops"]) if old["ops"].get(op) != new["ops"].get(op))
            rows.append([r["rewrite"], precision, fmt(old["median_ms"], ".4f"), fmt(new["median_ms"], ".4f"),
                         fmt(r[f"{precision}_ratio"], ".3f") + "x", old["left_to_tflite"], new["left_to_tflite"],
                         ", ".join(f"{op} {old['ops'].get(op, 0)}->{new['ops'].get(op, 0)}" for op in changed)])
    print(f"\n{results[0]['size']}x{results[0]['size']} input, XNNPACK, 1 thread, {args.rounds} interleaved rounds; medians")
    print(table(["rewrite", "precision", "without ms", "with ms", "with/without", "left to TFLite without",
                 "left to TFLite with", "ops changed"], rows, left=(0, 1, 5, 6, 7)))
    write_json(args.json, {"environment": env, "results": results})


if __name__ == "__main__":
    main()
