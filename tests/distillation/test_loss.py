"""The Hinton loss: zero when the models agree, the textbook gradient, T^2 scaling, and the mix."""

from __future__ import annotations

import pytest
import torch

from sparselite import SparseliteError
from sparselite.distillation.loss import kd_loss, logits_of, mixed_loss


def test_zero_when_student_matches_teacher():
    logits = torch.randn(8, 10)
    assert float(kd_loss(logits, logits.clone(), 4.0)) == pytest.approx(0.0, abs=1e-6)


def test_gradient_is_the_softened_probability_gap_times_t():
    # d/ds of T^2 * KL(p_t || p_s) averaged over N is T * (softmax(s/T) - softmax(t/T)) / N.
    torch.manual_seed(0)
    student, teacher, T = torch.randn(5, 7, requires_grad=True), torch.randn(5, 7), 3.0
    kd_loss(student, teacher, T).backward()
    expected = T * (torch.softmax(student.detach() / T, 1) - torch.softmax(teacher / T, 1)) / 5
    torch.testing.assert_close(student.grad, expected)


def test_value_is_t_squared_kl_of_softened_outputs():
    torch.manual_seed(1)
    student, teacher, T = torch.randn(4, 6), torch.randn(4, 6), 2.0
    p_t, p_s = torch.softmax(teacher / T, 1), torch.softmax(student / T, 1)
    expected = T**2 * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    torch.testing.assert_close(kd_loss(student, teacher, T), expected)


def test_no_gradient_reaches_the_teacher():
    student, teacher = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    kd_loss(student, teacher, 4.0).backward()
    assert teacher.grad is None and student.grad is not None


def test_dense_outputs_count_each_position_as_an_example():
    torch.manual_seed(2)
    student, teacher = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)
    flat = kd_loss(student.movedim(1, -1).reshape(-1, 5), teacher.movedim(1, -1).reshape(-1, 5), 4.0)
    torch.testing.assert_close(kd_loss(student, teacher, 4.0), flat)


def test_shape_mismatch_is_one_line():
    with pytest.raises(SparseliteError, match=r"teacher output shape \(2, 7\) differs from the student's \(2, 10\)"):
        kd_loss(torch.randn(2, 10), torch.randn(2, 7), 4.0)


def test_mix_and_logits_of_tuples():
    assert float(mixed_loss(torch.tensor(2.0), torch.tensor(4.0), 0.25)) == pytest.approx(2.5)
    logits = torch.randn(2, 3)
    assert logits_of((logits, torch.randn(2, 3))) is logits
    with pytest.raises(SparseliteError, match="needs logits"):
        logits_of({"logits": logits})
