"""Remote rounds without a network: the worker and the server-side round driver give the in-process answer.

The stage machine driven one round trip per stage (``remote_round``) with clients in
:class:`~fedguard_train.flower.worker.ClientWorker` s must give *bit-identical* adapters to the in-process
trainer with the same seed (plaintext and masking), drop a silent client or one that sends garbage, and
abort (revealing nothing) when too few survive. The Flower transport is tested in test_deployment.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedguard.errors import ConfigError, ProtocolAbort
from fedguard_train.flower.coordinator import remote_trainer
from fedguard_train.flower.rounds import StageFailure, StageReply
from fedguard_train.flower.worker import ClientWorker, DirectExchange
from fedguard_train.runner import build_trainer
from tests.train.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(tmp_path: Path, task: Path, name: str, aggregator: str, clients: int = 3, **options: Any):
    return tiny_config(tmp_path / name, task, data__partition="iid" if clients > 3 else "attribute",
                       federation={"clients": clients, "rounds": 2, "aggregator": aggregator,
                                   "aggregator_options": options})


def _final(trainer: Any) -> np.ndarray:
    trainer.run()
    return trainer.global_vector()


@pytest.mark.parametrize("aggregator", ["plaintext", "masking"])
def test_remote_rounds_give_bit_identical_adapters(tmp_path: Path, task: Path, aggregator: str) -> None:
    local = _final(build_trainer(_config(tmp_path, task, "in", aggregator), quiet=True))
    cfg = _config(tmp_path, task, "remote", aggregator)
    workers = {k: ClientWorker(cfg, k) for k in range(cfg.n_parties)}
    trainer = remote_trainer(cfg, DirectExchange(workers))
    remote = _final(trainer)
    assert remote.dtype == np.float32 and remote.tobytes() == local.tobytes()
    assert not trainer.drops.events
    assert not np.array_equal(remote, build_trainer(_config(tmp_path, task, "init", aggregator),
                                                    quiet=True).global_vector())  # it trained


def test_silent_and_garbage_clients_are_dropouts_and_the_rest_is_exact(tmp_path: Path, task: Path) -> None:
    """Client 1 never answers, client 3 answers round 1's mask stage with garbage: masking completes over
    the others, equal to the in-process round with the same clients dropped at the same stages."""
    from fedguard.federation.round import run_round
    from fedguard.rng import SecureRNG

    cfg = _config(tmp_path, task, "remote", "masking", clients=5, threshold=3)
    workers = {k: ClientWorker(cfg, k, fault="garbage:1:mask" if k == 3 else None) for k in range(5)}
    trainer = remote_trainer(cfg, DirectExchange(workers, silent=frozenset({1})))
    theta = trainer.global_vector()
    result = trainer._remote_result(1)
    assert result.contributors == (0, 2, 4)
    reasons = {(c, s): r for c, s, r in trainer.drops.events}
    assert "no answer" in reasons[(1, "advertise")] and "refused" in reasons[(3, "mask")]

    ref = build_trainer(_config(tmp_path, task, "in", "masking", clients=5, threshold=3), quiet=True)
    expected = run_round(1, theta, range(5), lambda c, v: ref.client_step(1, c, v), ref.aggregator, ref.spec,
                         hooks=ref.hooks, rng=SecureRNG.for_testing(f"{cfg.seed}/aggregate/1"),
                         drop_at={1: "advertise", 3: "mask"})
    assert result.global_vector.tobytes() == expected.global_vector.tobytes()


def test_too_few_survivors_abort_before_decoding_and_keep_theta(tmp_path: Path, task: Path) -> None:
    cfg = _config(tmp_path, task, "remote", "masking", clients=3, threshold=3)
    workers = {k: ClientWorker(cfg, k) for k in range(3)}
    trainer = remote_trainer(cfg, DirectExchange(workers, silent=frozenset({2})))
    theta = trainer.global_vector()
    with pytest.raises(ProtocolAbort) as err:
        trainer._remote_result(1)
    assert "before the server decoded anything" in str(err.value)
    assert trainer.global_vector().tobytes() == theta.tobytes()


def test_worker_refuses_bad_requests_and_dp_configs(tmp_path: Path, task: Path) -> None:
    cfg = _config(tmp_path, task, "remote", "plaintext", clients=2)
    worker = ClientWorker(cfg, 0)
    exchange = DirectExchange({0: worker})
    answer = exchange(1, "input", {0: b"not a wire message"}, None, 1.0)
    assert isinstance(answer[0], StageFailure) and "no round 1" in answer[0].reason
    assert worker.handle({"op": "hello"}, {})[0]["client"] == 0
    with pytest.raises(ConfigError, match="client must be"):
        ClientWorker(cfg, 7)
    with pytest.raises(ConfigError, match="--fault"):
        ClientWorker(cfg, 0, fault="explode")
    assert StageReply(b"x").loss is None
