"""Ownership decisions with a statistical guarantee: :class:`Detection` and the exact binomial test.

The null hypothesis H0 is "this model was not trained with this key". A key's secret (signature bits,
or trigger responses) is drawn uniformly at random *independently of the model* under H0, so:

* sign watermark: each extracted bit agrees with the uniform ±1 key bit with probability exactly 1/2,
  independently across bits, whatever the model's parameters are (a bit extracted as exactly 0 counts as
  a disagreement, which only makes the test conservative): ``matched ~ Binomial(N, 1/2)``;
* backdoor watermark: the model's greedy answer to a trigger equals a uniform random response of
  ``L`` tokens over an alphabet of ``V`` tokens with probability at most ``V^-L``:
  ``matched`` is stochastically dominated by ``Binomial(T, V^-L)``.

The p-value is the exact upper tail ``P[X ≥ matched]`` (``scipy.stats.binom.sf``), and ownership is
claimed when ``p ≤ significance`` (default 1e-6). FedIPR itself reports a bit match rate without a
decision rule; the test here gives a false-claim probability of at most ``significance`` per key tried.

**The sign-flip test** (:func:`sign_flip_p_value`, ``test="sign-flip"``) uses the same symmetry with the
projections' magnitudes: given ``|z|``, the key bits are still independent fair signs under H0, so the
statistic ``S = Σ_j b_j z_j`` is distributed as ``Σ_j ε_j |z_j|`` with Rademacher ``ε`` (Fisher's
randomisation test for the sign of a mean). Bits that keep a wide margin count for more than bits
pushed to near 0; against Gaussian perturbations of the projections its Pitman efficiency relative to
the sign count is π/2 (the classical t-test vs. sign-test ratio). The tail is computed exactly on
weights rounded *down* to a grid, with the rounding remainder subtracted from the threshold, so the
p-value returned is never below the exact one. Which test a claim uses must be fixed before looking
(a claimant who tries both and keeps the smaller p doubles the false-claim rate).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.stats import binom

from fedguard.checks import check_number
from fedguard.errors import ConfigError

DEFAULT_SIGNIFICANCE = 1e-6

TESTS: tuple[str, ...] = ("binomial", "sign-flip")


def binomial_p_value(matched: int, n: int, p_null: float = 0.5) -> float:
    """``P[Binomial(n, p_null) ≥ matched]``, exact."""
    if n < 0 or not 0 <= matched <= n:
        raise ConfigError(f"need 0 <= matched <= n, got matched={matched}, n={n}")
    check_number("p_null", p_null, low=0, high=1, low_open=True, high_open=True)
    if matched == 0:
        return 1.0
    return float(binom.sf(matched - 1, n, p_null))


def sign_flip_p_value(agreements: np.ndarray, *, resolution: int = 2048, erased: float = 0.0) -> float:
    """``P[Σ_j ε_j w_j ≥ S]`` for ``S = Σ_j a_j``, ``w_j = |a_j|`` and independent fair signs ``ε_j`` — an
    upper bound on the exact sign-flip p-value of the agreements ``a_j = b_j z_j`` that is tight to within
    one grid step per bit.

    Weights are rounded down, ``u_j = ⌊w_j / q⌋`` with ``q = max w / resolution``, and the remainders
    ``R = Σ_j (w_j − q u_j) ≥ 0`` bound the rounding: ``Σ ε w ≤ q Σ ε u + R``, so
    ``P[Σ ε w ≥ S] ≤ P[q Σ ε u ≥ S − R]``. With ``T = Σ_{ε_j = +1} u_j`` (``Σ ε u = 2T − U``) the right side
    is an exact tail of the subset-sum distribution of ``u``, computed by one convolution per bit
    (``O(N² · resolution)``). Agreements with ``|a_j| ≤ erased`` get weight 0 (erased bits say nothing).
    """
    a = np.asarray(agreements, dtype=np.float64).reshape(-1)
    if a.size == 0 or not np.all(np.isfinite(a)):
        raise ConfigError(f"sign-flip test needs a non-empty vector of finite agreements, got {a.size} value(s)")
    if resolution < 1:
        raise ConfigError(f"resolution must be >= 1, got {resolution}")
    w = np.where(np.abs(a) > erased, np.abs(a), 0.0)
    s = float(np.where(w > 0, a, 0.0).sum())
    top = float(w.max())
    if top == 0.0 or s <= 0.0:
        return 1.0
    q = top / resolution
    u = np.floor(w / q).astype(np.int64)
    remainder = float((w - q * u).sum())
    total = int(u.sum())
    # P[2T - U >= (s - remainder)/q]: the smallest integer T that qualifies (1e-9 of slack: conservative)
    t0 = math.ceil(((s - remainder) / q + total) / 2 - 1e-9)
    if t0 <= 0:
        return 1.0
    t0 = min(t0, total)  # S <= qU + R, so only float rounding can put the threshold above U
    pmf = np.zeros(total + 1)
    pmf[0] = 1.0
    size = 1
    for uj in u[u > 0]:
        pmf[uj:size + uj] += pmf[:size].copy()
        pmf[:size + uj] *= 0.5
        size += int(uj)
    return float(min(1.0, pmf[t0:].sum()))


def check_significance(significance: float) -> float:
    """``significance`` as a float in (0, 1), or :class:`ConfigError`."""
    return check_number("significance", significance, low=0, high=1, low_open=True, high_open=True)


@dataclass(frozen=True, slots=True)
class BlockAgreement:
    """Bits matched within one target block (or one trigger for a backdoor key)."""

    label: str
    bits: int
    matched: int

    @property
    def agreement(self) -> float:
        return self.matched / self.bits if self.bits else math.nan


@dataclass(frozen=True, slots=True)
class Detection:
    """The outcome of verifying one key against one model.

    ``verdict`` is True (ownership claimed) iff ``p_value <= significance``.
    """

    key_id: str
    owner: str
    scheme: str
    bits: int
    matched: int
    p_value: float
    significance: float
    p_null: float = 0.5
    blocks: tuple[BlockAgreement, ...] = field(default_factory=tuple)
    test: str = "binomial"

    @property
    def bit_error_rate(self) -> float:
        return 1.0 - self.matched / self.bits if self.bits else math.nan

    @property
    def verdict(self) -> bool:
        return self.p_value <= self.significance

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["blocks"] = [asdict(b) for b in self.blocks]
        out["bit_error_rate"] = self.bit_error_rate
        out["verdict"] = self.verdict
        return out

    def summary(self) -> str:
        who = self.owner or self.key_id
        claim = "OWNERSHIP CLAIMED" if self.verdict else "no claim"
        return (f"{who}: {self.matched}/{self.bits} {'bits' if self.scheme == 'sign' else 'triggers'} matched, "
                f"p = {self.p_value:.3g} (significance {self.significance:g}) -> {claim}")


def detection(
    *,
    key_id: str,
    owner: str,
    scheme: str,
    bits: int,
    matched: int,
    significance: float = DEFAULT_SIGNIFICANCE,
    p_null: float = 0.5,
    blocks: tuple[BlockAgreement, ...] = (),
) -> Detection:
    """Build a :class:`Detection`, computing the exact binomial p-value."""
    significance = check_significance(significance)
    return Detection(key_id, owner, scheme, bits, matched, binomial_p_value(matched, bits, p_null),
                     significance, p_null, blocks)
