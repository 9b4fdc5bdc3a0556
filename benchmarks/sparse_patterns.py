"""Sparse int8 TFLite by pruning pattern: file size, xz size, format bound, accuracy, load time, latency.

What it measures, for the demo ``MobileNetLite`` on Fashion-MNIST, per pruning pattern (unstructured,
1x4, 1x16 at ``--sparsity`` 0.8, and 2:4 at 0.5):
  1. trains from the same initialization with gradual magnitude pruning + QAT for ``--steps`` steps
     (plain PyTorch loop over ``MagnitudePruner`` + ``PolynomialDecay`` and ``QuantizationSimulator``,
     scheduled as recipes/gmp80_qat_export.yaml scaled to the budget: prune over 8%..58% of the steps,
     QAT from 67%, ranges/BN frozen from 92%);
  2. exports the same model twice with ``sparselite.export_tflite``: ``sparse=True`` and ``sparse=False``
     (dense int8), and compares whole-file bytes (targets: sparse/dense <= 0.60 unstructured,
     <= 0.35 1x4, <= 0.30 1x16; 2:4 has none), and the xz -9 size of each file;
  3. checks the format bound: every tensor the pass encoded sparse is stored in at most 3% more bytes
     than the smallest layout it knows for it (``stored_bytes`` vs ``min_bytes`` of the
     ``report.sparse_encoding`` entries);
  4. runs both files on the Fashion-MNIST test set (``LiteRTModel``, XNNPACK) and compares their top-1
     with the fp32 accuracy of a dense model trained with the same step budget and no compression;
  5. times loading (median of interleaved loads) and latency (``interleaved_benchmark``, batch 1,
     1 thread) of dense vs sparse int8 on XNNPACK, in the same process.
On x86 XNNPACK densifies sparse weights at load and runs its dense int8 kernels (it has no int8 sparse
path), so no latency gain is expected: the latency ratio should be ~1.0, and load may cost a little more.

Run (from the repo root):
    .venv/bin/python -m benchmarks.sparse_patterns --quick                  # smoke run, a few minutes
    .venv/bin/python -m benchmarks.sparse_patterns                          # default budget (150 steps): ~7 min on 2 idle cores
    .venv/bin/python -m benchmarks.sparse_patterns --steps 1200 --json out.json --out-dir artifacts/patterns
Numbers at the default budget are for comparing patterns with each other, not for the best accuracy
the model can reach (use ``--steps 1200`` for the demo recipe's budget).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import lzma
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import _common as C
from sparselite import LiteRTModel, export_tflite
from sparselite.errors import SparseliteError
from sparselite.tflite.flatbuffer import read_model
from sparselite.export.sparse_storage import encode_sparse
from sparselite.tflite.constant_values import sparse_payload_bytes
from sparselite.models.mobilenet import MobileNetLite
from sparselite.runtime.bench import interleaved_benchmark

TARGETS = {"unstructured": 0.60, "1x4": 0.35, "1x16": 0.30}  # sparse / dense int8 whole-file bytes
BOUND_SLACK = 0.03  # stored bytes may exceed the format's minimum by this fraction
NM_SPARSITY = {"2:4": 0.5}


@contextlib.contextmanager
def stdout_to_stderr():
    """litert-torch prints conversion progress on stdout (also from C++); keep it off the tables."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def file_composition(data: bytes) -> dict:
    """Where a .tflite's bytes go: int8 weights (values + sparse indices), other constants (int32 biases),
    tensor names, and the rest (graph tables, quantization scales/zero points, metadata, padding)."""
    model = read_model(data)
    int8_weights = other_constants = names = 0
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            names += len(tensor.name or b"")
            buffer = model.buffers[tensor.buffer]
            if buffer.data is None or len(buffer.data) == 0:
                continue
            if tensor.type == 9:  # INT8
                int8_weights += sparse_payload_bytes(model, tensor)
            else:
                other_constants += len(buffer.data)
    return {"total": len(data), "int8_weights": int8_weights, "other_constants": other_constants, "tensor_names": names,
            "rest": len(data) - int8_weights - other_constants - names}


def short_names(report) -> dict[str, str]:
    """TFLite tensor name -> torch layer name, for the pruned layers the export report matched."""
    return {layer.tensor: layer.layer for layer in report.layers}


def tflite_logits(path: Path, x: torch.Tensor) -> np.ndarray:
    model = LiteRTModel(path, accelerator="xnnpack", threads=1)
    return model(x.numpy())


def median_load_ms(paths: dict[str, Path], repeats: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(repeats):
        for name in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
            start = time.perf_counter()
            LiteRTModel(paths[name], accelerator="xnnpack", threads=1)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: C.median(v) for name, v in samples.items()}


def format_bound(encodings: list[dict], names: dict[str, str]) -> dict:
    def short(name: str) -> str:
        return names.get(name, name.split("/")[-1][-40:])

    encoded = [e for e in encodings if e["encoding"] != "dense"]
    worst = max(encoded, key=lambda e: e["stored_bytes"] / e["min_bytes"], default=None)
    within = [e for e in encoded if e["stored_bytes"] <= (1 + BOUND_SLACK) * e["min_bytes"]]
    return {
        "encoded_tensors": len(encoded),
        "within_bound": len(within),
        "ok": len(within) == len(encoded),
        "worst_tensor": short(worst["name"]) if worst else None,
        "worst_ratio": worst["stored_bytes"] / worst["min_bytes"] if worst else None,
        # Depthwise weights with a stray int8 zero or two are not worth listing.
        "dense_with_zeros": [(short(e["name"]), e["op"], round(e["sparsity"], 3), e["reason"])
                             for e in encodings if e["encoding"] == "dense" and e["sparsity"] >= 0.05],
        "encodings": sorted({e["encoding"] for e in encoded}),
    }


def run_pattern(pattern: str, sparsity: float, base: torch.nn.Module, data: C.Data, args, out_dir: Path,
                example: torch.Tensor, verify: list[torch.Tensor]) -> dict:
    model = copy.deepcopy(base)
    result: dict = {"pattern": pattern, "sparsity_target": sparsity}
    try:
        pruner, simulator = C.Compression(pattern=pattern, sparsity=sparsity, qat=True).build(model, args.steps)
    except SparseliteError as err:  # a pattern that does not tile a layer is refused at prepare
        result["error"] = str(err)
        print(f"  [{pattern}] refused: {err}", file=sys.stderr)
        return result
    result["pruned_layers"] = {name: tuple(layer.module.weight.shape) for name, layer in pruner.layers.items()}
    train = C.train(model, data, args.steps, pruner, simulator, log_every=args.log_every, label=pattern)
    result["train_seconds"] = train.seconds
    result["train_median_step_ms"] = C.median(train.step_ms)
    result["sparsity_in_training"] = pruner.sparsity()
    result["torch_fake_quant_test_acc"] = C.torch_accuracy(model, data.test_x[: args.test_limit], data.test_y[: args.test_limit])

    paths, reports, export_s = {}, {}, {}
    for kind, sparse in (("dense", False), ("sparse", True)):
        paths[kind] = out_dir / f"mobilenet_{pattern.replace(':', 'of')}_{kind}_int8.tflite"
        start = time.perf_counter()
        with stdout_to_stderr():
            reports[kind] = export_tflite(model, example, paths[kind], verify_data=verify, min_agreement=0.0, sparse=sparse)
        export_s[kind] = time.perf_counter() - start
    dense, sparse_r = reports["dense"], reports["sparse"]
    result["export_seconds"] = export_s
    result["dense_bytes"], result["sparse_bytes"] = paths["dense"].stat().st_size, paths["sparse"].stat().st_size
    assert result["dense_bytes"] == dense.file_bytes and result["sparse_bytes"] == sparse_r.file_bytes
    result["ratio"] = result["sparse_bytes"] / result["dense_bytes"]
    result["target"] = TARGETS.get(pattern)
    result["meets_target"] = None if result["target"] is None else result["ratio"] <= result["target"]
    result["dense_xz_bytes"], result["sparse_xz_bytes"] = dense.xz_bytes, sparse_r.xz_bytes
    result["sparsity_in_file"] = sparse_r.overall_sparsity_in_file
    result["parity_top1_agreement"] = sparse_r.parity.top1_agreement if sparse_r.parity else None
    result["parity_max_lsb"] = sparse_r.parity.max_logit_diff_lsb if sparse_r.parity else None
    result["bound"] = format_bound(sparse_r.sparse_encoding, short_names(sparse_r))
    # The sparse pass also writes equal quantization tables once (lossless, and independent of sparsity);
    # the dense export does not. The same pass with nothing allowed sparse gives a dense file with that
    # saving too, which isolates what sparse storage itself buys.
    dense_shared, _ = encode_sparse(paths["dense"].read_bytes(), min_sparsity=1.0)
    result["dense_shared_q_bytes"] = len(dense_shared)
    result["dense_shared_q_xz_bytes"] = len(lzma.compress(dense_shared, preset=9))
    result["ratio_vs_dense_shared_q"] = result["sparse_bytes"] / len(dense_shared)
    result["composition"] = {kind: file_composition(paths[kind].read_bytes()) for kind in paths}
    result["composition"]["dense_shared_q"] = file_composition(dense_shared)
    result["sparse_encoding"] = sparse_r.sparse_encoding

    test_x, test_y = data.test_x[: args.test_limit], data.test_y[: args.test_limit].numpy()
    logits = {kind: tflite_logits(paths[kind], test_x) for kind in paths}
    for kind in paths:
        result[f"{kind}_int8_test_acc"] = float((logits[kind].argmax(1) == test_y).mean())
    result["sparse_vs_dense_max_abs_logit_diff"] = float(np.abs(logits["sparse"] - logits["dense"]).max())

    result["load_ms"] = median_load_ms(paths, args.load_repeats)
    result["load_ratio"] = result["load_ms"]["sparse"] / result["load_ms"]["dense"]
    latency = interleaved_benchmark({k: str(v) for k, v in paths.items()}, accelerator="xnnpack", threads=1,
                                    rounds=args.latency_rounds, runs_per_round=args.latency_runs)
    result["latency"] = {k: v.to_dict() for k, v in latency.items()}
    result["latency_ratio"] = latency["sparse"].median_ms / latency["dense"].median_ms
    print(f"  [{pattern}] done: ratio {result['ratio']:.3f}, int8 acc {result['sparse_int8_test_acc']:.4f} "
          f"(train {train.seconds:.0f} s, exports {export_s['dense']:.0f}+{export_s['sparse']:.0f} s)", file=sys.stderr, flush=True)
    return result


def print_tables(results: list[dict], baseline: dict, args, env: dict) -> None:
    print()
    print(C.environment_line(env))
    print(f"MobileNetLite (default config) on Fashion-MNIST; {args.steps} training steps of batch 128 per model "
          f"(GMP + QAT, same init); test set: {baseline['test_examples']} images")
    print(f"dense fp32 baseline (same {args.steps} steps, no compression): torch top-1 {baseline['test_acc']:.4f}\n")
    ok = [r for r in results if "error" not in r]
    for r in results:
        if "error" in r:
            print(f"{r['pattern']}: NOT RUN: {r['error']}")

    print("File size: whole .tflite bytes from export_tflite(sparse=False) vs (sparse=True), same trained model")
    rows = []
    for r in ok:
        rows.append([r["pattern"], f"{r['sparsity_target']:.0%}", f"{r['sparsity_in_file']:.1%}",
                     f"{r['dense_bytes']:,}", f"{r['sparse_bytes']:,}", f"{r['ratio']:.3f}",
                     C.fmt(r["target"], ".2f"), "-" if r["meets_target"] is None else ("yes" if r["meets_target"] else "NO"),
                     f"{r['dense_xz_bytes']:,}", f"{r['sparse_xz_bytes']:,}", f"{r['sparse_xz_bytes'] / r['dense_bytes']:.3f}",
                     f"{r['dense_shared_q_bytes']:,}", f"{r['ratio_vs_dense_shared_q']:.3f}"])
    print(C.table(["pattern", "target sp.", "sp. in file", "dense int8 B", "sparse int8 B", "sparse/dense", "target",
                   "meets", "dense.xz B", "sparse.xz B", "sparse.xz/dense", "dense+sharedQ B", "sparse/(dense+sharedQ)"], rows))
    print("dense+sharedQ: the dense file after the sparse pass's lossless quantization-table sharing alone "
          "(encode_sparse(min_sparsity=1.0)); sparse/(dense+sharedQ) is what sparse storage by itself saves.")

    print("\nWhere the bytes go (B): int8 weights = values + sparse index vectors; other constants = int32 biases etc.;"
          "\nrest = graph tables, quantization scales and zero points, metadata, padding")
    rows = []
    for r in ok:
        for kind in ("dense", "dense_shared_q", "sparse"):
            comp = r["composition"][kind]
            rows.append([f"{r['pattern']} {kind}", f"{comp['total']:,}", f"{comp['int8_weights']:,}", f"{comp['other_constants']:,}",
                         f"{comp['tensor_names']:,}", f"{comp['rest']:,}", f"{comp['int8_weights'] / comp['total']:.0%}"])
    print(C.table(["file", "total", "int8 weights", "other constants", "tensor names", "rest", "weights share"], rows))

    print(f"\nFormat bound: tensors stored sparse, and how many are within {BOUND_SLACK:.0%} of the smallest layout (min_bytes)")
    rows = []
    for r in ok:
        b = r["bound"]
        rows.append([r["pattern"], b["encoded_tensors"], b["within_bound"], "-" if not b["encoded_tensors"] else ("yes" if b["ok"] else "NO"),
                     C.fmt(b["worst_ratio"], ".4f"), C.fmt(b["worst_tensor"]), ", ".join(b["encodings"]) or "-",
                     len(b["dense_with_zeros"])])
    print(C.table(["pattern", "encoded", "within 3%", "ok", "worst stored/min", "worst tensor", "layouts",
                   "left dense with >= 5% zeros"], rows, left=(0, 5, 6)))
    for r in ok:
        by_reason: dict[str, list[str]] = {}
        for name, op, zeros, why in r["bound"]["dense_with_zeros"]:
            by_reason.setdefault(f"{op}, {zeros:.0%} zeros: {why}", []).append(name)
        for why, names in by_reason.items():
            print(f"  {r['pattern']} left dense: {', '.join(names)}: {why}")
    print(f"\nAccuracy (top-1, Fashion-MNIST test): int8 TFLite on XNNPACK vs the dense fp32 baseline ({baseline['test_acc']:.4f})")
    rows = []
    for r in ok:
        rows.append([r["pattern"], f"{r['torch_fake_quant_test_acc']:.4f}", f"{r['dense_int8_test_acc']:.4f}",
                     f"{r['sparse_int8_test_acc']:.4f}", f"{(r['sparse_int8_test_acc'] - baseline['test_acc']) * 100:+.2f}",
                     f"{r['sparse_vs_dense_max_abs_logit_diff']:.2g}", f"{r['parity_top1_agreement']:.4f}",
                     f"{r['parity_max_lsb']:.1f}"])
    print(C.table(["pattern", "torch fake-quant", "dense int8", "sparse int8", "sparse - fp32 (pts)",
                   "max |logit diff| sparse vs dense", "export parity top-1", "parity max LSB"], rows))

    print(f"\nXNNPACK, 1 thread, batch 1, dense vs sparse int8 in the same process: load = median of {args.load_repeats} "
          f"interleaved loads; latency = interleaved_benchmark median ({args.latency_rounds} rounds x {args.latency_runs} runs)")
    rows = []
    for r in ok:
        lat = r["latency"]
        rows.append([r["pattern"], f"{r['load_ms']['dense']:.2f}", f"{r['load_ms']['sparse']:.2f}", f"{r['load_ratio']:.2f}",
                     f"{lat['dense']['median_ms']:.3f}", f"{lat['sparse']['median_ms']:.3f}", f"{r['latency_ratio']:.3f}"])
    print(C.table(["pattern", "load dense ms", "load sparse ms", "load ratio", "latency dense ms", "latency sparse ms", "latency ratio"], rows))
    print("Note: on x86 XNNPACK densifies the sparse weights at load and runs dense int8 kernels (it has no int8 sparse\n"
          "path, and its fp32 sparse path is off on x86), so sparsity buys file size here, not latency: a latency ratio\n"
          "near 1.0 is the expected result, and the DENSIFY work shows up, if at all, in load time.")

    if ok:
        first = ok[0]
        print(f"\nPruned layers (default selection: depthwise convs and layers < 1024 weights skipped), all patterns: "
              + ", ".join(f"{n} {tuple(s)}" for n, s in first["pruned_layers"].items()))
        same = all(r["pruned_layers"] == first["pruned_layers"] for r in ok)
        print(f"Patterns {', '.join(r['pattern'] for r in ok)} each tiled all {len(first['pruned_layers'])} of them "
              f"(MagnitudePruner.prepare refuses a pattern that does not){'' if same else ' [layer lists differ between patterns!]'}.")
        print("Time per pattern (s): " + ", ".join(
            f"{r['pattern']}: train {r['train_seconds']:.0f} ({r['train_median_step_ms']:.0f} ms/step), export dense "
            f"{r['export_seconds']['dense']:.0f} + sparse {r['export_seconds']['sparse']:.0f}" for r in ok))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="training steps (batch 128) per model, baseline included (default 150; 30 with --quick)")
    parser.add_argument("--sparsity", type=float, default=0.8, help="final sparsity of unstructured and block patterns")
    parser.add_argument("--patterns", default="unstructured,1x4,1x16,2:4", help="comma-separated; N:M runs at (M-N)/M")
    parser.add_argument("--test-limit", type=int, default=10000, help="test images used for accuracy")
    parser.add_argument("--load-repeats", type=int, default=9)
    parser.add_argument("--latency-rounds", type=int, default=10)
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 30 steps, 2000 test images, fewer timing runs (sizes stay meaningful, accuracy does not)")
    parser.add_argument("--out-dir", help="keep the .tflite files here (default: a temporary folder)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--from-json", help="only print the tables of a JSON file an earlier run wrote")
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        print_tables(saved["patterns"], saved["baseline"], argparse.Namespace(**saved["args"]), saved["environment"])
        return
    if args.quick:
        for name, value in (("test_limit", 2000), ("load_repeats", 5), ("latency_rounds", 5), ("latency_runs", 30), ("log_every", 10)):
            if getattr(args, name) == parser.get_default(name):  # explicit values win over --quick
                setattr(args, name, value)
        args.steps = args.steps or 30
    args.steps = args.steps or 150
    C.quiet_logs()
    env = C.environment()
    data = C.load_data()
    torch.manual_seed(0)
    base = MobileNetLite()
    example = torch.zeros(1, 1, 28, 28)
    verify = list(data.val_x[:512].split(128))

    baseline_model = copy.deepcopy(base)
    train = C.train(baseline_model, data, args.steps, log_every=args.log_every, label="dense fp32")
    baseline = {"test_acc": C.torch_accuracy(baseline_model, data.test_x[: args.test_limit], data.test_y[: args.test_limit]),
                "test_examples": min(args.test_limit, len(data.test_x)), "train_seconds": train.seconds,
                "train_median_step_ms": C.median(train.step_ms)}
    print(f"  [dense fp32] test acc {baseline['test_acc']:.4f} (train {train.seconds:.0f} s)", file=sys.stderr, flush=True)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.out_dir or tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for pattern in [p.strip() for p in args.patterns.split(",") if p.strip()]:
            sparsity = NM_SPARSITY.get(pattern, args.sparsity)
            if ":" in pattern and pattern not in NM_SPARSITY:
                n, m = map(int, pattern.split(":"))
                sparsity = (m - n) / m
            results.append(run_pattern(pattern, sparsity, base, data, args, out_dir, example, verify))
    print_tables(results, baseline, args, env)
    C.write_json(args.json, {"environment": env, "args": vars(args), "baseline": baseline, "patterns": results,
                             "targets": TARGETS, "bound_slack": BOUND_SLACK})


if __name__ == "__main__":
    main()
