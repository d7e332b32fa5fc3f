"""The `dp:` section of a run config: clipping, central noise, epsilon per round, budget stop, resume."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fedguard.errors import ConfigError
from fedguard.rng import SecureRNG
from fedguard.updates import ClientUpdate
from fedguard_train.checkpoint import load_latest
from fedguard_train.hooks import TrainerHook
from fedguard_train.privacy import ClientDPHook, hooks_from_config
from fedguard_train.trainers.homo import FedHomoLLM
from tests.train.conftest import tiny_config

pytestmark = pytest.mark.deepspeed

DP = {"clip_norm": 0.5, "noise_multiplier": 1.0, "target_delta": 1e-3}


def test_dp_run_reports_growing_epsilon_that_matches_dp_accounting(tmp_path: Path, task: Path) -> None:
    import dp_accounting

    config = tiny_config(tmp_path, task, dp=DP)
    result = FedHomoLLM(config, hooks=hooks_from_config(config), quiet=True).run()
    eps = [row["epsilon"] for row in result.history]
    assert 0 < eps[0] < eps[1]
    # two rounds of a Gaussian mechanism with noise multiplier 1.0, no subsampling
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(1.0), 2)
    assert eps[1] == pytest.approx(acc.get_epsilon(1e-3), rel=0.01)
    ckpt = load_latest(Path(config.run_dir))
    assert ckpt is not None and ckpt.state["hooks"]["dp"]["next_round"] == 3


def test_budget_stops_before_the_round_that_would_exceed_it(tmp_path: Path, task: Path) -> None:
    import dp_accounting

    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(1.0), 1)
    one_round = acc.get_epsilon(1e-3)
    config = tiny_config(tmp_path, task, dp={**DP, "epsilon_budget": one_round * 1.2},
                         federation={"clients": 2, "rounds": 3})
    result = FedHomoLLM(config, hooks=hooks_from_config(config), quiet=True).run()
    assert [r["round"] for r in result.history] == [1]
    assert result.stopped is not None and "stopped before round 2" in result.stopped
    # resuming restores the ledger: the budget is still exhausted
    again = FedHomoLLM(config, hooks=hooks_from_config(config), quiet=True).run(resume=True)
    assert [r["round"] for r in again.history] == [1] and again.stopped is not None


def test_dp_section_errors_are_typed(tmp_path: Path, task: Path) -> None:
    with pytest.raises(ConfigError, match="dp.target_delta is required"):
        ClientDPHook({"clip_norm": 1.0, "noise_multiplier": 1.0}, n_clients=2)
    with pytest.raises(ConfigError, match="clip_norm must be a finite float > 0, got -1"):
        ClientDPHook({**DP, "clip_norm": -1}, n_clients=2)
    with pytest.raises(ConfigError, match="unknown key 'dp.clip'; did you mean 'clip_norm'"):
        ClientDPHook({**DP, "clip": 1}, n_clients=2)


DISTRIBUTED = {**DP, "placement": "distributed", "clip_norm": 0.05, "noise_multiplier": 0.5}


class _Spy(TrainerHook):
    """Placed after the DP hook: sees the clipped updates and the released mean."""

    name = "spy"

    def __init__(self) -> None:
        self.clipped: list[np.ndarray] = []
        self.released: list[np.ndarray] = []

    def client_update(self, update: ClientUpdate) -> ClientUpdate:
        self.clipped.append(update.vector.astype(np.float64))
        return update

    def aggregate(self, round_id: int, mean: np.ndarray, contributors: Sequence[int]) -> np.ndarray:
        self.released.append(mean.astype(np.float64))
        return mean


def test_distributed_dp_noises_inside_secure_aggregation_and_accounts_the_discrete_gaussian(
    tmp_path: Path, task: Path
) -> None:
    from fedguard.dp import PrivacyAccountant

    config = tiny_config(tmp_path, task, dp=DISTRIBUTED,
                         federation={"clients": 3, "rounds": 2, "aggregator": "masking",
                                     "aggregator_options": {"threshold": 3}})
    draws = iter(range(1000))  # a seeded noise stream per client and round: the statistical test is repeatable
    dp_hook = ClientDPHook(config.dp, n_clients=3, aggregator="masking",
                           noise_rng=lambda client: SecureRNG.for_testing(f"noise/{client}/{next(draws)}"))
    spy = _Spy()
    from_config = hooks_from_config(config)[0]  # what `fedguard train` builds from the same section
    assert isinstance(from_config, ClientDPHook) and from_config.distributed and dp_hook.distributed
    result = FedHomoLLM(config, hooks=[dp_hook, spy], quiet=True).run()

    # the released mean is the mean of the clipped updates plus the clients' summed discrete Gaussians
    spec = dp_hook.dp.fixed_point_spec()
    mechanism = dp_hook.dp.distributed_mechanism(spy.clipped[0].size)
    expected_sd = mechanism.local_stddev * math.sqrt(3) / spec.scale / 3  # float units, mean over 3
    for r in range(2):
        noise = spy.released[r] - np.mean(spy.clipped[3 * r: 3 * r + 3], axis=0)
        assert noise.size > 1000
        assert abs(noise.mean()) < 5 * expected_sd / math.sqrt(noise.size)
        assert float(noise.std()) == pytest.approx(expected_sd, rel=0.1)  # quantisation adds ~1e-3 of it
        assert stats.kstest(noise / expected_sd, "norm").pvalue > 1e-3

    # epsilon: two discrete-Gaussian releases with all 3 clients' noise, on the RDP backend
    reference = PrivacyAccountant(target_delta=1e-3, backend="rdp", population=3)
    eps = [row["epsilon"] for row in result.history]
    for r in range(2):
        reference.spend(mechanism.event(3))
        assert eps[r] == pytest.approx(reference.epsilon(), rel=1e-9)
    assert eps[0] < eps[1] < math.inf


def test_distributed_noise_comes_from_os_entropy_not_the_run_seed(tmp_path: Path, task: Path) -> None:
    hook = ClientDPHook(DISTRIBUTED, n_clients=3, aggregator="masking")
    hook.on_layout(64)
    hook.on_round_start(1, [0, 1, 2])
    encoding = hook.ring_encoding()
    assert encoding is not None and encoding.spec == hook.dp.fixed_point_spec()
    clipped = hook.client_update(ClientUpdate(0, 1, np.full(64, 0.001, dtype=np.float32), 5))
    first = encoding.encode(clipped, SecureRNG.for_testing("quantise"))
    second = encoding.encode(clipped, SecureRNG.for_testing("quantise"))  # same quantisation stream
    assert first.dtype == np.uint64 and first.shape == (65,) and int(first[-1]) == 1
    assert not np.array_equal(first, second)


def test_distributed_dp_section_errors_are_typed() -> None:
    with pytest.raises(ConfigError, match="needs a secure aggregator"):
        ClientDPHook(DISTRIBUTED, n_clients=3, aggregator="plaintext")
    with pytest.raises(ConfigError, match="min_survivors must be <= federation.clients=3, got 4"):
        ClientDPHook({**DISTRIBUTED, "min_survivors": 4}, n_clients=3, aggregator="masking")
    with pytest.raises(ConfigError, match="cannot be combined with the MPC norm check"):
        ClientDPHook(DISTRIBUTED, n_clients=3, aggregator="mpc", aggregator_options={"norm_bound": 1.0})
    with pytest.raises(ConfigError, match="dp.backend must be 'rdp' for distributed placement"):
        ClientDPHook({**DISTRIBUTED, "backend": "pld"}, n_clients=3, aggregator="masking")
    hook = ClientDPHook(DISTRIBUTED, n_clients=3, aggregator="masking")
    with pytest.raises(ConfigError, match="on_layout"):
        hook.on_round_start(1, [0, 1, 2])
