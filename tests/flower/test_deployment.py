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
* MPC (slow): the launcher starts real CrypTen parties with long-term keys, every worker seals to the keys
  pinned in the party-keys file, and the adapters are bit-identical to in-process MPC;
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
def test_flower_run_gives_bit_identical_adapters(tmp_path: Path, task: Path, aggregator: str, insecure: bool,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Also: the config's paths (run_dir, the data file) are *relative* to where the run is launched, as in
    `make demo-flower`: the workers run there and the ServerApp changes to it, so they mean what they mean
    to `fedguard train` (the launcher's own files live under an absolute <run_dir>/flower)."""
    from fedguard_train.config import TrainConfig
    from fedguard_train.runner import build_trainer

    reference = build_trainer(_config(tmp_path, task, "in", aggregator), quiet=True)
    reference.run()
    expected = reference.global_vector()

    monkeypatch.chdir(tmp_path)
    raw = _config(tmp_path, task, "flower", aggregator).to_dict()
    raw["run_dir"] = str(Path(raw["run_dir"]).relative_to(tmp_path))
    raw["data"]["path"] = str(task.relative_to(tmp_path))
    config = TrainConfig.from_dict(raw)
    assert not Path(config.run_dir).is_absolute()
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


@pytest.mark.slow  # ~1.5 min: round 1 waits out the 45 s stage timeout of the killed client
def test_a_supernode_that_rejoins_takes_part_in_the_next_round(tmp_path: Path, task: Path) -> None:
    """Client 2's machine dies on receiving round 1's mask stage (SuperNode and worker killed); it is started
    again (a new SuperNode: a new Flower node id) while round 1 finishes over {0, 1}. Round 2's start asks
    the new node who it is, and client 2 takes part again: both rounds equal the in-process rounds with the
    same drop."""
    import threading
    import time

    from fedguard.federation.round import run_round
    from fedguard.rng import SecureRNG
    from fedguard_train.flower.launcher import Deployment
    from fedguard_train.runner import build_trainer

    config = _config(tmp_path, task, "flower", "masking", clients=3, rounds=2, threshold=2)
    outcome: dict[str, Any] = {}
    with Deployment(config, _options(stage_timeout=45.0, faults={2: "kill:1:mask"})) as deployment:
        deployment.start()
        first_node = deployment.procs["supernode-2"].pid
        pids = [p.pid for p in deployment.procs.values()]
        runner = threading.Thread(target=lambda: outcome.update(summary=deployment.run(overwrite=True)), daemon=True)
        runner.start()
        deadline = time.monotonic() + 600
        while deployment.procs["worker-2"].poll() is None and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert deployment.procs["worker-2"].poll() is not None, "the fault did not fire"
        deployment.start_client(2)  # the machine comes back
        assert deployment.procs["supernode-2"].pid != first_node
        pids += [deployment.procs["supernode-2"].pid, deployment.procs["worker-2"].pid]
        runner.join(timeout=700)
        assert not runner.is_alive()
    summary = outcome["summary"]
    assert summary["status"] == "completed", summary
    assert [(c, s) for c, s, _ in summary["drops"]] == [(2, "mask")]
    assert [row["clients"] for row in summary["history"]] == [2, 3]

    ref = build_trainer(_config(tmp_path, task, "in", "masking", clients=3, rounds=2, threshold=2), quiet=True)
    one = run_round(1, ref.global_vector(), range(3), lambda c, v: ref.client_step(1, c, v), ref.aggregator,
                    ref.spec, hooks=ref.hooks, rng=SecureRNG.for_testing(f"{config.seed}/aggregate/1"),
                    drop_at={2: "mask"})
    two = run_round(2, one.global_vector, range(3), lambda c, v: ref.client_step(2, c, v), ref.aggregator,
                    ref.spec, hooks=ref.hooks, rng=SecureRNG.for_testing(f"{config.seed}/aggregate/2"))
    assert _final_vector(config.run_dir).tobytes() == two.global_vector.tobytes()
    assert _alive(pids) == []


@pytest.mark.slow
def test_central_dp_over_flower_reports_the_in_process_epsilon(tmp_path: Path, task: Path) -> None:
    """dp: over real Flower processes: the workers clip, the ServerApp adds the noise and accounts; the
    round table's epsilon is the in-process run's, and the server's write-ahead ledger is on disk."""
    from fedguard_train.runner import build_trainer
    from tests.train.conftest import tiny_config

    def config(name: str) -> Any:
        return tiny_config(tmp_path / name, task, data__partition="attribute",
                           dp={"clip_norm": 0.05, "noise_multiplier": 1.0, "target_delta": 1e-3},
                           federation={"clients": 2, "rounds": 2, "aggregator": "masking"})

    local = build_trainer(config("in"), quiet=True).run()
    flower = config("flower")
    summary, pids = _deploy(flower, _options(insecure_test_mode=True))
    assert summary["status"] == "completed", summary
    assert [row["epsilon"] for row in summary["history"]] == [row["epsilon"] for row in local.history]
    assert (Path(flower.run_dir) / "privacy_ledger.json").exists()
    assert _alive(pids) == []


def _pids_with(*words: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(w in text for w in words):
            found.append(int(cmdline.parent.name))
    return found


@pytest.mark.slow
def test_a_superlink_that_dies_is_restarted_and_the_run_resumes(tmp_path: Path, task: Path) -> None:
    """`fedguard flower run`'s run_deployment: the SuperLink process is SIGKILLed once round 1's checkpoint
    is on disk; the launcher starts a new SuperLink (same port, same certificates) and new SuperNodes,
    submits the run again with resume, and the two rounds end bit-identical to an uninterrupted in-process run."""
    import os
    import signal
    import threading
    import time

    from fedguard_train.flower.launcher import run_deployment
    from fedguard_train.runner import build_trainer

    reference = build_trainer(_config(tmp_path, task, "in", "masking"), quiet=True)
    reference.run()
    config = _config(tmp_path, task, "flower", "masking")
    outcome: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: outcome.update(summary=run_deployment(config, _options(), overwrite=True)),
                              daemon=True)
    runner.start()
    latest = Path(config.run_dir) / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 600
    while not latest.exists() and runner.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert latest.exists(), "round 1 never finished"
    (superlink,) = _pids_with("flower-superlink", str(Path(config.run_dir) / "flower" / "certs"))
    os.kill(superlink, signal.SIGKILL)  # the server machine's Flower process crashes
    runner.join(timeout=800)
    assert not runner.is_alive()
    summary = outcome["summary"]
    assert summary["status"] == "completed" and summary["superlink_restarts"] == 1, summary
    assert [row["round"] for row in summary["history"]] == [1, 2]
    assert _final_vector(config.run_dir).tobytes() == reference.global_vector().tobytes()
    assert _pids_with("fedguard_train.flower", str(config.run_dir)) == []  # SuperNodes (our wrapper) and workers
    assert _pids_with("flower-superlink", str(config.run_dir)) == []


@pytest.mark.slow
def test_mpc_over_flower_gives_bit_identical_adapters(tmp_path: Path, task: Path) -> None:
    """``aggregator: mpc`` with real CrypTen parties over real Flower processes: the launcher starts the
    parties (long-term keys) and hands every worker the pin; the workers seal to the pinned keys, the
    ServerApp's aggregator coordinates the parties. Two rounds, bit-identical to in-process MPC with the same
    seed; the parties exit with the run (no process left)."""
    from fedguard_train.runner import build_trainer

    reference = build_trainer(_config(tmp_path, task, "in", "mpc", backend="simulated", n_parties=2), quiet=True)
    reference.run()
    config = _config(tmp_path, task, "flower", "mpc", n_parties=2, timeout_s=60.0)
    summary, pids = _deploy(config, _options())
    assert summary["status"] == "completed", summary
    assert summary["drops"] == []
    assert summary["round_trips"] == {"1": 1, "2": 1}  # MPC is one stage: one Flower round trip per round
    assert _final_vector(config.run_dir).tobytes() == reference.global_vector().tobytes()
    logs = Path(config.run_dir) / "flower" / "logs"
    assert (logs / "mpc-party-0.log").exists() and (logs / "mpc-party-1.log").exists()
    assert (Path(config.run_dir) / "flower" / "mpc" / "party_keys.json").exists()
    assert _alive(pids) == []
