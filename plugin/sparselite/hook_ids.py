"""Keys of their own for the hooks sparselite registers, apart from the ones torch hands out.

torch keys every module's hook dicts by one counter for the whole process (``RemovableHandle.next_id``),
and a pickled module keeps its keys. A new process counts from 0 again, so after ``torch.load`` of a
whole prepared model (``torch.save(model)``; a ``ddp_spawn`` worker gets its model so), the first hooks
registered on its modules (a user's, Lightning's layer summary) take the keys sparselite's hooks hold
and silently replace them: QAT then stops fake-quantizing there, and the model no longer computes what
its file will (docs/upstream/torch_hook_ids.md). sparselite registers its hooks while the counter runs
above 2^48, which no process reaches by counting from 0, and above every key the model already holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.utils.hooks import RemovableHandle

OWN_RANGE_START = 1 << 48

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _largest_key(model: nn.Module) -> int:
    keys = [key for module in model.modules() for name in _HOOK_DICTS for key in getattr(module, name, {})]
    return max(keys, default=-1)


@contextmanager
def hook_ids_apart(model: nn.Module) -> Iterator[None]:
    """Key the hooks registered inside (on ``model`` or anywhere) above ``OWN_RANGE_START`` and above every
    key ``model``'s modules hold; torch's own counter resumes where it was. Nested uses share one range."""
    outer = RemovableHandle.next_id
    if outer >= OWN_RANGE_START:
        yield
        return
    RemovableHandle.next_id = max(OWN_RANGE_START, _largest_key(model) + 1)
    try:
        yield
    finally:
        RemovableHandle.next_id = outer
