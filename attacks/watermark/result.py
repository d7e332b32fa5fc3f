"""What an attack returns: per strength, each owner's bits, p-value and verdict, and the task-loss cost."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedguard.watermark.keys import SignKey
from fedguard.watermark.sign import SignWatermark
from fedguard.watermark.verify import DEFAULT_SIGNIFICANCE


@dataclass(frozen=True, slots=True)
class OwnerOutcome:
    """One owner's key on the attacked model."""

    owner: str
    key_id: str
    bits: int
    matched: int
    p_value: float
    verdict: bool
    sign_flip_p_value: float = math.nan
    """The same key under the sign-flip test (:func:`fedguard.watermark.verify.sign_flip_p_value`)."""
    significance: float = DEFAULT_SIGNIFICANCE

    @property
    def sign_flip_verdict(self) -> bool:
        return self.sign_flip_p_value <= self.significance


@dataclass(frozen=True, slots=True)
class AttackResult:
    """One attack at one strength. ``task_loss``/``delta_task_loss``: the attacker's data loss after the
    attack and its change from the unattacked model (positive = the attack hurt the model);
    ``function_change``: max |Δ logits| on that data (≈0 for exact re-parametrisations)."""

    attack: str
    strength: float
    label: str
    owners: tuple[OwnerOutcome, ...]
    task_loss: float
    delta_task_loss: float
    function_change: float = math.nan

    @property
    def claims(self) -> int:
        return sum(o.verdict for o in self.owners)

    @property
    def claims_sign_flip(self) -> int:
        """Owners that would claim had the sign-flip test been their (prior) choice."""
        return sum(o.sign_flip_verdict for o in self.owners)

    @property
    def min_matched(self) -> int:
        return min((o.matched for o in self.owners), default=0)

    @property
    def bits(self) -> int:
        return self.owners[0].bits if self.owners else 0

    @property
    def max_p_value(self) -> float:
        return max((o.p_value for o in self.owners), default=1.0)

    @property
    def max_sign_flip_p_value(self) -> float:
        return max((o.sign_flip_p_value for o in self.owners), default=1.0)

    @property
    def verdict(self) -> bool:
        """True iff every owner still claims ownership (the watermark survived)."""
        return bool(self.owners) and all(o.verdict for o in self.owners)

    def to_json(self) -> dict[str, Any]:
        return {"attack": self.attack, "strength": self.strength, "label": self.label,
                "bits": self.bits, "min_matched": self.min_matched, "max_p_value": self.max_p_value,
                "claims": self.claims, "claims_sign_flip": self.claims_sign_flip,
                "max_sign_flip_p_value": self.max_sign_flip_p_value,
                "owners_total": len(self.owners), "verdict": self.verdict,
                "task_loss": self.task_loss, "delta_task_loss": self.delta_task_loss,
                "function_change": self.function_change,
                "owners": [{"owner": o.owner, "key_id": o.key_id, "bits": o.bits, "matched": o.matched,
                            "p_value": o.p_value, "verdict": o.verdict,
                            "sign_flip_p_value": o.sign_flip_p_value} for o in self.owners]}


@torch.no_grad()
def task_loss(model: torch.nn.Module, data: torch.Tensor, batch: int = 64) -> float:
    """Mean next-token loss of ``model`` on ``data`` (``[n, seq]`` token ids)."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, data.shape[0], batch):
        x = data[i:i + batch]
        total += float(model(input_ids=x, labels=x).loss) * x.shape[0]
        n += x.shape[0]
    model.train(was)
    return total / max(n, 1)


def seeded_loss(model: torch.nn.Module, batch: torch.Tensor, dropout: torch.Generator) -> torch.Tensor:
    """The task loss of ``batch`` with its dropout masks seeded from ``dropout`` (the global RNG left as it
    was): an attacker's fine-tuning repeats exactly, and runs sharing a seed share their masks."""
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=dropout)))
        return model(input_ids=batch, labels=batch).loss


@torch.no_grad()
def logits(model: torch.nn.Module, data: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    out = model(input_ids=data[:16]).logits.detach().double()
    model.train(was)
    return out


def measure(model: torch.nn.Module, keys: Sequence[SignKey], data: torch.Tensor, *, attack: str,
            strength: float, label: str, reference_loss: float, reference_logits: torch.Tensor | None = None,
            significance: float = DEFAULT_SIGNIFICANCE, base: torch.nn.Module | None = None) -> AttackResult:
    """Verify every key on the attacked ``model`` and price the attack in task loss. With ``base`` (the
    public starting model) the keys are read as the audit reads them: after undoing a residual-stream
    rotation (:mod:`fedguard.watermark.alignment`)."""
    owners = []
    for key in keys:
        mark = SignWatermark(key, model, align_to=base)
        d = mark.detect(significance)
        flip = mark.detect(significance, test="sign-flip")
        owners.append(OwnerOutcome(key.owner, key.key_id, d.bits, d.matched, d.p_value, d.verdict,
                                   flip.p_value, significance))
    loss = task_loss(model, data)
    change = math.nan
    if reference_logits is not None:
        change = float((logits(model, data) - reference_logits).abs().max())
    return AttackResult(attack, strength, label, tuple(owners), loss, loss - reference_loss, change)
