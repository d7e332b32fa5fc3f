"""Client-level DP-FedAvg end to end with the foundation's aggregate_updates and PlaintextAggregator."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedguard.dp.accountant import PrivacyAccountant
from fedguard.dp.client_level import (
    AdaptiveClipping,
    ClientDPConfig,
    ClientLevelDP,
    clip_to_norm,
    sample_clients,
)
from fedguard.dp.errors import InsufficientNoiseError
from fedguard.encoding import FixedPointSpec, decode_weighted_mean
from fedguard.errors import BudgetExceededError, ConfigError
from fedguard.federation import InProcessTransport, PlaintextAggregator, RoundSpec, aggregate_updates
from fedguard.rng import SecureRNG
from fedguard.updates import ClientUpdate

ALPHA = 1e-3


def _updates(n: int, d: int, round_id: int = 0, scale: float = 1.0, label: str = "u") -> list[ClientUpdate]:
    g = SecureRNG.for_testing(f"{label}/{round_id}").numpy_generator()
    return [
        ClientUpdate(i, round_id, (g.standard_normal(d) * scale).astype(np.float32), int(g.integers(1, 50)))
        for i in range(n)
    ]


def test_zero_noise_and_unbounded_clipping_reproduce_fedavg_exactly():
    updates = _updates(6, 257)
    spec = FixedPointSpec(clip=8.0, value_bits=24, ring_bits=64, max_weight=1)
    config = ClientDPConfig(clip_norm=math.inf, noise_multiplier=0.0, denominator="participants",
                            allow_non_private=True)
    dp = ClientLevelDP(config, rng=SecureRNG.for_testing("noise"))
    dp.begin_round(0)
    clipped = [dp.clip(u) for u in updates]
    out = aggregate_updates(clipped, PlaintextAggregator(), spec, round_id=0, rng=SecureRNG.for_testing("agg"))
    result = dp.finalize(out)
    # FedAvg of the same updates (DP-FedAvg weighs clients uniformly) through the same aggregator
    plain = [ClientUpdate(u.client_id, 0, u.vector, 1) for u in updates]
    reference = aggregate_updates(plain, PlaintextAggregator(), spec, round_id=0, rng=SecureRNG.for_testing("agg"))
    assert np.array_equal(result.update, reference.mean)
    assert result.participants == 6


def test_central_noise_on_a_fixed_input_is_gaussian_with_the_claimed_scale():
    d, m = 20_000, 10
    config = ClientDPConfig(clip_norm=0.5, noise_multiplier=1.3, sampling_rate=0.1, population=100)
    dp = ClientLevelDP(config, rng=SecureRNG.for_testing("central-noise"))
    x = np.linspace(-0.01, 0.01, d).astype(np.float32)
    dp.begin_round(0)
    result = dp.finalize(x, m)
    denom = 0.1 * 100
    noise = (result.update.astype(np.float64) * denom - x.astype(np.float64) * m) / (1.3 * 0.5)
    assert stats.kstest(noise, "norm").pvalue > ALPHA
    assert stats.kstest(noise / 1.1, "norm").pvalue < ALPHA  # the test has power against a 10% wrong scale


def test_clipping_bounds_the_norm_and_leaves_small_updates_alone():
    big = np.full(1000, 0.3, dtype=np.float32)
    small = np.full(1000, 0.001, dtype=np.float32)
    clipped, norm = clip_to_norm(big, 1.0)
    assert norm > 1.0 and np.linalg.norm(clipped.astype(np.float64)) <= 1.0
    assert np.array_equal(clip_to_norm(small, 1.0)[0], small)


def test_distributed_round_end_to_end_noise_matches_the_plan():
    n, d = 8, 4000
    config = ClientDPConfig(clip_norm=1.0, noise_multiplier=1.0, placement="distributed", min_survivors=6,
                            population=1000, value_bits=20, ring_bits=64)
    acc = config.make_accountant(target_delta=1e-5, epsilon_budget=100.0)
    dp = ClientLevelDP(config, accountant=acc)
    updates = _updates(n, d, scale=0.01)
    dp.begin_round(0, dimension=d)
    rng = SecureRNG.for_testing("ddg-round")
    spec = dp.fixed_point_spec()
    inputs = {u.client_id: dp.noise_for_client(dp.clip(u), rng=rng.spawn(f"noise/{u.client_id}")) for u in updates}
    round_spec = RoundSpec(0, tuple(inputs), d + 1, spec.ring_bits)
    agg = PlaintextAggregator(min_clients=6)  # threshold = min_survivors: fewer survivors abort
    clients = {c: agg.client(round_spec, c, x) for c, x in inputs.items()}
    outcome = InProcessTransport().run(agg.server(round_spec), clients, drop_at={7: "input"})
    mean, total = decode_weighted_mean(outcome.result.ring_sum, spec)
    result = dp.finalize(mean, total)
    assert result.participants == 7
    truth = np.sum([dp.clip(u).vector.astype(np.float64) for u in updates if u.client_id != 7], axis=0)
    mech = dp.distributed_mechanism(d)
    noise = result.update.astype(np.float64) * config.sampling_rate * 1000 - truth
    expected_sd = mech.local_stddev * math.sqrt(7) / spec.scale  # 7 survivors' noise, in float units
    assert stats.kstest(noise / expected_sd, "norm").pvalue > ALPHA
    assert expected_sd >= 1.0 * 1.0 * math.sqrt(7 / 6)  # at least z*C: planned for 6, 7 survived
    assert acc.ledger[-1].event == mech.event(7)


def test_too_few_survivors_are_recorded_and_refused():
    config = ClientDPConfig(clip_norm=1.0, noise_multiplier=1.0, placement="distributed", min_survivors=6,
                            denominator="participants")
    acc = config.make_accountant(target_delta=1e-5)
    dp = ClientLevelDP(config, accountant=acc)
    dp.begin_round(0, dimension=10)
    with pytest.raises(InsufficientNoiseError, match="min_survivors=6"):
        dp.finalize(np.zeros(10, dtype=np.float32), 4)
    assert acc.ledger[-1].event.n_clients == 4  # the ledger tells the truth


def test_budget_stops_the_run_before_the_round_that_would_exceed_it():
    config = ClientDPConfig(clip_norm=1.0, noise_multiplier=1.0, sampling_rate=0.5, population=100)
    acc = PrivacyAccountant(target_delta=1e-3, epsilon_budget=3.0, backend="rdp", population=100)
    dp = ClientLevelDP(config, accountant=acc, rng=SecureRNG.for_testing("budget"))
    rounds = 0
    with pytest.raises(BudgetExceededError, match="stop before this round"):
        for r in range(100):
            dp.begin_round(r)
            dp.finalize(np.zeros(5, dtype=np.float32), 3)
            rounds += 1
    assert 0 < rounds < 100
    assert acc.epsilon() <= 3.0 and acc.steps == rounds
    assert dp.next_round == rounds  # the refused round was never opened


def test_adaptive_clipping_tracks_the_target_quantile():
    # every update has norm 1: the median tracker must move C towards 1 from both sides
    d = 64
    for start, direction in ((0.1, 1), (10.0, -1)):
        config = ClientDPConfig(clip_norm=start, noise_multiplier=1.0, denominator="participants",
                                adaptive=AdaptiveClipping(target_quantile=0.5, learning_rate=0.5,
                                                          count_noise_stddev=1.0))
        dp = ClientLevelDP(config, rng=SecureRNG.for_testing(f"adaptive/{start}"))
        for r in range(12):
            dp.begin_round(r)
            vecs = [dp.clip(ClientUpdate(i, r, np.full(d, 1 / 8, dtype=np.float32), 3)) for i in range(50)]
            mean = np.mean([v.vector.astype(np.float64) for v in vecs], axis=0)
            dp.finalize(mean, 50)
        assert (dp.clip_norm - start) * direction > 0
        assert 0.5 < dp.clip_norm < 2.0


def test_adaptive_effective_noise_multiplier_matches_andrew_et_al():
    config = ClientDPConfig(clip_norm=1.0, noise_multiplier=1.0, denominator="participants",
                            adaptive=AdaptiveClipping(count_noise_stddev=2.0))
    dp = ClientLevelDP(config)
    z_delta = dp.update_noise_multiplier
    assert (z_delta**-2 + (2 * 2.0) ** -2) ** -0.5 == pytest.approx(1.0)
    # per-coordinate noise z*sensitivity equals z_delta*C on the update coordinates
    assert 1.0 * dp.sensitivity == pytest.approx(z_delta * 1.0)


def test_resumed_round_loop_has_the_same_ledger_and_epsilon():
    config = ClientDPConfig(clip_norm=1.0, noise_multiplier=1.1, sampling_rate=0.2, population=50,
                            adaptive=AdaptiveClipping(count_noise_stddev=3.0))

    def run(dp: ClientLevelDP, rounds: range) -> None:
        for r in rounds:
            dp.begin_round(r)
            dp.finalize(np.full(9, 0.1, dtype=np.float32), 10)

    straight = ClientLevelDP(config, accountant=PrivacyAccountant(target_delta=1e-4, backend="rdp"),
                             rng=SecureRNG.for_testing("r"))
    run(straight, range(4))
    first = ClientLevelDP(config, accountant=PrivacyAccountant(target_delta=1e-4, backend="rdp"),
                          rng=SecureRNG.for_testing("r"))
    run(first, range(2))
    resumed = ClientLevelDP.from_state_dict(first.state_dict(), rng=SecureRNG.for_testing("r2"))
    run(resumed, range(2, 4))
    # the events are the same; the sensitivities of rounds 2-3 follow each run's adaptive clip norm, which
    # the (differently seeded) count noise moved: each entry states the one its release used
    assert [(e.event, e.count, e.label) for e in resumed.accountant.ledger] == \
        [(e.event, e.count, e.label) for e in straight.accountant.ledger]
    assert resumed.accountant.ledger[:2] == straight.accountant.ledger[:2]
    assert resumed.accountant.epsilon() == straight.accountant.epsilon()
    with pytest.raises(ConfigError, match="already finalized"):
        resumed.begin_round(1)


def test_finalize_twice_or_without_begin_round_is_refused():
    dp = ClientLevelDP(ClientDPConfig(clip_norm=1.0, noise_multiplier=1.0, denominator="participants"))
    with pytest.raises(ConfigError, match="without begin_round"):
        dp.finalize(np.zeros(3, dtype=np.float32), 2)
    dp.begin_round(0)
    dp.finalize(np.zeros(3, dtype=np.float32), 2)
    with pytest.raises(ConfigError, match="without begin_round"):
        dp.finalize(np.zeros(3, dtype=np.float32), 2)


def test_poisson_client_sampling_has_the_configured_rate():
    chosen = sample_clients(range(20_000), 0.1, SecureRNG.for_testing("sample"))
    assert stats.binomtest(len(chosen), 20_000, 0.1).pvalue > ALPHA


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"clip_norm": 0.0}, "clip_norm must be a finite float > 0, got 0.0"),
        ({"clip_norm": -1.0}, "got -1.0"),
        ({"noise_multiplier": 0.0}, "noise_multiplier must be a finite number > 0, got 0.0"),
        ({"noise_multiplier": -2.0}, "got -2.0"),
        ({"sampling_rate": 0.0}, "sampling_rate must be a finite number in (0, 1], got 0.0"),
        ({"sampling_rate": 1.5}, "got 1.5"),
        ({"placement": "distributed"}, "min_survivors must be an int >= 1"),
        ({"adaptive": AdaptiveClipping(count_noise_stddev=0.4)}, "count_noise_stddev must be > noise_multiplier/2"),
        ({"denominator": "expected", "population": None}, "needs population"),
    ],
)
def test_bad_client_dp_config_is_a_typed_error_naming_the_value(kw, needle):
    args = dict(clip_norm=1.0, noise_multiplier=1.0, denominator="participants")
    args.update(kw)
    with pytest.raises(ConfigError) as err:
        ClientDPConfig(**args)
    assert needle in str(err.value)


def test_delta_not_below_one_over_the_population_is_refused():
    config = ClientDPConfig(clip_norm=1.0, noise_multiplier=1.0, population=100)
    with pytest.raises(ConfigError, match="got 0.02"):
        config.make_accountant(target_delta=0.02)
    with pytest.raises(ConfigError, match="got 0.05"):
        ClientLevelDP(config, accountant=PrivacyAccountant(target_delta=0.05))


def test_config_round_trips_and_rejects_unknown_keys():
    config = ClientDPConfig(clip_norm=1.0, noise_multiplier=1.0, population=10,
                            adaptive=AdaptiveClipping(count_noise_stddev=2.0))
    assert ClientDPConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="clip"):
        ClientDPConfig.from_dict({"clip": 1.0, "noise_multiplier": 1.0})


def test_numpy_scalars_in_the_config_are_stored_as_python_numbers():
    import json

    config = ClientDPConfig(clip_norm=np.float32(1.0), noise_multiplier=np.float64(1.0), population=np.int64(10),
                            placement="distributed", min_survivors=np.int64(3), colluding=np.int64(1),
                            adaptive=AdaptiveClipping(count_noise_stddev=np.float32(2.0)))
    assert config == ClientDPConfig(clip_norm=1.0, noise_multiplier=1.0, population=10, placement="distributed",
                                    min_survivors=3, colluding=1, adaptive=AdaptiveClipping(count_noise_stddev=2.0))
    assert type(config.population) is int and type(config.clip_norm) is float
    assert ClientDPConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match="colluding must be an int >= 0, got True"):
        ClientDPConfig(clip_norm=1.0, noise_multiplier=1.0, population=10, colluding=True)


def test_distributed_placement_with_a_pld_accountant_is_refused_up_front():
    from fedguard.dp.errors import UnsupportedEventError

    config = ClientDPConfig(clip_norm=1.0, noise_multiplier=1.0, placement="distributed", min_survivors=3,
                            denominator="participants")
    with pytest.raises(UnsupportedEventError, match="backend='rdp'"):
        ClientLevelDP(config, accountant=PrivacyAccountant(target_delta=1e-5, backend="pld"))
