"""Reading checkpoints that may come from anyone: tensors only, never code.

``torch.load`` with full pickle runs whatever a crafted file's ``__reduce__`` says before anything can
check it. ``weights_only=True`` restricts unpickling to tensors and plain containers; a Lightning
checkpoint's model state needs nothing else.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from sparselite.errors import SparseliteError


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's dict, unpickled with ``weights_only=True``; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise SparseliteError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise SparseliteError(
                f"{path} holds Python objects other than tensors, which could run code when loaded; refused "
                "(only checkpoints written by torch/Lightning from tensors and plain values are read)"
            ) from None
        raise SparseliteError(f"{path} is not a readable checkpoint ({reason}); was it written by torch.save?") from None
    except (EOFError, RuntimeError, ValueError, OSError, zipfile.BadZipFile, UnicodeDecodeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SparseliteError(f"{path} is not a readable checkpoint ({type(err).__name__}: {reason[:160]})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise SparseliteError(f"{path} has no 'state_dict'; pass a Lightning checkpoint (.ckpt) written by `sparselite fit`")
    return checkpoint


COMPRESSION_STATE = "sparselite_"  # in a state-dict key: masks, fake-quant ranges, channel plans; not weights


def load_model_weights(module: torch.nn.Module, state_dict: dict[str, Any], source: str) -> None:
    """Load a checkpoint's model weights into ``module``, whose architecture they must fit exactly. The
    compression state a sparselite run saves next to them is left out on both sides: weights of a pruned or
    quantized run go into a plain model too. ``source`` names the file in the error."""
    weights = {k: v for k, v in state_dict.items() if COMPRESSION_STATE not in k}
    own = {k for k in module.state_dict() if COMPRESSION_STATE not in k}
    missing, unexpected = sorted(own - set(weights)), sorted(set(weights) - own)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise SparseliteError(f"{source} does not fit the model's architecture ({what})")
    try:
        module.load_state_dict(weights, strict=False)
    except RuntimeError as err:
        raise SparseliteError(f"{source} does not fit the model's architecture: "
                              f"{str(err).strip().splitlines()[-1].strip()}") from None
