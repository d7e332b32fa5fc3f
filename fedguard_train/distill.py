"""Knowledge-distillation losses on top-k sparse teacher distributions (FedHeteroLLM, FedCoLLM, FedMKT).

A teacher's next-token distribution at temperature ``τ`` is kept as its top ``k`` entries only
(:class:`TopK`: ids and probabilities renormalised over those ``k``, shape ``batch × length × k``) — never a
``batch × length × vocab`` tensor: with another tokeniser its ids are first moved into the mentee's
vocabulary (:func:`remap`, duplicates merged by summing) and its positions onto the mentee's
(:func:`realign`). The mentee's logits ``z`` (which it computes anyway) give ``log q = log_softmax(z/τ)``.

* forward KL (Hinton et al. 2015; FATE-LLM §3.1 "KD(teacher ‖ mentee)"):
  ``KL(p ‖ q) = Σ_{v ∈ topk} p_v (log p_v − log q_v)``, with ``q`` over the whole mentee vocabulary, so
  mass the mentee puts outside the teacher's top-k is penalised through the normalisation;
* reverse KL (MiniLLM, Gu et al. 2024): ``KL(q̃ ‖ p) = Σ_{v ∈ topk} q̃_v (log q̃_v − log p_v)`` with ``q̃``
  the mentee's distribution renormalised over the teacher's top-k support (reverse KL is undefined outside
  the support of a truncated ``p``).

Both are multiplied by ``τ²`` (gradient scale independent of ``τ``) and averaged over positions with a
target (``mask``). The client's loss is ``LM + λ·KD``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fedguard.errors import ConfigError

Direction = Literal["forward", "reverse"]


@dataclass(frozen=True)
class TopK:
    """Sparse distributions: ``ids`` (int64) and ``probs`` (float, each row sums to 1 where ``mask``) of shape
    ``B × T × k``; ``mask`` (bool, ``B × T``): positions that have a target."""

    ids: torch.Tensor
    probs: torch.Tensor
    mask: torch.Tensor

    @property
    def nbytes(self) -> int:
        return int(self.ids.numel() * 4 + self.probs.numel() * 2 + self.mask.numel())  # int32 ids + fp16 probs


def top_k(logits: torch.Tensor, k: int, temperature: float = 1.0, mask: torch.Tensor | None = None) -> TopK:
    """The top-``k`` of ``softmax(logits/τ)``, renormalised over those ``k`` (``logits``: ``B × T × V``)."""
    if k < 1:
        raise ConfigError(f"top_k must be >= 1, got {k}")
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    k = min(k, logits.shape[-1])
    values, ids = torch.topk(logits.detach().float() / temperature, k, dim=-1)
    probs = torch.softmax(values, dim=-1)
    if mask is None:
        mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    return TopK(ids, probs, mask.bool())


def remap(target: TopK, mapping: np.ndarray | torch.Tensor) -> TopK:
    """Teacher ids → mentee ids through a vocabulary map (``mapping[teacher_id] = mentee_id``); two teacher
    ids that land on the same mentee id are merged (probabilities summed into the first, the other zeroed)."""
    table = torch.as_tensor(mapping, dtype=torch.int64, device=target.ids.device)
    if target.ids.numel() and int(target.ids.max()) >= len(table):
        raise ConfigError(f"teacher id {int(target.ids.max())} is outside the vocabulary map ({len(table)} ids)")
    ids = table[target.ids]
    same = ids.unsqueeze(-1) == ids.unsqueeze(-2)  # B×T×k×k
    earlier = torch.tril(torch.ones(same.shape[-2:], dtype=torch.bool, device=ids.device), diagonal=-1)
    duplicate = (same & earlier).any(-1)  # an earlier entry already holds this id
    # each entry's probability goes to the first entry with its id (argmax returns the first maximum)
    owner = torch.argmax(same.to(torch.int8), dim=-1)
    merged = torch.zeros_like(target.probs).scatter_add_(-1, owner, target.probs)
    merged = merged.masked_fill(duplicate, 0.0)
    return TopK(ids, merged, target.mask)


def realign(target: TopK, source: torch.Tensor) -> TopK:
    """Move teacher positions onto mentee positions: row ``b``, mentee position ``i`` takes teacher position
    ``source[b, i]`` (``-1``: no target there). ``source``: ``B × T_mentee`` int64."""
    valid = source >= 0
    index = source.clamp(min=0)
    gather = index.unsqueeze(-1).expand(-1, -1, target.ids.shape[-1])
    ids = torch.gather(target.ids, 1, gather)
    probs = torch.gather(target.probs, 1, gather)
    mask = torch.gather(target.mask, 1, index) & valid
    return TopK(ids, probs, mask)


def kd_loss(student_logits: torch.Tensor, target: TopK, *, temperature: float = 1.0,
            direction: Direction = "forward") -> torch.Tensor:
    """``τ² · mean over masked positions`` of the KL of the module docstring (a scalar; 0 with no target)."""
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape[:2] != target.ids.shape[:2]:
        raise ConfigError(f"student logits {tuple(student_logits.shape[:2])} and targets "
                          f"{tuple(target.ids.shape[:2])} cover different positions")
    z = student_logits.float() / temperature
    p = target.probs.float()
    log_p = torch.log(p.clamp_min(1e-12))
    present = p > 0
    if direction == "forward":
        log_q = torch.log_softmax(z, dim=-1).gather(-1, target.ids)
        per_pos = torch.where(present, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    elif direction == "reverse":
        z_k = z.gather(-1, target.ids).masked_fill(~present, -1e4)  # finite: no NaN gradient through where()
        log_q = torch.log_softmax(z_k, dim=-1)
        q = log_q.exp()
        per_pos = torch.where(present, q * (log_q - log_p), torch.zeros_like(q)).sum(-1)
    else:
        raise ConfigError(f"KL direction must be 'forward' or 'reverse', got {direction!r}")
    mask = target.mask.to(per_pos.dtype)
    count = mask.sum()
    if float(count) == 0.0:
        return student_logits.sum() * 0.0
    return temperature ** 2 * (per_pos * mask).sum() / count


__all__ = ["Direction", "TopK", "kd_loss", "realign", "remap", "top_k"]
