"""The `dp:` section of a run config: clipping, central noise, epsilon per round, budget stop, resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedguard.errors import ConfigError
from fedguard_train.checkpoint import load_latest
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
    with pytest.raises(ConfigError, match="placement must be 'central' in the trainer"):
        ClientDPHook({**DP, "placement": "distributed", "min_survivors": 2}, n_clients=2)
    with pytest.raises(ConfigError, match="clip_norm must be a finite float > 0, got -1"):
        ClientDPHook({**DP, "clip_norm": -1}, n_clients=2)
    with pytest.raises(ConfigError, match="unknown dp config key"):
        ClientDPHook({**DP, "clip": 1}, n_clients=2)
