"""Client-level DP under client sampling (fixed-size vs Poisson, expected denominator, empty samples), the
sensitivity stored with every ledger entry, and the tight KLS bound through dp_accounting's public API."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS, compute_epsilon

from fedguard.dp import (
    ClientDPConfig,
    ClientLevelDP,
    DistributedDiscreteGaussianEvent,
    GaussianEvent,
    PoissonSampledEvent,
    PrivacyAccountant,
)
from fedguard.dp.client_level import sample_fixed_size
from fedguard.encoding import FixedPointSpec
from fedguard.errors import ConfigError
from fedguard.rng import SecureRNG


# -- the sensitivity in the ledger ------------------------------------------------------------------------
def test_ledger_entries_store_the_sensitivity_and_it_survives_a_round_trip() -> None:
    acc = PrivacyAccountant(target_delta=1e-5)
    acc.spend(GaussianEvent(1.0), label="round 1", sensitivity=0.125)
    acc.record(GaussianEvent(1.0), label="round 1", sensitivity=0.25)  # other sensitivity: not merged
    acc.record(GaussianEvent(1.0), label="legacy")
    assert [e.sensitivity for e in acc.ledger] == [0.125, 0.25, None]
    back = PrivacyAccountant.from_json(acc.to_json())
    assert [e.sensitivity for e in back.ledger] == [0.125, 0.25, None]
    assert back.extends(acc) and acc.extends(back)
    assert "sensitivity" not in json.loads(acc.to_json())["ledger"][2]  # older ledgers stay readable
    other = PrivacyAccountant(target_delta=1e-5)
    other.record(GaussianEvent(1.0), label="round 1", sensitivity=0.5)
    assert not acc.extends(other)  # same event and label, another sensitivity: not the same release
    with pytest.raises(ConfigError, match="sensitivity must be"):
        acc.record(GaussianEvent(1.0), sensitivity=-1.0)
    with pytest.raises(ConfigError, match="ledger entry sensitivity must be"):
        PrivacyAccountant.from_dict({**acc.to_dict(), "ledger": [
            {"event": {"type": "gaussian", "noise_multiplier": 1.0}, "count": 1, "sensitivity": "x"}]})
    assert acc.retract("legacy") and acc.ledger[-1].sensitivity == 0.25


def test_central_round_records_the_post_quantisation_sensitivity() -> None:
    config = ClientDPConfig(clip_norm=0.1, noise_multiplier=1.0, sampling_rate=0.3, population=10)
    dp = ClientLevelDP(config, accountant=config.make_accountant(target_delta=1e-3), rng=SecureRNG.for_testing("s"))
    spec = FixedPointSpec(clip=1.0, value_bits=12, ring_bits=64, max_weight=1)
    excess = dp.calibrate_to_encoding(spec, 5000)
    dp.begin_round(0)
    dp.prepay()
    dp.finalize(np.zeros(5000, dtype=np.float32), total_weight=3)
    assert dp.accountant is not None
    (entry,) = dp.accountant.ledger
    assert entry.sensitivity == pytest.approx(0.1 + math.sqrt(5000) / spec.scale) and excess > 0.01
    restored = ClientLevelDP.from_state_dict(json.loads(json.dumps(dp.state_dict())))
    assert restored.accountant is not None and restored.accountant.ledger[0].sensitivity == entry.sensitivity


def test_distributed_round_records_the_integer_sensitivity_in_update_units() -> None:
    config = ClientDPConfig(clip_norm=0.05, noise_multiplier=0.5, placement="distributed", min_survivors=3,
                            population=3, denominator="participants")
    dp = ClientLevelDP(config, accountant=config.make_accountant(target_delta=1e-3))
    dp.begin_round(0, dimension=1000)
    event, _ = dp.prepay()
    assert dp.accountant is not None and isinstance(event, DistributedDiscreteGaussianEvent)
    scale = dp.fixed_point_spec().scale
    assert dp.accountant.ledger[0].sensitivity == pytest.approx(event.l2_sensitivity / scale)
    assert 0.05 < dp.accountant.ledger[0].sensitivity < 0.05 * 1.01


# -- sampling ----------------------------------------------------------------------------------------
def test_fixed_size_sampling_is_not_amplified_and_divides_by_k() -> None:
    config = ClientDPConfig(clip_norm=1.0, noise_multiplier=1.0, sampling_rate=0.3, population=10,
                            sampling="fixed_size", allow_non_private=False)
    dp = ClientLevelDP(config, accountant=config.make_accountant(target_delta=1e-3), rng=SecureRNG.for_testing("f"))
    assert dp.round_event() == GaussianEvent(1.0)
    assert "fixed-size sample (not amplified)" in dp.release_label(0)
    poisson = ClientDPConfig(clip_norm=1.0, noise_multiplier=1.0, sampling_rate=0.3, population=10)
    assert ClientLevelDP(poisson).round_event() == PoissonSampledEvent(0.3, GaussianEvent(1.0))
    quiet = ClientDPConfig(clip_norm=1.0, noise_multiplier=0.0, sampling_rate=0.3, population=10,
                           sampling="fixed_size", allow_non_private=True)
    dp = ClientLevelDP(quiet)
    dp.begin_round(0)
    out = dp.finalize(np.full(4, 0.5, dtype=np.float32), total_weight=3)  # mean of 3 clients
    np.testing.assert_allclose(out.update, np.full(4, 0.5))  # sum 1.5 / k = 3 (0.3·10 rounded, not 2.9999...)
    with pytest.raises(ConfigError, match="sampling must be 'poisson' or 'fixed_size'"):
        ClientDPConfig(clip_norm=1.0, noise_multiplier=1.0, population=10, sampling="bernoulli")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="sampling='fixed_size' needs population"):
        ClientDPConfig(clip_norm=1.0, noise_multiplier=1.0, sampling="fixed_size", denominator="participants")


def test_empty_sample_releases_noise_over_the_expected_count_and_only_with_that_denominator() -> None:
    config = ClientDPConfig(clip_norm=0.5, noise_multiplier=2.0, sampling_rate=0.25, population=8)
    dp = ClientLevelDP(config, accountant=config.make_accountant(target_delta=1e-3), rng=SecureRNG.for_testing("e"))
    dp.begin_round(0)
    out = dp.finalize(np.zeros(200_000, dtype=np.float32), total_weight=0)
    assert out.participants == 0 and dp.accountant is not None and dp.accountant.steps == 1
    assert float(np.std(out.update)) == pytest.approx(2.0 * 0.5 / (0.25 * 8), rel=0.01)
    participants = ClientDPConfig(clip_norm=0.5, noise_multiplier=2.0, population=8, denominator="participants")
    dp = ClientLevelDP(participants)
    dp.begin_round(0)
    with pytest.raises(ConfigError, match="total_weight"):
        dp.finalize(np.zeros(4, dtype=np.float32), total_weight=0)


def test_sample_fixed_size_is_a_uniform_subset() -> None:
    rng = SecureRNG.for_testing("subset")
    seen: dict[tuple[int, ...], int] = {}
    for _ in range(3000):
        s = sample_fixed_size(range(5), 2, rng)
        assert len(s) == 2 and s == sorted(set(s))
        seen[tuple(s)] = seen.get(tuple(s), 0) + 1
    assert len(seen) == 10 and min(seen.values()) > 200  # 300 expected each
    assert sample_fixed_size([4, 7], 2, rng) == [4, 7]
    with pytest.raises(ConfigError, match="size must be an int in"):
        sample_fixed_size(range(3), 4, rng)


# -- tight KLS through the public API ------------------------------------------------------------------
def test_rdp_epsilon_with_the_per_order_kls_bound_equals_dp_accountings_public_conversion() -> None:
    """The accountant never writes into ``RdpAccountant._rdp``; its epsilon equals dp_accounting's public
    ``compute_epsilon`` applied to the per-order minimum of the three KLS forms (composed by hand)."""
    rng = np.random.default_rng(13)
    for _ in range(12):
        events = [DistributedDiscreteGaussianEvent(float(rng.uniform(0.6, 4.0)), int(rng.integers(2, 12)),
                                                    float(rng.uniform(1, 60)), float(rng.uniform(10, 900)),
                                                    int(rng.integers(10, 200_000))) for _ in range(2)]
        counts = [int(rng.integers(1, 30)), int(rng.integers(1, 30))]
        acc = PrivacyAccountant(target_delta=1e-5, backend="rdp")
        for e, c in zip(events, counts, strict=True):
            acc.record(e, c)
        orders = [float(a) for a in DEFAULT_RDP_ORDERS]
        curve = sum(c * np.asarray(e.rdp(orders)) for e, c in zip(events, counts, strict=True))
        reference, _ = compute_epsilon(orders, list(curve), 1e-5)
        assert acc.epsilon() == pytest.approx(float(reference), rel=1e-12, abs=1e-12)
