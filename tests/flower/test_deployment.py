"""fedguard on Flower's Deployment Engine: a SuperLink and one SuperNode + worker per client, as separate
processes on 127.0.0.1, started and always stopped by :class:`~fedguard_train.flower.launcher.Deployment`.

What is proved against real Flower processes (each run bounded by timeouts):

* the same job, the same answer: masking over TLS (certificates generated at set-up) gives adapters
  bit-identical to the in-process trainer with the same seed; plaintext likewise (in the named
  ``insecure_test_mode``);
* a SuperNode killed mid-round is a dropout of that stage and a client that answers with garbage is a
  dropout, not a crash: the round completes over the others, equal to the in-process round with the same
  clients dropped at the same stages; with too few survivors the round aborts before anything is
  decoded and no checkpoint is written;
* no process outlives the deployment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedguard_train.flower import flower_available

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.deepspeed,
    pytest.mark.skipif(not flower_available(), reason="flwr is not installed (pip install 'fedguard[flower]')"),
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.timeout(900),
]


def _config(tmp_path: Path, task: Path, name: str, aggregator: str, clients: int = 2, rounds: int = 2,
            **options: Any) -> Any:
    from tests.train.conftest import tiny_config

    return tiny_config(tmp_path / name, task, data__partition="iid" if clients > 3 else "attribute",
                       federation={"clients": clients, "rounds": rounds, "aggregator": aggregator,
                                   "aggregator_options": options})


def _options(**changes: Any) -> Any:
    from fedguard_train.flower.launcher import FlowerOptions

    values: dict[str, Any] = {"first_timeout": 300.0, "stage_timeout": 90.0, "join_timeout": 300.0,
                              "run_timeout": 800.0, "torch_threads": 1}
    values.update(changes)
    return FlowerOptions(**values)


def _alive(groups: list[int]) -> list[int]:
    """Running processes (zombies aside) in the process groups the deployment started: Flower's own
    children (flower-superexec, flwr-serverapp, flwr-clientapp) included."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) in groups:
            alive.append(int(stat.parent.name))
    return alive


def _deploy(config: Any, options: Any) -> tuple[dict[str, Any], list[int]]:
    from fedguard_train.flower.launcher import Deployment

    with Deployment(config, options) as deployment:
        deployment.start()
        pids = [p.pid for p in deployment.procs.values()]
        summary = deployment.run(overwrite=True)
    return summary, pids


def _final_vector(run_dir: str) -> np.ndarray:
    from fedguard_train.checkpoint import load_latest

    checkpoint = load_latest(Path(run_dir))
    assert checkpoint is not None
    return np.asarray(checkpoint.vector)


@pytest.mark.parametrize("aggregator,insecure", [("masking", False),
                                                 pytest.param("plaintext", True, marks=pytest.mark.slow)])
def test_flower_run_gives_bit_identical_adapters(tmp_path: Path, task: Path, aggregator: str, insecure: bool) -> None:
    from fedguard_train.runner import build_trainer

    reference = build_trainer(_config(tmp_path, task, "in", aggregator), quiet=True)
    reference.run()
    expected = reference.global_vector()

    config = _config(tmp_path, task, "flower", aggregator)
    summary, pids = _deploy(config, _options(insecure_test_mode=insecure))
    assert summary["status"] == "completed", summary
    assert summary["drops"] == []
    assert _final_vector(config.run_dir).tobytes() == expected.tobytes()
    stages = 4 if aggregator == "masking" else 1
    assert summary["round_trips"] == {"1": stages, "2": stages}  # one Flower round trip per protocol stage
    assert all(v["up"] > 0 and v["down"] > 0 for v in summary["flower_bytes"].values())
    certs = Path(config.run_dir) / "flower" / "certs"
    assert certs.is_dir() != insecure
    if not insecure:
        assert (certs / "server.key").stat().st_mode & 0o077 == 0 and (certs / "ca.key").stat().st_mode & 0o077 == 0
    assert _alive(pids) == []


def test_killed_supernode_and_garbage_are_dropouts_and_the_survivors_sum_is_exact(tmp_path: Path, task: Path) -> None:
    """5 clients, masking threshold 3: client 1's SuperNode is killed on receiving the share stage, client 2
    answers the mask stage with random bytes; the round completes over {0, 3, 4}, bit-identical to the
    in-process round with the same drops."""
    from fedguard.federation.round import run_round
    from fedguard.rng import SecureRNG
    from fedguard_train.runner import build_trainer

    config = _config(tmp_path, task, "flower", "masking", clients=5, rounds=1, threshold=3)
    summary, pids = _deploy(config, _options(stage_timeout=45.0,
                                             faults={1: "kill:1:share", 2: "garbage:1:mask"}))
    assert summary["status"] == "completed", summary
    drops = {(c, s): r for c, s, r in summary["drops"]}
    assert set(drops) == {(1, "share"), (2, "mask")}
    assert "no answer" in drops[(1, "share")] and "refused" in drops[(2, "mask")]
    assert summary["history"][0]["clients"] == 3

    ref = build_trainer(_config(tmp_path, task, "in", "masking", clients=5, rounds=1, threshold=3), quiet=True)
    expected = run_round(1, ref.global_vector(), range(5), lambda c, v: ref.client_step(1, c, v), ref.aggregator,
                         ref.spec, hooks=ref.hooks, rng=SecureRNG.for_testing(f"{config.seed}/aggregate/1"),
                         drop_at={1: "share", 2: "mask"})
    assert expected.contributors == (0, 3, 4)
    assert _final_vector(config.run_dir).tobytes() == expected.global_vector.tobytes()
    assert _alive(pids) == []


@pytest.mark.slow
def test_too_few_survivors_abort_revealing_nothing(tmp_path: Path, task: Path) -> None:
    config = _config(tmp_path, task, "flower", "masking", clients=3, rounds=1, threshold=3)
    summary, pids = _deploy(config, _options(stage_timeout=45.0, faults={0: "kill:1:share"}))
    # the stage machine's threshold abort at 'share' (before any input was sent, let alone unmasked)
    assert summary["status"] == "aborted" and "stage 'share'" in summary["error"], summary
    assert "before the server decoded anything" in summary["error"]
    assert not (Path(config.run_dir) / "checkpoints" / "latest.json").exists()
    assert _alive(pids) == []


@pytest.mark.slow
def test_a_new_deployment_resumes_the_run_from_its_checkpoint(tmp_path: Path, task: Path) -> None:
    """The whole deployment (SuperLink included) stops after round 1; a new one with ``resume`` continues
    from the fedguard checkpoint, and the two rounds end bit-identical to an uninterrupted in-process run."""
    from fedguard_train.config import TrainConfig
    from fedguard_train.flower.launcher import Deployment
    from fedguard_train.runner import build_trainer

    reference = build_trainer(_config(tmp_path, task, "in", "masking"), quiet=True)
    reference.run()
    config = _config(tmp_path, task, "flower", "masking")
    first = TrainConfig.from_dict({**config.to_dict(), "federation": {**config.to_dict()["federation"], "rounds": 1}})
    summary, _ = _deploy(first, _options())
    assert summary["status"] == "completed" and len(summary["history"]) == 1
    with Deployment(config, _options()) as deployment:
        deployment.start()
        resumed = deployment.run(resume=True)
    assert resumed["status"] == "completed" and [row["round"] for row in resumed["history"]] == [1, 2]
    assert _final_vector(config.run_dir).tobytes() == reference.global_vector().tobytes()
