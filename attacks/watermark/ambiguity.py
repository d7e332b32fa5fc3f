"""Ambiguity attacks: claim a model one did not watermark.

* **Offset forgery.** With any seed, read ``Eᵀφ(θ)/s`` off the model and set the key's offsets to
  ``z₀ = Eᵀφ(θ)/s − b·margin``: every bit matches, p = 2^-N, on any model. Refused by the audit, which
  recomputes offsets from the base model (:mod:`fedguard.watermark.calibration`).
* **Seed trying.** Honest keys (offsets recomputed from the base model), fresh seeds, keep the best:
  each try wins with probability at most the significance α, so about 1/α tries are needed
  (docs/watermark.md tabulates the work factor per level); and even a winning seed has no commitment that
  predates the model (:mod:`fedguard.watermark.commitment`), which the audit requires.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from fedguard.errors import ConfigError
from fedguard.rng import SecureRNG
from fedguard.watermark.calibration import check_calibration
from fedguard.watermark.keys import SignKey
from fedguard.watermark.sign import SignWatermark, make_sign_key
from fedguard.watermark.verify import DEFAULT_SIGNIFICANCE


@dataclass(frozen=True, slots=True)
class AmbiguityResult:
    """A false claim: what the bits alone say, and what the audit decides (``audit_verdict``)."""

    attack: str
    strength: float
    label: str
    bits: int
    matched: int
    p_value: float
    bits_verdict: bool
    audit_verdict: bool
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"attack": self.attack, "strength": self.strength, "label": self.label, "bits": self.bits,
                "matched": self.matched, "p_value": self.p_value, "bits_verdict": self.bits_verdict,
                "audit_verdict": self.audit_verdict, "reason": self.reason}


def forge_offsets(key: SignKey, model: torch.nn.Module, margin: float = 0.5) -> SignKey:
    """``key`` with offsets rewritten so that every bit matches on ``model``."""
    wm = SignWatermark(replace(key, blocks=tuple(replace(b, offset=(0.0,) * b.bits) for b in key.blocks)), model)
    z = wm.extract()
    bits = key.signature()
    target = z - bits * margin
    blocks = [replace(b, offset=tuple(float(v) for v in target[sl]))
              for b, sl in zip(key.blocks, key.block_bit_slices(), strict=True)]
    return key.with_blocks(blocks)


def offset_forgery(model: torch.nn.Module, base: torch.nn.Module, template: SignKey, *,
                   significance: float = DEFAULT_SIGNIFICANCE, rng: SecureRNG | None = None) -> AmbiguityResult:
    """Forge a key for ``model`` and put it to the audit's recalibration against ``base``."""
    honest = make_sign_key(base, like=template, owner="forger", rng=rng or SecureRNG())
    forged = forge_offsets(honest, model)
    d = SignWatermark(forged, model).detect(significance)
    cal = check_calibration(forged, base)
    accepted = d.verdict and cal.accepted
    return AmbiguityResult("ambiguity: offset forgery", 1.0, "chosen offsets", d.bits, d.matched, d.p_value,
                           d.verdict, accepted, "accepted" if accepted else f"refused: {cal.status} ({cal.detail})")


def seed_trying(model: torch.nn.Module, base: torch.nn.Module, template: SignKey, *, tries: int,
                significance: float = DEFAULT_SIGNIFICANCE, rng: SecureRNG | None = None) -> AmbiguityResult:
    """Try ``tries`` fresh seeds with honest (recomputed) offsets; report the best. The audit refuses it
    unless a commitment predating the model matches — which a seed found after the fact cannot have."""
    if tries < 1:
        raise ConfigError(f"tries must be >= 1, got {tries}")
    rng = rng or SecureRNG()
    best = None
    for t in range(tries):
        key = make_sign_key(base, like=template, owner="seed-trier", rng=rng.spawn(f"try/{t}"))
        d = SignWatermark(key, model).detect(significance)
        if best is None or d.matched > best.matched:
            best = d
    if best is None:  # unreachable: tries >= 1
        raise ConfigError("no seed was tried")
    return AmbiguityResult("ambiguity: seed trying", float(tries), f"{tries} seeds", best.bits, best.matched,
                           best.p_value, best.verdict, False,
                           "refused: no commitment predating the model" if best.verdict else
                           f"no claim even before the commitment check (best p = {best.p_value:.3g})")
