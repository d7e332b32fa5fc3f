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

from fedguard.errors import ConfigError, MessageError, ProtocolAbort
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


# -- dp: over the network (fedguard_train.flower.dp_split) ----------------------------------------------------
DP_FREE = {"clip_norm": 1e-3, "noise_multiplier": 0.0, "target_delta": 1e-3, "allow_non_private": True}
DP_NOISY = {"clip_norm": 0.05, "noise_multiplier": 1.0, "target_delta": 1e-3}


def _dp_config(tmp_path: Path, task: Path, name: str, dp: dict[str, Any], aggregator: str = "plaintext",
               clients: int = 3, **options: Any) -> Any:
    return tiny_config(tmp_path / name, task, data__partition="attribute", dp=dp,
                       federation={"clients": clients, "rounds": 2, "aggregator": aggregator,
                                   "aggregator_options": options})


def _remote(cfg: Any) -> Any:
    workers = {k: ClientWorker(cfg, k) for k in range(cfg.n_parties)}
    return remote_trainer(cfg, DirectExchange(workers)), workers


@pytest.mark.parametrize("aggregator", ["plaintext", "masking"])
def test_noise_free_dp_clips_on_the_client_exactly_as_in_process(tmp_path: Path, task: Path, aggregator: str) -> None:
    """z = 0 (central placement; distributed needs z > 0 and draws its noise from the OS) makes the DP round
    deterministic: the clip (norm 1e-3, far below the tiny model's updates) now runs in each worker, the
    release on the server; the adapters must be bit-identical to the in-process trainer's, and clipped."""
    dp = DP_FREE
    options = {"threshold": 3} if aggregator == "masking" else {}
    local_trainer = build_trainer(_dp_config(tmp_path, task, "in", dp, aggregator, **options), quiet=True)
    start = local_trainer.global_vector().copy()
    local = _final(local_trainer)
    trainer, workers = _remote(_dp_config(tmp_path, task, "remote", dp, aggregator, **options))
    remote = _final(trainer)
    assert remote.tobytes() == local.tobytes()
    assert not trainer.drops.events
    step = float(np.linalg.norm((remote - start).astype(np.float64)))
    assert 0 < step <= 2 * 1e-3 * 1.01  # two rounds, each a mean of updates clipped to 1e-3
    for worker in workers.values():  # the client half has no accountant and writes no ledger
        (hook,) = worker.trainer.hooks.hooks
        assert hook.dp.accountant is None and hook.ledger is None


@pytest.mark.parametrize("placement", ["central", "distributed"])
def test_dp_over_the_network_reports_the_in_process_epsilon(tmp_path: Path, task: Path, placement: str) -> None:
    dp = {**DP_NOISY, "placement": placement}
    aggregator, options = ("masking", {"threshold": 3}) if placement == "distributed" else ("plaintext", {})
    local = build_trainer(_dp_config(tmp_path, task, "in", dp, aggregator, **options), quiet=True).run()
    trainer, _ = _remote(_dp_config(tmp_path, task, "remote", dp, aggregator, **options))
    remote = trainer.run()
    eps_local = [row["epsilon"] for row in local.history]
    eps_remote = [row["epsilon"] for row in remote.history]
    assert eps_remote == eps_local and eps_remote[0] > 0 and eps_remote[1] > eps_remote[0]
    assert (Path(trainer.run_dir) / "privacy_ledger.json").exists()  # the server's write-ahead ledger


def test_adaptive_clip_norm_travels_to_the_clients(tmp_path: Path, task: Path) -> None:
    dp = {**DP_NOISY, "adaptive": {"target_quantile": 0.5, "learning_rate": 0.5, "count_noise_stddev": 1.0}}
    trainer, workers = _remote(_dp_config(tmp_path, task, "remote", dp))
    (server_hook,) = trainer.hooks.hooks
    trainer._remote_result(1)
    moved = server_hook.dp.clip_norm
    assert moved != dp["clip_norm"]  # all updates are far above 0.05: the tracked norm moves
    trainer._remote_result(2)
    for worker in workers.values():
        (hook,) = worker.trainer.hooks.hooks
        assert hook.dp.clip_norm == moved  # round 2 was clipped with the server's C_2


def test_worker_refuses_a_clip_norm_the_run_did_not_configure(tmp_path: Path, task: Path) -> None:
    """Distributed noise is calibrated to dp.clip_norm in ring units: a server raising C would under-noise
    every client, so a worker refuses the round (a dropout for that stage), as it refuses a missing C."""
    from fedguard.federation.protocol import RoundSpec
    from fedguard_train.flower.dp_split import CLIP_KEY
    from fedguard_train.flower.rounds import FirstStage, broadcast_message, stage_request

    dp = {**DP_NOISY, "placement": "distributed"}
    cfg = _dp_config(tmp_path, task, "remote", dp, "masking", threshold=3)
    trainer, workers = _remote(cfg)
    spec = RoundSpec(1, (0, 1, 2), trainer.upload.travelling_length + 1, trainer.hooks.ring_encoding().spec.ring_bits)
    outbox = trainer.aggregator.server(spec).open()
    theta = broadcast_message(1, trainer.global_vector())
    for bad in ({CLIP_KEY: 0.5}, {}, {CLIP_KEY: float("nan")}):
        header, blobs = stage_request(1, "advertise", outbox[0], FirstStage(theta, spec, bad))
        with pytest.raises(MessageError, match="clip norm|dp_clip_norm"):
            workers[0].handle(header, blobs)


# -- what else runs over the network: Paillier, the watermark hook, client sampling ----------------------------
def _same_as_in_process(tmp_path: Path, task: Path, **overrides: Any) -> tuple[Any, Any]:
    """The in-process trainer and the remote one (workers behind DirectExchange) on the same config: both
    runs' results, after checking that the final adapters are bit-identical and nobody dropped."""
    local_trainer = build_trainer(tiny_config(tmp_path / "in", task, **overrides), quiet=True)
    local = local_trainer.run()
    cfg = tiny_config(tmp_path / "remote", task, **overrides)
    workers = {k: ClientWorker(cfg, k) for k in range(cfg.n_parties)}
    try:
        trainer = remote_trainer(cfg, DirectExchange(workers))
        remote = trainer.run()
    finally:
        for worker in workers.values():
            worker.close()
    assert trainer.global_vector().tobytes() == local_trainer.global_vector().tobytes()
    assert not trainer.drops.events
    return local, remote


def test_paillier_round_gives_the_in_process_adapters(tmp_path: Path, task: Path) -> None:
    local, remote = _same_as_in_process(tmp_path, task, data__partition="attribute",
                                        federation={"clients": 3, "rounds": 2, "aggregator": "paillier"})
    assert [r["clients"] for r in remote.history] == [r["clients"] for r in local.history]


@pytest.mark.parametrize("aggregator", ["masking", "paillier"])
def test_quantised_uploads_give_the_in_process_adapters(tmp_path: Path, task: Path, aggregator: str) -> None:
    """The demo's encoding (8-bit stochastic rounding on a shared public scale, equal weights) over the network:
    each worker draws its rounding from the same seeded stream as the in-process client, so the adapters are
    bit-identical, and the bytes counted on the wire are the in-process run's."""
    local, remote = _same_as_in_process(tmp_path, task, data__partition="attribute",
                                        federation={"clients": 3, "rounds": 2, "aggregator": aggregator,
                                                    "upload_bits": 8, "clip": 0.05})
    assert [r["bytes_up"] for r in remote.history] == [r["bytes_up"] for r in local.history]


def test_watermark_hook_runs_in_the_workers(tmp_path: Path, task: Path) -> None:
    """FedIPR's regulariser is part of each client's loss (the worker's trainer hooks): with the same client
    keys (one key_dir) the remote run's adapters are the in-process run's, and the server's verification
    after the last round finds every client's bits (as tests/train/test_watermark_hook.py does in process:
    chance is 12 of 24)."""
    wm = {"bits": 24, "alpha": 0.1, "key_dir": str(tmp_path / "keys")}
    local, remote = _same_as_in_process(tmp_path, task, watermark=wm, federation={"clients": 2, "rounds": 2},
                                        training={"local_steps": 8, "batch_size": 4, "lr": 0.003})
    last = remote.history[-1]
    assert last["watermark_matched"] == local.history[-1]["watermark_matched"]
    assert all(m >= 18 for m in last["watermark_matched"]), last


@pytest.mark.parametrize(("sampling", "aggregator", "options"), [
    ({"clients_per_round": 2}, "masking", {"threshold": 2}),
    ({"sample_rate": 0.5}, "plaintext", {}),  # a Poisson sample's size varies: masking's graph refuses n=4 at t=2
])
def test_client_sampling_gives_the_in_process_rounds(tmp_path: Path, task: Path, sampling: dict[str, Any],
                                                     aggregator: str, options: dict[str, Any]) -> None:
    """The server draws each round's sample (the trainer's seeded participants); only the sampled clients
    get the round's messages, and the rounds equal the in-process ones."""
    local, remote = _same_as_in_process(tmp_path, task, data__partition="iid",
                                        federation={"clients": 4, "rounds": 2, "aggregator": aggregator,
                                                    "aggregator_options": options, **sampling})
    assert [r["clients"] for r in remote.history] == [r["clients"] for r in local.history]
    assert any(r["clients"] < 4 for r in remote.history)  # a real sample (the row counts contributors)


# -- MPC over the network: every worker seals to the parties pinned by the party-keys file --------------------
def _mpc_overrides(options: dict[str, Any], clients: int = 3) -> dict[str, Any]:
    return {"data__partition": "attribute",
            "federation": {"clients": clients, "rounds": 2, "aggregator": "mpc", "aggregator_options": options}}


def _pinned_workers(tmp_path: Path, task: Path, keys: tuple[bytes, ...], *, wrong: frozenset[int] = frozenset(),
                    clients: int = 3) -> tuple[Any, dict[int, ClientWorker]]:
    """Workers whose configs only pin the parties (``party_keys_file``; no party, no coordinator options); the
    clients in ``wrong`` pin keys of other parties."""
    from fedguard.secagg.mpc import SimulatedParties
    from fedguard.secagg.mpc.pin import write_party_keys

    good = write_party_keys(tmp_path / "party_keys.json", keys)
    bad = write_party_keys(tmp_path / "other_keys.json", SimulatedParties(len(keys)).public_keys)
    workers = {}
    for k in range(clients):
        cfg = tiny_config(tmp_path / f"worker{k}", task, **_mpc_overrides(
            {"backend": "network", "party_keys_file": str(bad if k in wrong else good)}, clients))
        workers[k] = ClientWorker(cfg, k)
    return cfg, workers


def test_mpc_round_over_the_network_gives_the_in_process_adapters(tmp_path: Path, task: Path) -> None:
    """The coordinator's parties (simulated here: the round driver and the workers' sealing are what is
    tested) and workers that know them only from the pin: bit-identical adapters to in-process MPC."""
    from fedguard.secagg.mpc import PinnedParties

    overrides = _mpc_overrides({"backend": "simulated"})
    local_trainer = build_trainer(tiny_config(tmp_path / "in", task, **overrides), quiet=True)
    local_trainer.run()
    trainer = remote_trainer(tiny_config(tmp_path / "remote", task, **overrides), DirectExchange({}))
    _, workers = _pinned_workers(tmp_path, task, trainer._require_aggregator().parties.public_keys)
    try:
        assert all(isinstance(w.aggregator.parties, PinnedParties) for w in workers.values())  # none started
        trainer.exchange = DirectExchange(workers)
        trainer.run()
    finally:
        for worker in workers.values():
            worker.close()
    assert trainer.global_vector().tobytes() == local_trainer.global_vector().tobytes()
    assert not trainer.drops.events


def test_a_worker_with_a_wrong_pin_refuses_to_seal_and_is_a_dropout(tmp_path: Path, task: Path) -> None:
    """Client 2 pins other parties' keys: it refuses the server's request (ProtocolViolation in the worker,
    answered as an error: its dropout at the input stage, not a crash), and the round is exact over the
    others: equal to the in-process round with client 2 dropped at the same stage."""
    from fedguard.federation.round import run_round
    from fedguard.rng import SecureRNG

    overrides = _mpc_overrides({"backend": "simulated"})
    cfg = tiny_config(tmp_path / "remote", task, **overrides)
    trainer = remote_trainer(cfg, DirectExchange({}))
    _, workers = _pinned_workers(tmp_path, task, trainer._require_aggregator().parties.public_keys,
                                 wrong=frozenset({2}))
    trainer.exchange = DirectExchange(workers)
    theta = trainer.global_vector()
    result = trainer._remote_result(1)
    assert result.contributors == (0, 1)
    [(client, stage, reason)] = trainer.drops.events
    assert (client, stage) == (2, "input") and "ProtocolViolation" in reason and "other compute parties" in reason

    ref = build_trainer(tiny_config(tmp_path / "in", task, **overrides), quiet=True)
    expected = run_round(1, theta, range(3), lambda c, v: ref.client_step(1, c, v), ref.aggregator, ref.spec,
                         hooks=ref.hooks, rng=SecureRNG.for_testing(f"{cfg.seed}/aggregate/1"), drop_at={2: "input"})
    assert result.global_vector.tobytes() == expected.global_vector.tobytes()
    # the worker keeps serving: next round it is asked again (and refuses again), the others carry on
    assert trainer._remote_result(2).contributors == (0, 1)


def test_an_mpc_worker_without_a_pin_is_refused_before_it_loads_a_model(tmp_path: Path, task: Path) -> None:
    cfg = tiny_config(tmp_path / "w", task, **_mpc_overrides({"backend": "simulated"}))
    with pytest.raises(ConfigError, match="must pin their public keys: set aggregator_options.party_keys_file"):
        ClientWorker(cfg, 0)


def test_signed_masking_round_gives_the_in_process_adapters(tmp_path: Path, task: Path) -> None:
    """``aggregator: masking-signed`` (clients sign their keys with roster identities; the server checks them)
    through the workers: each worker loads its own client's identity file, and the adapters are the
    in-process run's."""
    from fedguard.identity import Identity, Roster

    keys = tmp_path / "keys"
    keys.mkdir()
    identities = {c: Identity.generate(c) for c in range(3)}
    for c, ident in identities.items():
        ident.save(keys / f"client-{c}.identity")
    Roster.of(identities, "flower-test").save(tmp_path / "roster.json")
    options = {"roster_file": str(tmp_path / "roster.json"), "identity_files": str(keys / "client-{client}.identity")}
    local, remote = _same_as_in_process(tmp_path, task, data__partition="attribute",
                                        federation={"clients": 3, "rounds": 2, "aggregator": "masking-signed",
                                                    "aggregator_options": options})
    assert [r["clients"] for r in remote.history] == [r["clients"] for r in local.history] == [3, 3]
