"""The distillation loss on logits (Hinton, Vinyals & Dean 2015, "Distilling the knowledge in a neural network").

    kd = T^2 * KL( softmax(teacher / T) || softmax(student / T) ),  averaged over examples
    loss = (1 - weight) * user_loss + weight * kd

The T^2 factor keeps the soft targets' gradients on the scale of the hard-label loss's as T changes
(their gradients shrink as 1/T^2), so ``weight`` means the same thing at any temperature.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sparselite.errors import SparseliteError


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, or the first tensor of a tuple/list (a model that
    also returns auxiliary logits, as GoogLeNet and Inception v3 do in training mode)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise SparseliteError(f"distillation needs logits (a tensor, or a tuple whose first item is one); the model "
                          f"returned {type(output).__name__}")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), computed in float32, averaged over examples.

    Classes are on dim 1 (``[N, C]`` or ``[N, C, ...]``, as F.cross_entropy reads them); every other
    position of a dense output (a segmentation map's pixels) counts as one example."""
    if student.shape != teacher.shape:
        raise SparseliteError(f"teacher output shape {tuple(teacher.shape)} differs from the student's "
                              f"{tuple(student.shape)}")
    student, teacher = student.float(), teacher.detach().float()
    if student.dim() > 2:
        classes = student.shape[1]
        student = student.movedim(1, -1).reshape(-1, classes)
        teacher = teacher.movedim(1, -1).reshape(-1, classes)
    elif student.dim() < 2:
        student, teacher = student.reshape(1, -1), teacher.reshape(1, -1)
    log_student = F.log_softmax(student / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def mixed_loss(user_loss: torch.Tensor, distillation: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 - weight) * the user's loss + weight * the distillation loss."""
    return (1.0 - weight) * user_loss + weight * distillation.to(user_loss.dtype)
