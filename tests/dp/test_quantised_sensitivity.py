"""Central DP is calibrated to what the server actually sums: stochastically rounded fixed-point vectors.

Attack (issue 13, item 3): a client whose clipped update has norm exactly C, spread over every coordinate,
is rounded coordinate-wise to the grid 1/s; its decoded contribution has norm up to C + √d/s, far above
C at value_bits 8. The noise must be calibrated to that decoded bound.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedguard.dp import AdaptiveClipping, ClientDPConfig, ClientLevelDP
from fedguard.encoding import FixedPointSpec
from fedguard.federation import PlaintextAggregator, aggregate_updates
from fedguard.rng import SecureRNG
from fedguard.updates import ClientUpdate

D = 50_000
C = 0.1


def _worst_case_decoded_norm(dp: ClientLevelDP, spec: FixedPointSpec, seed: str) -> float:
    """Norm of one client's decoded contribution for a norm-C update with every coordinate off the grid."""
    signs = np.where(np.arange(D) % 2 == 0, 1.0, -1.0)
    vector = (signs * (C / math.sqrt(D)) * (1 + 0.37 / spec.scale)).astype(np.float32)  # between grid points
    clipped = dp.clip(ClientUpdate(0, 1, vector, 1))
    out = aggregate_updates([clipped], PlaintextAggregator(), spec, round_id=1, rng=SecureRNG.for_testing(seed))
    return float(np.linalg.norm(out.mean.astype(np.float64)))


@pytest.mark.parametrize("value_bits", [8, 12, 16, 24])
@pytest.mark.parametrize("adaptive", [False, True])
def test_decoded_sensitivity_within_one_percent_of_the_calibrated_one(value_bits: int, adaptive: bool) -> None:
    config = ClientDPConfig(clip_norm=C, noise_multiplier=1.0, population=10,
                            adaptive=AdaptiveClipping(count_noise_stddev=2.0) if adaptive else None)
    dp = ClientLevelDP(config)
    spec = FixedPointSpec(clip=1.0, value_bits=value_bits, ring_bits=64, max_weight=1)  # the trainer's encoding
    excess = dp.calibrate_to_encoding(spec, D)
    assert excess == pytest.approx(math.sqrt(D + adaptive) / spec.scale)
    planned = dp.noise_sensitivity  # (adaptive clipping moves the clip norm after the round)
    worst = max(_worst_case_decoded_norm(dp, spec, f"{value_bits}/{i}") for i in range(3))
    assert worst <= 1.01 * planned
    if value_bits == 8:  # the attack: calibrating to the clip norm alone under-noises the sum
        assert worst > 1.5 * dp.sensitivity
    # the release adds N(0, (z · noise_sensitivity)^2) per coordinate: check its std on a zero aggregate
    dp.begin_round(1)
    width = D + (1 if adaptive else 0)
    result = dp.finalize(np.zeros(width, dtype=np.float32), total_weight=1)
    std = float(np.std(result.update.astype(np.float64))) * dp._denominator(1)
    assert std == pytest.approx(planned, rel=0.05)


def test_the_ledger_label_states_the_quantisation_excess() -> None:
    from fedguard.dp import PrivacyAccountant

    dp = ClientLevelDP(ClientDPConfig(clip_norm=C, noise_multiplier=1.0, population=10),
                       accountant=PrivacyAccountant(target_delta=1e-3))
    spec = FixedPointSpec(clip=1.0, value_bits=8, ring_bits=64, max_weight=1)
    excess = dp.calibrate_to_encoding(spec, D)
    dp.begin_round(1)
    dp.finalize(np.zeros(D, dtype=np.float32), total_weight=2)
    assert dp.accountant is not None
    assert f"post-quantisation excess {excess:.4g}" in dp.accountant.ledger[-1].label
