"""The one-run lower bound on ε (Steinke, Nasr, Jagielski, "Privacy auditing with one (1) training run",
NeurIPS 2023), computed with scipy.

The experiment. ``m`` canaries are each included in the training input independently with probability
½ (``S_i ∈ {−1, +1}`` uniform). After one run the auditor scores every canary and guesses ``T_i ∈ {−1, 0,
+1}``: "in" for the ``k₊`` highest scores, "out" for the ``k₋`` lowest, abstaining on the rest; ``r = k₊ +
k₋`` guesses, ``v`` of them correct (``T_i = S_i``).

The bound (their Theorem 3.1 for ``δ = 0``; Theorem 5.2 / Algorithm 2 of their appendix for ``δ > 0``).
If the training algorithm is ``(ε, δ)``-DP with respect to adding or removing one canary, then for every
``v``,

    P[W ≥ v] ≤ β + 2m·δ·α,    with  q = e^ε / (1 + e^ε),  β = P[Binomial(r, q) ≥ v],
                                    α = max_{1≤i≤v} P[v − i ≤ Binomial(r, q) < v] / i,

(``W`` the number of correct guesses; ``β`` alone when ``δ = 0``: ``W`` is stochastically dominated by
``Binomial(r, q)``, randomised response being the worst case). :func:`p_value` is that right-hand side.
Observing ``v`` correct guesses with ``p_value(ε) < 1 − confidence`` rejects ``(ε, δ)``-DP at that
confidence; since ``(ε', δ)``-DP implies ``(ε, δ)``-DP for ``ε' < ε``, every smaller ε is rejected too,
and :func:`epsilon_lower_bound` returns the largest rejected ε (bisection on the p-value, 60 halvings).

Choosing the number of guesses (the paper tunes ``k₊, k₋`` per experiment; its figures report the best).
A bound is valid only for a number of guesses fixed before the scores are seen. :func:`audit_scores`
therefore either uses one pre-set ``r`` (no correction), or tries a small grid of guess counts and
reports the largest bound with each test run at ``(1 − confidence)/|grid|`` (Bonferroni): by the union
bound, the probability that *any* of the grid's bounds exceeds the true ε is at most ``1 − confidence``,
so the maximum is a valid bound at the stated confidence.

The ceiling. Even a perfect attack (every guess correct) cannot certify more than
``max_r ε(m, r, v = r)`` over the grid, at the grid's corrected level, with ``m`` canaries: :func:`ceiling`
prints it beside each result, so "no leak found" (bound well below the ceiling) can be told from "too few
canaries to see it" (bound at the ceiling, or the accountant's ε above it). The report also gives the
ceiling of a single pre-set guess of every canary, ``ε(m, m, m)`` (``ideal_ceiling``): with ``m = 1,000``,
``δ = 0``, 95%, ``ε ≤ 5.81`` (``q^1000 = 0.05``); 5.78 at ``δ = 1e-5``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedguard.checks import check_int, check_number
from fedguard.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIDENCE",
    "DEFAULT_GUESS_FRACTIONS",
    "AuditBound",
    "GuessResult",
    "audit_scores",
    "ceiling",
    "epsilon_lower_bound",
    "guess_counts",
    "p_value",
]

DEFAULT_CONFIDENCE = 0.95
DEFAULT_GUESS_FRACTIONS: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.5, 0.8)
"""Guesses ``r/m`` tried by default (half "in" from the top, half "out" from the bottom of the scores). The
largest is 0.8, not 1: with ``r/2`` guesses of each kind, ``r = m`` can be all correct only if exactly half
the canaries were drawn in, while ``r = 0.8m`` can be whenever each side holds ``≥ 0.4m`` (with 200 canaries,
about 99.5% of draws)."""

_BISECTIONS = 60


def _check_counts(m: int, r: int, v: int) -> None:
    check_int("m (canaries)", m, low=1)
    check_int("r (guesses)", r, low=0, high=m)
    check_int("v (correct guesses)", v, low=0, high=r)


def _check_delta(delta: float) -> None:
    check_number("delta", delta, low=0.0, high=1.0, high_open=True)


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """``min(1, β + 2m·δ·α)``: an upper bound on ``P[≥ v of r guesses correct]`` under ``(ε, δ)``-DP
    (module doc). ``m`` canaries, ``r`` guesses, ``v`` correct."""
    from scipy import special, stats

    _check_counts(m, r, v)
    check_number("epsilon", epsilon, low=0.0)
    _check_delta(delta)
    if v == 0:
        return 1.0
    q = float(special.expit(epsilon))
    beta = float(stats.binom.sf(v - 1, r, q))
    if delta == 0:
        return min(beta, 1.0)
    i = np.arange(1, v + 1)
    # P[v - i <= B < v] = P[B >= v - i] - P[B >= v]
    window = stats.binom.sf(v - i - 1, r, q) - beta
    alpha = float(np.max(window / i))
    return min(beta + 2.0 * m * delta * max(alpha, 0.0), 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float, significance: float) -> float:
    """The largest ε with ``p_value(m, r, v, ε, δ) < significance`` (0 when even ε = 0 is not rejected).

    ``significance`` = 1 − confidence (e.g. 0.05). Bisection to ~1e-12 relative on a bracket found by
    doubling."""
    _check_counts(m, r, v)
    _check_delta(delta)
    check_number("significance", significance, low=0.0, high=1.0, low_open=True, high_open=True)
    if p_value(m, r, v, 0.0, delta) >= significance:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < significance:
        lo, hi = hi, 2.0 * hi
        if hi > 1e4:  # v = r = m with tiny significance never gets here; guard against a non-terminating loop
            raise ConfigError(f"no finite epsilon bound for m={m}, r={r}, v={v}, delta={delta}")
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) < significance:
            lo = mid
        else:
            hi = mid
    return lo


def guess_counts(m: int, fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS) -> tuple[int, ...]:
    """The grid of guess counts ``r`` (even, ``2 <= r <= m``, distinct, ascending) for ``m`` canaries."""
    check_int("m (canaries)", m, low=2)
    if not fractions:
        raise ConfigError("the grid of guess fractions is empty")
    out = set()
    for f in fractions:
        check_number("guess fraction", f, low=0.0, high=1.0, low_open=True)
        r = max(2, 2 * round(f * m / 2))
        out.add(min(r, m - (m % 2)))
    return tuple(sorted(out))


@dataclass(frozen=True, slots=True)
class GuessResult:
    """One guess count of the grid: ``r`` guesses (``k_in`` top scores "in", ``k_out`` bottom "out"), ``v``
    correct, and the bound it certifies at the per-test significance."""

    r: int
    k_in: int
    k_out: int
    v: int
    epsilon: float


@dataclass(frozen=True, slots=True)
class AuditBound:
    """The audit's lower bound on ε and what it rests on.

    ``epsilon``: the bound (max over the grid, Bonferroni-corrected); ``ceiling``: the most any attack
    could certify with these canaries and this grid (every guess correct); ``ideal_ceiling``: ``ε(m, m, m)``
    uncorrected, every canary guessed right by one pre-set guess (the issue's "1,000 canaries → 5.8");
    ``per_guess``: each grid
    point; ``best``: the grid point that gave ``epsilon``; ``confidence``, ``delta``, ``m``, ``in_count``
    (canaries that were in)."""

    epsilon: float
    ceiling: float
    ideal_ceiling: float
    confidence: float
    delta: float
    m: int
    in_count: int
    per_guess: tuple[GuessResult, ...]
    best: GuessResult
    correction: str

    @property
    def per_test_significance(self) -> float:
        return (1.0 - self.confidence) / len(self.per_guess)

    def to_json(self) -> dict[str, object]:
        return {
            "epsilon_lower": self.epsilon, "ceiling": self.ceiling, "ideal_ceiling": self.ideal_ceiling,
            "confidence": self.confidence,
            "delta": self.delta, "canaries": self.m, "canaries_in": self.in_count, "correction": self.correction,
            "per_test_significance": self.per_test_significance,
            "best": {"guesses": self.best.r, "in": self.best.k_in, "out": self.best.k_out,
                     "correct": self.best.v, "epsilon": self.best.epsilon},
            "grid": [{"guesses": g.r, "in": g.k_in, "out": g.k_out, "correct": g.v, "epsilon": g.epsilon}
                     for g in self.per_guess],
        }


def ceiling(m: int, *, delta: float, confidence: float = DEFAULT_CONFIDENCE,
            guesses: Sequence[int] | None = None) -> float:
    """The largest bound ``m`` canaries can give: every guess correct, at the grid's corrected level.

    ``guesses``: the grid of guess counts (default :func:`guess_counts`); one count = no correction."""
    grid = tuple(guesses) if guesses is not None else guess_counts(m)
    sig = (1.0 - confidence) / len(grid)
    return max(epsilon_lower_bound(m, r, r, delta=delta, significance=sig) for r in grid)


def audit_scores(scores: np.ndarray, included: np.ndarray, *, delta: float,
                 confidence: float = DEFAULT_CONFIDENCE, guesses: int | Sequence[int] | None = None) -> AuditBound:
    """The one-run bound from canary ``scores`` (higher = more likely "in") and the truth ``included``.

    ``guesses``: one count ``r`` fixed in advance (no multiple-testing correction), a grid of counts
    (Bonferroni over the grid), or ``None`` for :func:`guess_counts` of ``m``. Each count ``r`` guesses
    "in" for the ``⌈r/2⌉`` highest and "out" for the ``⌊r/2⌋`` lowest scores. Ties are broken by canary
    index (deterministic; the scores of a real run are continuous)."""
    s = np.asarray(scores, dtype=np.float64)
    b = np.asarray(included)
    if s.ndim != 1 or b.shape != s.shape:
        raise ConfigError(f"scores and included must be 1-D of the same length, got {s.shape} and {b.shape}")
    if not np.all(np.isfinite(s)):
        raise ConfigError("canary scores must be finite (a diverged run cannot be audited)")
    if b.dtype != np.bool_:
        raise ConfigError(f"included must be a boolean array, got dtype {b.dtype}")
    check_number("confidence", confidence, low=0.0, high=1.0, low_open=True, high_open=True)
    _check_delta(delta)
    m = int(s.size)
    if m < 2:
        raise ConfigError(f"the audit needs at least 2 canaries, got {m}")
    if guesses is None:
        grid = guess_counts(m)
        correction = f"Bonferroni over {len(grid)} guess counts"
    elif isinstance(guesses, int | np.integer):
        grid = (check_int("guesses", int(guesses), low=1, high=m),)
        correction = "none (one guess count fixed in advance)"
    else:
        grid = tuple(sorted({check_int("guesses", int(g), low=1, high=m) for g in guesses}))
        if not grid:
            raise ConfigError("the grid of guess counts is empty")
        correction = f"Bonferroni over {len(grid)} guess counts" if len(grid) > 1 else "none (one guess count)"
    sig = (1.0 - confidence) / len(grid)
    order = np.argsort(-s, kind="stable")  # highest score first
    truth = b[order]
    results = []
    for r in grid:
        k_in, k_out = (r + 1) // 2, r // 2
        v = int(truth[:k_in].sum()) + int((~truth[m - k_out:]).sum() if k_out else 0)
        results.append(GuessResult(r, k_in, k_out, v, epsilon_lower_bound(m, r, v, delta=delta, significance=sig)))
    best = max(results, key=lambda g: (g.epsilon, -g.r))
    top = max(epsilon_lower_bound(m, r, r, delta=delta, significance=sig) for r in grid)
    ideal = epsilon_lower_bound(m, m, m, delta=delta, significance=1.0 - confidence)
    return AuditBound(best.epsilon, top, ideal, confidence, float(delta), m, int(b.sum()), tuple(results), best, correction)


def bound_summary(bound: AuditBound, epsilon_accountant: float | None = None) -> str:
    """One line: the bound, the ceiling beside it, and the accountant's ε when given."""
    acc = "" if epsilon_accountant is None else f" vs accountant epsilon {epsilon_accountant:.3g}"
    verdict = ""
    if epsilon_accountant is not None and math.isfinite(epsilon_accountant):
        verdict = ("  VIOLATION: the lower bound exceeds the accountant's epsilon" if bound.epsilon > epsilon_accountant
                   else ("  (accountant's epsilon above the ceiling: these canaries cannot refute it)"
                         if epsilon_accountant >= bound.ceiling else ""))
    return (f"epsilon_lower {bound.epsilon:.3g} (ceiling {bound.ceiling:.3g} with {bound.m} canaries) at "
            f"{bound.confidence:.0%}, delta {bound.delta:g}{acc}{verdict}")
