"""The one-run lower bound (Steinke, Nasr, Jagielski 2023): reference values, properties, and validity
against the mechanism that is exactly ε-DP (randomised response), the worst case of their Theorem 3.1."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special, stats

from audits.dp.bound import (
    audit_scores,
    ceiling,
    epsilon_lower_bound,
    guess_counts,
    p_value,
)
from fedguard.errors import ConfigError


def _p_value_by_sums(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The same quantity written out term by term from the paper's Algorithm 2 (a loop over i with the
    binomial pmf), independent of the vectorised survival-function form under test."""
    q = math.exp(eps) / (1 + math.exp(eps))
    beta = sum(stats.binom.pmf(k, r, q) for k in range(v, r + 1))
    alpha, window = 0.0, 0.0
    for i in range(1, v + 1):
        window += stats.binom.pmf(v - i, r, q)
        alpha = max(alpha, window / i)
    return min(beta + alpha * delta * 2 * m, 1.0)


def test_thousand_canaries_all_correct_give_the_stated_ceiling() -> None:
    # the reference: 1,000 canaries, every guess right, 95% -> about 5.8 (delta = 0: q^1000 = 0.05)
    eps0 = epsilon_lower_bound(1000, 1000, 1000, delta=0.0, significance=0.05)
    assert eps0 == pytest.approx(special.logit(0.05 ** (1 / 1000)), abs=1e-9)
    assert eps0 == pytest.approx(5.809, abs=1e-3)
    # delta > 0 costs a little: the 2m*delta*alpha term
    eps5 = epsilon_lower_bound(1000, 1000, 1000, delta=1e-5, significance=0.05)
    assert 5.7 < eps5 < eps0


@pytest.mark.parametrize(("m", "r", "v", "eps", "delta"), [
    (1000, 600, 600, 5.0, 1e-5), (200, 100, 80, 1.0, 1e-3), (50, 50, 40, 0.5, 0.0), (100, 20, 20, 2.0, 1e-6),
    (1000, 1000, 900, 2.2, 1e-5),
])
def test_p_value_matches_the_algorithm_written_term_by_term(m: int, r: int, v: int, eps: float, delta: float) -> None:
    assert p_value(m, r, v, eps, delta) == pytest.approx(_p_value_by_sums(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


def test_bound_is_where_the_p_value_crosses_the_significance() -> None:
    for m, r, v, delta in [(200, 100, 95, 1e-5), (1000, 600, 600, 1e-5), (500, 200, 170, 0.0)]:
        eps = epsilon_lower_bound(m, r, v, delta=delta, significance=0.05)
        assert eps > 0
        assert p_value(m, r, v, eps * (1 - 1e-6), delta) < 0.05 <= p_value(m, r, v, eps * (1 + 1e-6) + 1e-9, delta)


def test_monotone_in_correct_guesses_confidence_and_delta() -> None:
    bounds = [epsilon_lower_bound(200, 100, v, delta=1e-5, significance=0.05) for v in range(50, 101, 5)]
    assert bounds == sorted(bounds) and bounds[0] == 0.0 and bounds[-1] > 2.5
    assert (epsilon_lower_bound(200, 100, 90, delta=1e-5, significance=0.01)
            < epsilon_lower_bound(200, 100, 90, delta=1e-5, significance=0.05))
    assert (epsilon_lower_bound(200, 100, 90, delta=1e-3, significance=0.05)
            < epsilon_lower_bound(200, 100, 90, delta=0.0, significance=0.05))
    # more canaries, all correct: a higher ceiling
    ceilings = [ceiling(m, delta=1e-5) for m in (50, 100, 200, 1000)]
    assert ceilings == sorted(ceilings)


def test_chance_level_guessing_certifies_nothing() -> None:
    assert epsilon_lower_bound(1000, 1000, 500, delta=1e-5, significance=0.05) == 0.0
    assert epsilon_lower_bound(1000, 1000, 0, delta=1e-5, significance=0.05) == 0.0


def test_guess_grid_and_scores() -> None:
    assert guess_counts(200) == (4, 10, 20, 40, 100, 160)
    scores = np.arange(10, dtype=float)
    included = scores >= 5  # perfectly separable
    bound = audit_scores(scores, included, delta=0.0, guesses=10)
    assert bound.best.v == 10 and bound.correction.startswith("none")
    assert bound.epsilon == pytest.approx(epsilon_lower_bound(10, 10, 10, delta=0.0, significance=0.05))
    flipped = audit_scores(-scores, included, delta=0.0, guesses=10)  # every guess wrong
    assert flipped.best.v == 0 and flipped.epsilon == 0.0


def test_grid_maximum_is_bonferroni_corrected_and_below_its_ceiling() -> None:
    rng = np.random.default_rng(0)
    included = rng.random(400) < 0.5
    scores = included * 3.0 + rng.standard_normal(400)
    bound = audit_scores(scores, included, delta=1e-5)
    assert len(bound.per_guess) == 6 and "Bonferroni over 6" in bound.correction
    sig = 0.05 / 6
    assert bound.per_test_significance == pytest.approx(sig)
    for g in bound.per_guess:
        assert g.epsilon == pytest.approx(epsilon_lower_bound(400, g.r, g.v, delta=1e-5, significance=sig))
    assert bound.epsilon == max(g.epsilon for g in bound.per_guess)
    assert 0 < bound.epsilon <= bound.ceiling == pytest.approx(ceiling(400, delta=1e-5))
    assert bound.ceiling < bound.ideal_ceiling  # the correction and the 0.8 cap cost some headroom


def test_bound_is_valid_against_randomised_response() -> None:
    """An exactly ε-DP mechanism per canary (randomised response: the score says "in" correctly with
    probability e^ε/(1+e^ε)) must give ε_lower > ε in at most 5% of runs (Theorem 3.1; randomised response
    is its worst case, so the rate comes close: 7 of 200 with this seed)."""
    rng = np.random.default_rng(20)
    eps_true, m, runs, exceed = 1.0, 300, 200, 0
    p_true = math.exp(eps_true) / (1 + math.exp(eps_true))
    for _ in range(runs):
        included = rng.random(m) < 0.5
        told = np.where(rng.random(m) < p_true, included, ~included)
        scores = told + 0.01 * rng.standard_normal(m)  # which "in" guesses come first is arbitrary
        if audit_scores(scores, included, delta=0.0).epsilon > eps_true:
            exceed += 1
    # a rate of 5% would give >= this many exceedances with probability 1e-3: far more means an invalid bound
    assert exceed <= stats.binom.isf(1e-3, runs, 0.05)
    assert exceed > 0  # and the bound is not vacuous: it does reach epsilon sometimes


def test_bad_inputs_are_typed_errors() -> None:
    with pytest.raises(ConfigError, match="r \\(guesses\\)"):
        p_value(10, 11, 5, 1.0, 0.0)
    with pytest.raises(ConfigError, match="delta"):
        epsilon_lower_bound(10, 10, 10, delta=1.5, significance=0.05)
    with pytest.raises(ConfigError, match="significance"):
        epsilon_lower_bound(10, 10, 10, delta=0.0, significance=0.0)
    with pytest.raises(ConfigError, match="finite"):
        audit_scores(np.array([1.0, np.nan]), np.array([True, False]), delta=0.0)
    with pytest.raises(ConfigError, match="boolean"):
        audit_scores(np.array([1.0, 2.0]), np.array([1, 0]), delta=0.0)
    with pytest.raises(ConfigError, match="at least 2 canaries"):
        audit_scores(np.array([1.0]), np.array([True]), delta=0.0)
