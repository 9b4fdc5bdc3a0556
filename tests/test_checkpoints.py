"""Checkpoints from anyone: tensors load, code never runs, junk gets one clear line."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from sparselite.checkpoints import load_checkpoint
from sparselite.errors import SparseliteError


class WritesAFile:
    """A pickle payload: unpickling it with full pickle would create ``target``."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_a_crafted_checkpoint_is_refused_without_running_its_payload(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": WritesAFile(str(target))}, path)
    with pytest.raises(SparseliteError, match="could run code"):
        load_checkpoint(path)
    assert not target.exists()


def test_a_plain_pickle_payload_is_refused_too(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps(WritesAFile(str(target))))
    with pytest.raises(SparseliteError):
        load_checkpoint(path)
    assert not target.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint\n", pickle.dumps([1, 2, 3]), b"PK\x03\x04garbage"],
                         ids=["empty", "text", "list", "broken-zip"])
def test_junk_gives_one_line(content, tmp_path):
    path = tmp_path / "junk.ckpt"
    path.write_bytes(content)
    with pytest.raises(SparseliteError) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_a_tensor_checkpoint_loads(tmp_path):
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3, "hyper_parameters": {"lr": 0.1}}, path)
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.ones(2))


def test_a_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(SparseliteError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_model_weights_load_without_the_compression_state_saved_beside_them():
    from sparselite.checkpoints import load_model_weights

    source, target = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    saved = {**source.state_dict(), "sparselite_mask_weight": torch.ones(3, 4)}  # a pruned run's mask buffer
    load_model_weights(target, saved, "run.ckpt")
    torch.testing.assert_close(target.weight, source.weight)


def test_model_weights_of_another_architecture_are_one_line():
    from sparselite.checkpoints import load_model_weights

    with pytest.raises(SparseliteError, match=r"run.ckpt does not fit the model's architecture \(missing \['bias'\]\)"):
        load_model_weights(torch.nn.Linear(4, 3), {"weight": torch.zeros(3, 4)}, "run.ckpt")
    with pytest.raises(SparseliteError, match="run.ckpt does not fit the model's architecture: .*size mismatch") as err:
        load_model_weights(torch.nn.Linear(4, 3), torch.nn.Linear(5, 3).state_dict(), "run.ckpt")
    assert "\n" not in str(err.value)
