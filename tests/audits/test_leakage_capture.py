"""The server-view capture stores exactly what the server received: plaintext updates, masked vectors
or ciphertexts, byte for byte, and the decoded aggregate; nothing when capture is off."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedguard.encoding import FixedPointSpec, dequantize, from_ring
from fedguard.federation import InProcessTransport, aggregate_updates
from fedguard.federation.registry import make_aggregator
from fedguard.rng import SecureRNG
from fedguard.updates import ClientUpdate
from fedguard.wire import decode
from fedguard_train.capture import CapturingAggregator, ServerView

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def task(tmp_path: Path) -> Path:
    from tests.train.conftest import write_task

    return write_task(tmp_path / "task.jsonl")


SPEC = FixedPointSpec(clip=1.0, value_bits=24, ring_bits=64, max_weight=1000)


def _updates(n: int = 3, d: int = 40) -> list[ClientUpdate]:
    rng = SecureRNG.for_testing("capture-updates")
    return [ClientUpdate(i, 1, rng.normal(d, std=0.1).astype(np.float32), 5 * (i + 1)) for i in range(n)]


class _Recorder(InProcessTransport):
    """The transport, recording what it delivered to the server (the reference the capture must match)."""

    def __init__(self) -> None:
        self.delivered: dict[tuple[str, int], bytes] = {}

    def run(self, server, clients, *, drop_at=None, tamper=None):  # type: ignore[no-untyped-def, override]
        def record(stage: str, cid: int, reply: bytes) -> bytes:
            self.delivered[(stage, cid)] = reply
            return reply

        return super().run(server, clients, drop_at=drop_at, tamper=record)


def _capture(tmp_path: Path, name: str, **options: object) -> tuple[ServerView, dict, list[ClientUpdate], Path]:
    inner = make_aggregator(name, options)
    view = ServerView(tmp_path / "server_view", inner)
    updates = _updates()
    view.begin(1, np.zeros(40, dtype=np.float32))
    transport = _Recorder()
    with CapturingAggregator(inner, view) as agg:
        out = aggregate_updates(updates, agg, SPEC, round_id=1, rng=SecureRNG.for_testing(1), transport=transport)
    view.record_mean(1, out.mean, out.contributors)
    directory = tmp_path / "server_view" / "round_0001"
    manifest = json.loads((directory / "view.json").read_text())
    # every byte the server accepted is on disk, and nothing else
    stored = {(p["stage"], p["client"]): (directory / p["file"]).read_bytes() for p in manifest["payloads"]}
    assert stored == transport.delivered
    with np.load(directory / "aggregate.npz") as data:
        np.testing.assert_array_equal(data["mean"], out.mean)
        assert tuple(data["contributors"]) == out.contributors
    assert manifest["aggregator"] == name and manifest["status"] == "complete"
    return view, manifest, updates, directory


def test_plaintext_capture_holds_each_clients_update(tmp_path: Path) -> None:
    _, manifest, updates, directory = _capture(tmp_path, "plaintext")
    for u in updates:
        msg = decode((directory / "input" / f"client_{u.client_id}.msg").read_bytes())
        signed = from_ring(msg.arrays["x"], SPEC.ring_bits)
        assert int(signed[-1]) == u.weight  # the weight slot travels in the clear too
        recovered = dequantize(signed[:-1], SPEC, divisor=int(signed[-1]))
        assert np.abs(recovered - u.vector).max() <= SPEC.error_bound() + 1e-7  # the individual update
    assert manifest["fixed_point"]["value_bits"] == SPEC.value_bits


def test_masking_capture_holds_only_masked_vectors(tmp_path: Path) -> None:
    _, manifest, updates, directory = _capture(tmp_path, "masking")
    assert {p["stage"] for p in manifest["payloads"]} >= {"advertise", "share", "mask", "unmask"}
    for u in updates:
        msg = decode((directory / "mask" / f"client_{u.client_id}.msg").read_bytes())
        signed = from_ring(msg.arrays["x"], SPEC.ring_bits)
        naive = dequantize(signed[:-1], SPEC, divisor=u.weight)
        # what the server holds of one client is a masked vector: no correlation with the update
        corr = np.corrcoef(naive.astype(np.float64), u.vector.astype(np.float64))[0, 1]
        assert abs(corr) < 0.5
        assert np.abs(naive - u.vector).max() > 1.0


def test_paillier_capture_holds_ciphertexts(tmp_path: Path) -> None:
    _, manifest, updates, directory = _capture(tmp_path, "paillier", key_bits=512, allow_insecure_test_keys=True)
    for u in updates:
        msg = decode((directory / "input" / f"client_{u.client_id}.msg").read_bytes())
        assert msg.kind == "paillier/ciphertexts" and set(msg.arrays) == {"c"}
    # the key holder's decrypt reply is the revealed sum, which the server holds anyway
    assert any(p["stage"] == "decrypt" for p in manifest["payloads"])


def test_trainer_capture_writes_the_round_view_and_warns(tmp_path: Path, task: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from fedguard_train.runner import build_trainer
    from tests.train.conftest import tiny_config

    cfg = tiny_config(tmp_path, task, capture=True, federation={"clients": 2, "rounds": 1})
    trainer = build_trainer(cfg, quiet=True)
    assert "SERVER VIEW CAPTURED" in trainer.aggregator_label
    start = trainer.global_vector()
    trainer.run()
    assert "SERVER VIEW CAPTURED" in capsys.readouterr().err
    directory = Path(cfg.run_dir) / "server_view" / "round_0001"
    np.testing.assert_array_equal(np.load(directory / "global.npy"), start)
    manifest = json.loads((directory / "view.json").read_text())
    spec = FixedPointSpec(**manifest["fixed_point"])
    total, weights = np.zeros_like(start, dtype=np.float64), 0
    for p in manifest["payloads"]:
        signed = from_ring(decode((directory / p["file"]).read_bytes()).arrays["x"], spec.ring_bits)
        total += dequantize(signed[:-1], spec).astype(np.float64)
        weights += int(signed[-1])
    with np.load(directory / "aggregate.npz") as data:
        np.testing.assert_allclose(total / weights, data["mean"], atol=1e-6)  # the captured updates make the mean


def test_capture_is_off_by_default(tmp_path: Path, task: Path) -> None:
    from fedguard_train.runner import build_trainer
    from tests.train.conftest import tiny_config

    cfg = tiny_config(tmp_path, task, federation={"clients": 2, "rounds": 1})
    trainer = build_trainer(cfg, quiet=True)
    assert not isinstance(trainer.aggregator, CapturingAggregator)
    trainer.run()
    assert not (Path(cfg.run_dir) / "server_view").exists()


def _mpc_view_checks(manifest: dict, updates: list[ClientUpdate], directory: Path) -> None:
    """What an MPC server holds of each client: ciphertexts of shares sealed to the parties, no ring vector."""
    assert {p["stage"] for p in manifest["payloads"]} == {"input"}
    for u in updates:
        msg = decode((directory / "input" / f"client_{u.client_id}.msg").read_bytes())
        assert "x" not in msg.arrays and "epk" in msg.arrays
        assert {k for k in msg.arrays if k.startswith("ct")} == {"ct0", "ct1", "ct2"}  # one sealed share per party
        # party 0's sealed share carries the ring vector (d + 1 words of 8 bytes, plus the AEAD tag); the
        # others are sealed seeds: nothing the server holds opens without a party's private key
        assert len(msg.blob("ct0")) >= 8 * 41 and all(len(msg.blob(f"ct{k}")) < 8 * 41 for k in (1, 2))
    with np.load(directory / "aggregate.npz") as data:  # the revealed mean is the plaintext weighted mean
        expected = sum(u.weight * u.vector for u in updates) / sum(u.weight for u in updates)
        assert np.abs(data["mean"] - expected).max() <= SPEC.error_bound() + 1e-6


def test_mpc_capture_holds_sealed_shares_simulated_parties(tmp_path: Path) -> None:
    _, manifest, updates, directory = _capture(tmp_path, "mpc", backend="simulated", n_parties=3)
    _mpc_view_checks(manifest, updates, directory)


@pytest.mark.multiprocess
def test_mpc_capture_holds_sealed_shares_crypten_parties(tmp_path: Path) -> None:
    _, manifest, updates, directory = _capture(tmp_path, "mpc", n_parties=3)  # real CrypTen party processes
    _mpc_view_checks(manifest, updates, directory)


def test_capture_over_remote_rounds_matches_in_process(tmp_path: Path, task: Path) -> None:
    """The Flower path's round driver (fedguard_train.flower: workers answering one stage per round trip,
    here over its in-process exchange) captures the same server view: plaintext updates byte for byte equal
    to the in-process trainer's (same seed), and the decoded means equal."""
    from fedguard_train.flower.coordinator import remote_trainer
    from fedguard_train.flower.worker import ClientWorker, DirectExchange
    from fedguard_train.runner import build_trainer
    from tests.train.conftest import tiny_config

    def config(name: str):  # type: ignore[no-untyped-def]
        return tiny_config(tmp_path / name, task, capture=True, federation={"clients": 2, "rounds": 1})

    build_trainer(config("in"), quiet=True).run()
    cfg = config("remote")
    remote_trainer(cfg, DirectExchange({k: ClientWorker(cfg, k) for k in range(cfg.n_parties)})).run()
    views = [Path(c.run_dir) / "server_view" / "round_0001" for c in (config("in"), cfg)]
    manifests = [json.loads((v / "view.json").read_text()) for v in views]
    assert all(m["status"] == "complete" and m["aggregator"] == "plaintext" for m in manifests)
    for k in range(2):
        a, b = ((v / "input" / f"client_{k}.msg").read_bytes() for v in views)
        assert decode(a).arrays["x"].tobytes() == decode(b).arrays["x"].tobytes()
    means = []
    for v in views:
        with np.load(v / "aggregate.npz") as data:
            means.append(data["mean"])
    np.testing.assert_array_equal(means[0], means[1])


def test_a_custom_ring_encoding_is_not_decoded_with_the_trainers_spec() -> None:
    """Distributed DP encodes with its own fixed point: the manifest's trainer spec must not be used to decode."""
    from attacks.run_view import view_spec
    from fedguard.errors import ConfigError

    fixed = {"clip": 1.0, "value_bits": 24, "ring_bits": 64, "max_weight": 4}
    assert view_spec({"round": 1, "fixed_point": fixed, "custom_encoding": False}).max_weight == 4
    with pytest.raises(ConfigError, match="custom ring encoding"):
        view_spec({"round": 1, "fixed_point": fixed, "custom_encoding": True})
