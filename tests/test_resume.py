"""GradualPruning + QuantizationAwareTraining resumed from a mid-schedule checkpoint: the same end state."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from conftest import fit_with_checkpoint_at, make_loader, make_trainer, tiny_mobilenet
from sparselite import GradualPruning, QuantizationAwareTraining
from sparselite.models.classifier import ImageClassifier
from sparselite.pruning.pruner import MASK_BUFFER
from sparselite.quantization.qat import learned_ranges


def masks_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: buf.clone() for name, buf in module.named_buffers() if name.endswith(MASK_BUFFER)}


def compression_callbacks() -> list:
    return [
        GradualPruning(final_sparsity=0.75, begin_step=2, end_step=20, frequency=3, min_params=100),
        QuantizationAwareTraining(begin_step=4, freeze_step=18, averaging_constant=0.1),
    ]


class ResumableLoader:
    """A DataLoader wrapper Lightning can resume mid-epoch (it saves and restores its position).

    Lightning restarts a plain DataLoader at batch 0 when it resumes mid-epoch, so the resumed run
    would see other batches than the uninterrupted one (Lightning warns about it)."""

    def __init__(self, loader) -> None:
        self.loader, self.consumed, self._skip = loader, 0, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self.consumed = skip
        for index, batch in enumerate(self.loader):
            if index >= skip:
                self.consumed = index + 1
                yield batch

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self._skip = state["consumed"]


def run_state(module, pruning) -> tuple:
    return masks_of(module), pruning.pruner.last_update_step, learned_ranges(module), {
        k: v.clone() for k, v in module.state_dict().items()
    }


@pytest.mark.parametrize("resume_step", [12, 16], ids=["mid_epoch", "epoch_boundary"])
def test_resume_matches_uninterrupted_run_exactly(tmp_path, fmnist_train, resume_step):
    total = 24  # 8 batches per epoch: step 16 ends epoch 2, step 12 is in its middle
    make = (lambda: ResumableLoader(make_loader(fmnist_train, 256))) if resume_step % 8 else (lambda: make_loader(fmnist_train, 256))

    # Run A: uninterrupted, with a checkpoint at `resume_step`, mid-schedule for pruning and QAT.
    callbacks_a = compression_callbacks()
    module_a, ckpt = fit_with_checkpoint_at(tmp_path, callbacks_a, total, resume_step, make())
    assert ckpt.is_file(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    masks_a, last_a, ranges_a, state_a = run_state(module_a, callbacks_a[0])
    assert last_a == 20 and len(ranges_a) == 7  # the input + 6 convs/linear observed

    # The checkpoint really is mid-schedule: fewer weights pruned than at the end.
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["global_step"] == resume_step
    zeros_at_k = sum(int((~v).sum()) for k, v in saved["state_dict"].items() if k.endswith(MASK_BUFFER))
    assert 0 < zeros_at_k < sum(int((~m).sum()) for m in masks_a.values())

    # Run B: a fresh process state, resumed from the checkpoint.
    pl.seed_everything(123, verbose=False)  # different init: everything must come from the checkpoint
    module_b = ImageClassifier(tiny_mobilenet(), lr=5e-3)
    callbacks_b = compression_callbacks()
    trainer_b = make_trainer(tmp_path, total, callbacks_b, name="b")
    trainer_b.fit(module_b, make(), ckpt_path=ckpt)
    assert trainer_b.global_step == total
    masks_b, last_b, ranges_b, state_b = run_state(module_b, callbacks_b[0])

    assert last_b == last_a
    assert masks_a.keys() == masks_b.keys() and len(masks_a) == 3
    for name in masks_a:
        assert torch.equal(masks_a[name], masks_b[name]), name
    assert ranges_a.keys() == ranges_b.keys()
    for name in ranges_a:
        assert torch.equal(torch.tensor(ranges_a[name]), torch.tensor(ranges_b[name])), name
    mismatched = [k for k in state_a if not torch.equal(state_a[k], state_b[k])]
    assert not mismatched, f"weights/buffers differ after resume: {mismatched[:5]}"
