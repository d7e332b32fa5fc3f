"""Client-level DP with Poisson client sampling (q = 0.1): 100 rounds of the round loop are accounted as
dp_accounting's Poisson-sampled Gaussian (amplification by subsampling, central placement)."""

from __future__ import annotations

import dp_accounting
import numpy as np

from fedguard.dp import ClientDPConfig, ClientLevelDP, PrivacyAccountant, sample_clients
from fedguard.rng import SecureRNG


def test_q01_over_100_rounds_matches_dp_accounting_pld_within_one_percent() -> None:
    q, z, rounds, population = 0.1, 1.0, 100, 1000
    dp = ClientLevelDP(ClientDPConfig(clip_norm=1.0, noise_multiplier=z, sampling_rate=q, population=population),
                       accountant=PrivacyAccountant(target_delta=1e-5, population=population,
                                                             pld_discretization=1e-3),
                       rng=SecureRNG.for_testing("sampled"))
    sampler = SecureRNG.for_testing("sample")
    for r in range(rounds):
        chosen = sample_clients(range(population), q, sampler)
        dp.begin_round(r)
        # the sampled count is never used by the release (fixed denominator q*N); an empty sample releases noise
        dp.finalize(np.zeros(8, dtype=np.float32), total_weight=max(len(chosen), 1))
    reference = dp_accounting.pld.PLDAccountant()
    reference.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    assert dp.accountant is not None
    ours, theirs = dp.accountant.epsilon(), reference.get_epsilon(1e-5)
    assert abs(ours - theirs) <= 0.01 * theirs
    # and amplification matters: the same rounds without sampling cost several times more
    unsampled = dp_accounting.pld.PLDAccountant()
    unsampled.compose(dp_accounting.GaussianDpEvent(z), rounds)
    assert unsampled.get_epsilon(1e-5) > 3 * ours
