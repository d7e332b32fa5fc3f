"""The audit recomputes a key's calibration from the public base model: offsets are not the claimant's to choose.

A sign key states, per block, a scale ``s_i`` and offsets ``z₀_i = E_iᵀφ_i(θ₀)/s_i``
(:func:`fedguard.watermark.sign.calibrate`). Verification reads ``sign(E_iᵀφ_i(θ)/s_i − z₀_i)``. If the
offsets were trusted as written, anyone could *forge* a claim on any model: read ``E_iᵀφ_i(θ)/s_i`` off
the model with any seed and set ``z₀ = Eᵀφ(θ)/s − b·ε`` — all N bits match (p = 2^-N), on the real
owner's model, on the public base model, on anything. A checksum does not help (anyone recomputes it).

The defence: θ₀ is public (the base model the run started from; a LoRA adapter starts at ΔW = 0, so
the base model's features *are* φ(θ₀) for norm targets), so the auditor recomputes ``s_i`` and ``z₀_i``
itself and compares. A key whose stated calibration differs from the recomputed one beyond floating-point
noise is refused (the claim is void: either a forgery or a key made for another starting model); a key
whose calibration cannot be recomputed (no base model given, or LoRA/prompt targets with
``reference="initial"``, whose θ₀ is the run's random adapter initialisation) is not verified at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fedguard.watermark.keys import SignKey

CALIBRATION_TOLERANCE = 1e-6
"""Largest accepted ``|z₀(stated) − z₀(recomputed)|`` (units of the block's scale) and relative scale
difference: float64 recomputation on the same weights agrees to ~1e-12; a forged offset must move by
O(1) to flip a bit."""

CalibrationStatus = Literal["recomputed", "mismatch", "unverifiable"]


@dataclass(frozen=True, slots=True)
class CalibrationCheck:
    """Outcome of recomputing a key's calibration. ``status``: ``recomputed`` (the key states what the
    base model gives: the key may verify), ``mismatch`` (refused), ``unverifiable`` (refused: no base
    model, or targets whose θ₀ is not public). ``max_offset_error`` is in units of the block scale."""

    status: CalibrationStatus
    detail: str
    max_offset_error: float = float("nan")

    @property
    def accepted(self) -> bool:
        return self.status == "recomputed"


def recomputable(key: SignKey) -> bool:
    """Whether θ₀ of every block is the public base model (norm targets, or a zero reference)."""
    return key.reference == "zero" or all(b.kind == "norm" for b in key.blocks)


def check_calibration(key: SignKey, base: torch.nn.Module | None,
                      tolerance: float = CALIBRATION_TOLERANCE) -> CalibrationCheck:
    """Recompute ``key``'s scales and offsets on ``base`` and compare with what the key states."""
    from fedguard.watermark.sign import calibrate

    if key.reference == "zero":
        # offsets must be zero; scales only divide z and cannot change a sign
        worst = max((abs(v) for b in key.blocks for v in b.offset), default=0.0)
        if worst > 0:
            return CalibrationCheck("mismatch", f"reference='zero' key states non-zero offsets (up to {worst:.3g})",
                                    worst)
        return CalibrationCheck("recomputed", "reference='zero': offsets are zero, scales cannot change a sign", 0.0)
    if not recomputable(key):
        return CalibrationCheck("unverifiable", "the key's offsets refer to a random initial adapter (LoRA/prompt "
                                "targets with reference='initial'), which the audit cannot recompute")
    if base is None:
        return CalibrationCheck("unverifiable", "no base model to recompute the key's offsets from (pass --base)")
    fresh = calibrate(key, base)
    worst_offset = 0.0
    worst_scale = 0.0
    for stated, ours in zip(key.blocks, fresh.blocks, strict=True):
        worst_offset = max(worst_offset, float(np.max(np.abs(np.subtract(stated.offset, ours.offset)))))
        worst_scale = max(worst_scale, abs(stated.scale - ours.scale) / ours.scale)
    if worst_offset > tolerance or worst_scale > tolerance:
        return CalibrationCheck("mismatch", f"the key's offsets/scales are not those of the base model "
                                f"(offset error up to {worst_offset:.3g}, scale error up to {worst_scale:.3g}): "
                                "a forged key, or one made for another starting model", worst_offset)
    return CalibrationCheck("recomputed", f"offsets and scales recomputed from the base model "
                            f"(agree to {worst_offset:.1e})", worst_offset)
