"""KD losses on top-k sparse targets (fedguard_train/distill.py) against dense reference computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedguard.errors import ConfigError
from fedguard_train.distill import kd_loss, realign, remap, top_k


def _dense_forward(teacher: torch.Tensor, student: torch.Tensor, k: int, tau: float) -> torch.Tensor:
    """Reference: densify the renormalised top-k teacher and compute KL(p || q) over the full vocabulary."""
    values, ids = torch.topk(teacher / tau, k, dim=-1)
    p = torch.zeros_like(teacher).scatter_(-1, ids, torch.softmax(values, -1))
    log_q = torch.log_softmax(student / tau, -1)
    kl = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - log_q), torch.zeros_like(p)).sum(-1)
    return tau ** 2 * kl.mean()


def test_forward_kl_matches_dense_reference_and_is_zero_on_itself() -> None:
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 5, 40, generator=g), torch.randn(2, 5, 40, generator=g)
    for k, tau in ((4, 1.0), (40, 2.0), (7, 0.5)):
        got = kd_loss(student, top_k(teacher, k, tau), temperature=tau)
        assert torch.allclose(got, _dense_forward(teacher, student, k, tau), atol=1e-5)
    # full support and the student equal to the teacher: KL = 0; the top-k truncation alone is not zero
    assert float(kd_loss(teacher, top_k(teacher, 40, 1.0))) == pytest.approx(0.0, abs=1e-5)
    assert float(kd_loss(teacher, top_k(teacher, 3, 1.0))) > 0


def test_reverse_kl_on_the_support_and_gradient_pulls_towards_teacher() -> None:
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(1, 3, 30, generator=g)
    target = top_k(teacher, 5, 1.0)
    student = torch.randn(1, 3, 30, generator=g, requires_grad=True)
    loss = kd_loss(student, target, direction="reverse")
    z = student.detach().gather(-1, target.ids)
    q = torch.softmax(z, -1)
    ref = (q * (torch.log(q) - torch.log(target.probs))).sum(-1).mean()
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-5)
    loss.backward()
    with torch.no_grad():
        stepped = student - 5.0 * student.grad
    assert float(kd_loss(stepped, target, direction="reverse")) < float(loss)
    with pytest.raises(ConfigError):
        kd_loss(student, target, direction="sideways")  # type: ignore[arg-type]


def test_mask_and_temperature_validation() -> None:
    teacher = torch.randn(1, 4, 10)
    student = torch.randn(1, 4, 10)
    target = top_k(teacher, 3, mask=torch.tensor([[True, False, False, False]]))
    only_first = kd_loss(student[:, :1], top_k(teacher[:, :1], 3))
    assert float(kd_loss(student, target)) == pytest.approx(float(only_first), rel=1e-6)
    none = top_k(teacher, 3, mask=torch.zeros(1, 4, dtype=torch.bool))
    assert float(kd_loss(student, none)) == 0.0
    with pytest.raises(ConfigError):
        top_k(teacher, 0)
    with pytest.raises(ConfigError):
        kd_loss(student, target, temperature=0.0)
    with pytest.raises(ConfigError):
        kd_loss(student[:, :2], target)


def test_remap_merges_duplicates_without_dense_tensors() -> None:
    ids = torch.tensor([[[3, 1, 2, 0]]])
    probs = torch.tensor([[[0.4, 0.3, 0.2, 0.1]]])
    target = remap(top_k(torch.zeros(1, 1, 4), 4), np.array([0, 1, 2, 3]))  # identity keeps a distribution
    assert float(target.probs.sum()) == pytest.approx(1.0)
    from fedguard_train.distill import TopK

    merged = remap(TopK(ids, probs, torch.ones(1, 1, dtype=torch.bool)), np.array([7, 5, 5, 7]))
    # teacher 3 -> 7, 1 -> 5, 2 -> 5, 0 -> 7: 7 gets 0.4 + 0.1, 5 gets 0.3 + 0.2, duplicates zeroed
    assert merged.ids.tolist() == [[[7, 5, 5, 7]]]
    assert merged.probs.tolist()[0][0] == pytest.approx([0.5, 0.5, 0.0, 0.0])
    assert merged.probs.shape == probs.shape
    with pytest.raises(ConfigError):
        remap(TopK(ids, probs, torch.ones(1, 1, dtype=torch.bool)), np.array([0, 1]))
    # a merged target still gives the dense-reference loss
    student = torch.randn(1, 1, 9)
    dense_p = torch.zeros(9)
    dense_p[7], dense_p[5] = 0.5, 0.5
    log_q = torch.log_softmax(student[0, 0], -1)
    ref = (dense_p[[5, 7]] * (torch.log(dense_p[[5, 7]]) - log_q[[5, 7]])).sum()
    assert float(kd_loss(student, merged)) == pytest.approx(float(ref), rel=1e-5)


def test_realign_moves_positions_and_masks_missing() -> None:
    teacher = torch.randn(1, 3, 6)
    target = top_k(teacher, 2)
    moved = realign(target, torch.tensor([[2, -1, 0, 0]]))
    assert moved.ids.shape == (1, 4, 2)
    assert moved.mask.tolist() == [[True, False, True, True]]
    assert torch.equal(moved.ids[0, 0], target.ids[0, 2])
    assert torch.equal(moved.probs[0, 3], target.probs[0, 0])


def test_reverse_kl_gradient_finite_with_merged_zero_entries() -> None:
    from fedguard_train.distill import TopK

    merged = remap(TopK(torch.tensor([[[0, 1, 2]]]), torch.tensor([[[0.5, 0.3, 0.2]]]),
                        torch.ones(1, 1, dtype=torch.bool)), np.array([4, 4, 1]))
    student = torch.randn(1, 1, 6, requires_grad=True)
    kd_loss(student, merged, direction="reverse", temperature=2.0).backward()
    assert student.grad is not None and bool(torch.isfinite(student.grad).all())
