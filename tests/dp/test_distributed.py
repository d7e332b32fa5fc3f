"""Distributed discrete Gaussian: the noise is what it claims, sums match the central noise, accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedguard.dp.accountant import PrivacyAccountant
from fedguard.dp.distributed import (
    DistributedDiscreteGaussian,
    discrete_gaussian_pmf,
    sample_discrete_gaussian,
    sample_discrete_gaussian_exact,
)
from fedguard.dp.events import DistributedDiscreteGaussianEvent, GaussianEvent
from fedguard.encoding import FixedPointSpec
from fedguard.errors import ConfigError, RingOverflowError
from fedguard.rng import SecureRNG

ALPHA = 1e-3  # fixed significance of every goodness-of-fit test here


def _chi_square_pvalue(draws: np.ndarray, sigma: float, cut: int) -> float:
    """Chi-square goodness of fit against N_Z(0, sigma^2), bins -cut..cut with both tails merged."""
    values = np.arange(-cut, cut + 1)
    probs = discrete_gaussian_pmf(values, sigma)
    tail = (1.0 - probs.sum()) / 2
    observed = np.array(
        [np.sum(draws < -cut)] + [np.sum(draws == v) for v in values] + [np.sum(draws > cut)], dtype=float
    )
    expected = np.concatenate([[tail], probs, [tail]]) * draws.size
    return float(stats.chisquare(observed, expected).pvalue)


def test_vectorised_sampler_fits_the_discrete_gaussian_pmf():
    draws = sample_discrete_gaussian(50_000, 3.0, SecureRNG.for_testing("dg/vec"))
    assert _chi_square_pvalue(draws, 3.0, 9) > ALPHA


def test_exact_sampler_fits_the_discrete_gaussian_pmf():
    draws = sample_discrete_gaussian_exact(4_000, 2.0, SecureRNG.for_testing("dg/exact"))
    assert _chi_square_pvalue(draws, 2.0, 6) > ALPHA


def test_sampler_rejects_a_wrong_scale():
    """The test above can fail: the same draws are far from N_Z(0, 3.3^2)."""
    draws = sample_discrete_gaussian(50_000, 3.0, SecureRNG.for_testing("dg/vec"))
    assert _chi_square_pvalue(draws, 3.3, 9) < ALPHA


def test_distributed_noise_summed_over_clients_matches_the_central_distribution():
    n, local = 9, 2.0
    rng = SecureRNG.for_testing("dg/sum")
    summed = sum(sample_discrete_gaussian(20_000, local, rng.spawn(f"client/{i}")) for i in range(n))
    central_sigma = math.sqrt(n) * local
    assert _chi_square_pvalue(summed, central_sigma, 15) > ALPHA
    # and a two-sample test against central draws of N_Z(0, n s^2)
    central = sample_discrete_gaussian(20_000, central_sigma, rng.spawn("central"))
    edges = np.arange(-15.5, 16.5)
    table = np.array([np.histogram(np.clip(x, -15, 15), edges)[0] for x in (summed, central)])
    assert stats.chi2_contingency(table).pvalue > ALPHA


def test_ddg_accounting_tends_to_the_gaussian_and_never_undercuts_it():
    ddg = DistributedDiscreteGaussianEvent(local_stddev=1000.0, n_clients=10, l2_sensitivity=3000.0,
                                           l1_sensitivity=9e6, dimension=10_000)
    a = PrivacyAccountant(target_delta=1e-5, backend="rdp")
    a.record(ddg, 20)
    b = PrivacyAccountant(target_delta=1e-5, backend="rdp")
    b.record(GaussianEvent(ddg.central_noise_multiplier), 20)
    assert b.epsilon() <= a.epsilon() <= b.epsilon() * 1.001


def test_small_local_scale_pays_for_the_tau_term():
    big = DistributedDiscreteGaussianEvent(1000.0, 10, 3000.0, 9e6, 100)
    small = DistributedDiscreteGaussianEvent(0.6, 10, 1.8, 3.24, 100)  # same ratio, tiny scale
    assert big.tau == 0.0 and small.tau > 0
    assert small.zcdp_bound().rho + small.zcdp_bound().xi > big.zcdp_bound().rho


def _mechanism(**kw):
    args = dict(noise_multiplier=1.0, clip_norm=1.0, dimension=100,
                spec=FixedPointSpec(clip=1.0, value_bits=20, ring_bits=64, max_weight=1), min_survivors=8)
    args.update(kw)
    return DistributedDiscreteGaussian(**args)


def test_fewer_survivors_mean_less_noise_and_more_epsilon():
    mech = _mechanism()
    eps = []
    for survivors in (12, 8, 5):
        acc = PrivacyAccountant(target_delta=1e-5, backend="rdp")
        acc.record(mech.event(survivors), 10)
        eps.append(acc.epsilon())
    assert eps[0] < eps[1] < eps[2]
    # planned for 8: with exactly 8 survivors the noise multiplier is the configured one
    assert mech.event(8).central_noise_multiplier == pytest.approx(1.0)


def test_colluding_clients_are_subtracted_from_the_noise():
    honest = _mechanism().event(10)
    colluded = _mechanism(colluding=2).event(10)
    assert colluded.n_clients == 8 and colluded.local_stddev > honest.local_stddev


def test_ring_headroom_is_checked_before_encoding():
    with pytest.raises(RingOverflowError, match="ring_bits=22"):
        _mechanism(spec=FixedPointSpec(clip=1.0, value_bits=16, ring_bits=22, max_weight=1)).check_headroom(100)


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier must be a finite number > 0, got 0.0"),
        ({"clip_norm": -1.0}, "clip_norm must be a finite number > 0, got -1.0"),
        ({"min_survivors": 0}, "min_survivors must be an int >= 1, got 0"),
        ({"colluding": 8}, "colluding must be < min_survivors=8, got 8"),
        ({"noise_multiplier": 0.05, "spec": FixedPointSpec(clip=1.0, value_bits=3, ring_bits=64, max_weight=1)}, "raise value_bits"),
    ],
)
def test_bad_mechanism_input_is_a_typed_error_naming_the_value(kw, needle):
    with pytest.raises(ConfigError) as err:
        _mechanism(**kw)
    assert needle in str(err.value)
