"""The parity gate: does the exported file compute what the torch model computes?

The file runs on XNNPACK and is compared with the torch model it came from (the fake-quant model
when QAT ran). Two int8 runtimes of one file do not agree to the bit either: XNNPACK and TFLite's
builtin kernels round requantizations differently, and a deep net amplifies those 1-LSB differences
into several output LSBs and flipped near-ties (mobilenet-class nets at 200 training steps: 94-96%
top-1 agreement between the two runtimes on the same file). So the same file is also run on the
builtin kernels when the file falls short of ``min_agreement``; that agreement, the runtime's own
noise floor, is reported beside the parity and lets a file through that is as faithful as the
runtimes are to each other. A broken export
(a wrong scale, a dropped op) is wrong on both runtimes alike: it cannot hide under the floor.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sized
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sparselite.errors import SparseliteError
from sparselite.export.report import Parity
from sparselite.module_copy import detached_copy
from sparselite.quantization.qat import learned_ranges, strip_fake_quant

log = logging.getLogger("sparselite")

# Above this share of tied examples, the agreement over the rest describes too few examples to trust.
MAX_TIED_SHARE = 0.1
# Below this agreement between the two runtimes, the file amplifies rounding so much that no
# agreement proves it right: the noise floor no longer lets it through.
MIN_KERNEL_AGREEMENT = 0.9


def fake_quant_reference(module: nn.Module) -> tuple[nn.Module, str]:
    """The torch model the file must agree with: the fake-quant model if QAT ran, else the float model."""
    model = detached_copy(module).eval()
    if learned_ranges(model):
        return model, "fake-quant"
    strip_fake_quant(model)
    return model, "float"


@torch.no_grad()
def verify(module: nn.Module, path: Path, batches: Iterable[torch.Tensor], output_scale: float,
           reference: tuple[nn.Module, str] | None = None, labels: torch.Tensor | None = None) -> Parity:
    """The file on XNNPACK vs the torch model (``reference``: the model and what it is; by default
    ``fake_quant_reference(module)``): top-1 agreement without ties, max |logit diff| in output LSBs;
    with the batches' ``labels``, also each one's top-1 accuracy."""
    from sparselite.runtime.litert import LiteRTModel

    reference, kind = reference or fake_quant_reference(module)
    runtime = LiteRTModel(path, accelerator="xnnpack", threads=_threads())
    expected, got = [], []
    total = len(batches) if isinstance(batches, Sized) else "?"
    for number, batch in enumerate(batches, 1):
        expected.append(reference(batch).float().numpy())
        got.append(runtime(batch.numpy()))
        log.info("export: verify batch %d/%s on XNNPACK", number, total)
    if not expected:
        raise SparseliteError("verify_data gave no batches; pass at least one held-out batch, or verify_batches=None to skip the check")
    parity = compare_logits(np.concatenate(expected), np.concatenate(got), output_scale, kind)
    if labels is not None:
        parity.reference_top1 = top1_accuracy(np.concatenate(expected), labels)
        parity.file_top1 = top1_accuracy(np.concatenate(got), labels)
    return parity


def top1_accuracy(logits: np.ndarray, labels: torch.Tensor) -> float:
    return float(np.mean(logits.reshape(len(logits), -1).argmax(1) == labels.numpy()))


def measure_noise_floor(parity: Parity, path: Path, batches: Iterable[torch.Tensor]) -> None:
    """Run the file on XNNPACK and on TFLite's builtin kernels and set ``parity.kernel_agreement`` and
    ``kernel_max_lsb``. The builtin kernels are several times slower than XNNPACK, so the export
    measures this only when the gate needs it (agreement below ``min_agreement``)."""
    from sparselite.runtime.litert import LiteRTModel

    xnnpack = LiteRTModel(path, accelerator="xnnpack", threads=_threads())
    builtin = LiteRTModel(path, accelerator="reference", threads=_threads())
    inputs = [batch.numpy() for batch in batches]
    floor = compare_logits(np.concatenate([builtin(x) for x in inputs]), np.concatenate([xnnpack(x) for x in inputs]),
                           parity.output_scale, "builtin kernels")
    parity.kernel_agreement, parity.kernel_max_lsb = floor.top1_agreement, floor.max_logit_diff_lsb


def _threads() -> int:
    return min(2, os.cpu_count() or 1)


def gate_failure(parity: Parity, min_agreement: float) -> str | None:
    """Why the file must not be written, or None. It passes at ``min_agreement``, or when it agrees with
    the torch model at least as well as the two runtimes agree with each other (see the module docstring)."""
    if parity.top1_agreement >= min_agreement:
        return None
    floor = parity.kernel_agreement
    if floor is not None and floor >= MIN_KERNEL_AGREEMENT and parity.top1_agreement >= floor:
        return None
    within = "" if floor is None else (
        f", and below the {floor:.2%} at which XNNPACK and TFLite's builtin kernels agree on the same file"
        if floor >= MIN_KERNEL_AGREEMENT else
        f"; XNNPACK and TFLite's builtin kernels agree on only {floor:.2%} of them on the same file, so the model "
        "amplifies int8 rounding too much for any agreement to prove the file right"
    )
    remedy = ("Train with QAT longer, or calibrate on more batches" if parity.reference in ("fake-quant", "float") else
              "The file does not compute what its precision's simulation computes: please report it with the model; "
              "precision='fp32' exports it meanwhile")
    return (f"the file agrees with the torch model on only {parity.top1_agreement:.2%} of top-1 predictions "
            f"without ties (< {min_agreement:.0%}){within}; nothing was written. {remedy}")


def _has_tied_top(logits: np.ndarray) -> np.ndarray:
    return (logits == logits.max(axis=1, keepdims=True)).sum(axis=1) > 1


def _as_rows(outputs: np.ndarray) -> np.ndarray:
    """One row of scores per prediction: a classifier's [N, C] as it is; a dense output ([N, C, H, W]:
    segmentation, detection heads) gives a row per position, its channels the classes."""
    if outputs.ndim == 1:
        return outputs.reshape(-1, 1)
    return np.moveaxis(outputs, 1, -1).reshape(-1, outputs.shape[1]) if outputs.ndim > 2 else outputs


def compare_logits(expected: np.ndarray, got: np.ndarray, output_scale: float, reference: str) -> Parity:
    """The parity gate's numbers. An example whose top logit is exactly tied (int8 logits tie often in
    an undertrained model) has no well-defined top-1, so it is left out of the agreement; when every
    example ties (a zero-initialized head, as torchvision's ViT has), an example agrees where the file's
    top logits are the same classes as the model's. A dense output is compared at every position
    (``_as_rows``)."""
    examples = len(expected)
    expected, got = _as_rows(expected), _as_rows(got)
    agree = expected.argmax(1) == got.argmax(1)
    untied = ~(_has_tied_top(expected) | _has_tied_top(got))
    if untied.any():
        agreement = float(agree[untied].mean())
    else:
        same_tops = (expected == expected.max(axis=1, keepdims=True)) == (got == got.max(axis=1, keepdims=True))
        agreement = float(np.all(same_tops, axis=1).mean())
    max_diff = float(np.abs(expected - got).max()) / output_scale
    return Parity(examples, agreement, max_diff, output_scale, reference, ties_excluded=int((~untied).sum()),
                  top1_agreement_all=float(agree.mean()),
                  degenerate_reference=degenerate(expected, output_scale) or saturated(expected))


def saturated(logits: np.ndarray) -> str | None:
    """Many examples tied at the very top of the output range mean the int8 output clips the largest logits."""
    if not len(logits):
        return None
    top = logits.max(axis=1)
    at_ceiling = _has_tied_top(logits) & np.isclose(top, logits.max())
    share = float(at_ceiling.mean())
    if share > MAX_TIED_SHARE:
        return (f"ties its top logit at the ceiling of the output range on {share:.0%} of the examples: the int8 "
                "output clips the largest logits (train QAT longer, so the learned output range catches up)")
    return None


def degenerate(logits: np.ndarray, output_scale: float) -> str | None:
    """Why a model's logits show it learned nothing input-dependent (so agreement proves nothing), or None."""
    if len(logits) < 2:
        return None
    if float(logits.std(axis=0).max()) < output_scale:
        return "gives every example the same logits"
    counts = np.bincount(logits.argmax(1))
    if logits.shape[1] > 1 and counts.max() >= 0.99 * len(logits):
        return f"predicts class {int(counts.argmax())} for {counts.max() / len(logits):.0%} of the examples"
    return None
