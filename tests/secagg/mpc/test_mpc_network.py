"""MPC compute parties on other hosts: the authenticated control channel, its codec, and real party
programs (separate OS processes that rendezvous by address, as they would across machines)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedguard import wire
from fedguard.encoding import FixedPointSpec, ring_sum
from fedguard.errors import ConfigError, MessageError, ProtocolAbort
from fedguard.federation import aggregate_updates
from fedguard.rng import SecureRNG
from fedguard.secagg.mpc import MpcAggregator
from fedguard.secagg.mpc.crypten_rng import CHACHA
from fedguard.secagg.mpc.network import (
    ChannelError,
    ControlChannel,
    KeyConfirmationError,
    NetworkParties,
    decode_job,
    encode_job,
    read_control_key,
    write_control_key,
)
from fedguard.secagg.mpc.norm import NormCheck
from fedguard.secagg.mpc.parties import AggregationJob
from fedguard.secagg.mpc.sharing import SealedShares
from fedguard.updates import ClientUpdate

KEY = bytes(range(32))


def _pair(key_a: bytes = KEY, key_b: bytes = KEY) -> tuple[ControlChannel, ControlChannel]:
    a, b = socket.socketpair()
    out: dict[str, Any] = {}

    def responder() -> None:
        try:
            out["b"] = ControlChannel(b, key_b, initiator=False, timeout_s=5)
        except ChannelError as err:
            out["b"] = err

    t = threading.Thread(target=responder)
    t.start()
    try:
        out["a"] = ControlChannel(a, key_a, initiator=True, timeout_s=5)
    finally:
        t.join()
    if isinstance(out["b"], Exception):
        raise out["b"]
    return out["a"], out["b"]


def _msg(kind: str = "ping", n: int = 3) -> wire.Message:
    return wire.Message(kind=kind, round=1, stage="s", sender=0, recipient=wire.SERVER, meta={"n": n},
                        arrays={"x": np.arange(n, dtype=np.uint64)})


def test_the_control_channel_carries_messages_both_ways() -> None:
    party, coordinator = _pair()
    party.send(_msg(n=5))
    got = coordinator.recv()
    assert got.kind == "ping" and got.meta["n"] == 5 and np.array_equal(got.array("x"), np.arange(5))
    coordinator.send(_msg("pong"))
    assert party.recv().kind == "pong"


def test_a_peer_without_the_control_key_is_refused_before_any_frame() -> None:
    with pytest.raises(KeyConfirmationError, match="does not hold the control key"):
        _pair(key_b=bytes(32))


@pytest.mark.parametrize("attack", ["flip", "replay", "truncate"])
def test_tampered_replayed_and_truncated_frames_are_refused(attack: str) -> None:
    party, coordinator = _pair()
    raw = party.sock
    captured: list[bytes] = []
    party.sock = _Recorder(raw, captured)  # type: ignore[assignment]
    party.send(_msg())
    coordinator.recv()  # the genuine frame is accepted
    frame = captured[-1]
    forged = {"flip": frame[:-1] + bytes([frame[-1] ^ 1]), "replay": frame, "truncate": frame[:-5]}[attack]
    raw.sendall(forged)
    if attack == "truncate":
        raw.shutdown(socket.SHUT_WR)
    with pytest.raises(ChannelError):
        coordinator.recv()


class _Recorder:
    """A socket wrapper that records what is sent (to replay or forge a frame)."""

    def __init__(self, sock: socket.socket, log: list[bytes]) -> None:
        self._sock, self._log = sock, log

    def sendall(self, data: bytes) -> None:
        self._log.append(bytes(data))
        self._sock.sendall(data)

    def settimeout(self, t: float) -> None:
        self._sock.settimeout(t)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()


def test_a_job_travels_with_only_the_receiving_partys_ciphertexts() -> None:
    inputs = {c: SealedShares(bytes([c]) * 32, tuple(bytes([c, k]) * (10 + c) for k in range(3))) for c in (4, 9, 2)}
    norm = NormCheck.for_bound(0.5, FixedPointSpec(value_bits=12, max_weight=10), 10, clip_halvings=2, n_clients=3)
    job = AggregationJob(round_id=7, vector_length=11, ring_bits=64, inputs=inputs, norm=norm, min_contributors=2)
    for rank in range(3):
        back = decode_job(wire.decode(wire.encode(encode_job(job, rank))), rank)
        assert back.round_id == 7 and back.vector_length == 11 and back.min_contributors == 2
        assert back.norm == norm
        for c, s in inputs.items():
            assert back.inputs[c].ephemeral_key == s.ephemeral_key
            assert back.inputs[c].ciphertexts[rank] == s.ciphertexts[rank]
            assert all(ct == b"" for k, ct in enumerate(back.inputs[c].ciphertexts) if k != rank)
    bad = encode_job(job, 0)
    broken = wire.Message(kind=bad.kind, round=bad.round, stage=bad.stage, sender=bad.sender,
                          recipient=bad.recipient, meta={**bad.meta, "epk_lengths": [32, 32]}, arrays=bad.arrays)
    with pytest.raises(MessageError, match="inconsistent"):
        decode_job(broken, 0)


def test_a_job_carries_each_clients_signature_only_to_its_party() -> None:
    inputs = {c: SealedShares(bytes([c]) * 32, tuple(bytes([c, k]) * 7 for k in range(2)),
                              tuple(bytes([c, k, 9]) * 20 + bytes(4) for k in range(2))) for c in (3, 8)}
    job = AggregationJob(round_id=4, vector_length=3, ring_bits=64, inputs=inputs)
    for rank in range(2):
        back = decode_job(wire.decode(wire.encode(encode_job(job, rank))), rank)
        for c, s in inputs.items():
            assert back.inputs[c].signatures[rank] == s.signatures[rank]
            assert back.inputs[c].signatures[1 - rank] == b""
    bad = encode_job(job, 0)
    broken = wire.Message(kind=bad.kind, round=bad.round, stage=bad.stage, sender=bad.sender,
                          recipient=bad.recipient, meta={**bad.meta, "sig_lengths": [64, 65]}, arrays=bad.arrays)
    with pytest.raises(MessageError, match="inconsistent"):
        decode_job(broken, 0)


def test_control_key_files_are_private_and_exact(tmp_path: Path) -> None:
    path = write_control_key(tmp_path / "control.key")
    assert oct(path.stat().st_mode & 0o777) == "0o600" and len(read_control_key(path)) == 32
    with pytest.raises(FileExistsError):
        write_control_key(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        read_control_key(path)
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 8)
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="must hold 32 bytes"):
        read_control_key(short)
    with pytest.raises(ConfigError, match="needs listen='HOST:PORT' and control_key_file"):
        MpcAggregator(backend="network")
    path.chmod(0o600)
    with pytest.raises(ProtocolAbort, match=r"MPC parties \[0, 1, 2\] did not connect within 0.5 s"):
        MpcAggregator(backend="network", listen=f"127.0.0.1:{_free_port()}", control_key_file=str(path),
                      startup_timeout_s=0.5)  # the config path builds NetworkParties and waits for them


def test_the_coordinator_refuses_a_party_with_the_wrong_key_and_times_out() -> None:
    parties = NetworkParties(2, listen=("127.0.0.1", 0), control_key=KEY, startup_timeout_s=3.0)
    address = parties.bind()

    seen: list[Exception] = []

    def impostor() -> None:
        sock = socket.create_connection(address)
        try:
            ControlChannel(sock, bytes(32), initiator=True, timeout_s=3)
        except KeyConfirmationError as err:  # the coordinator refuses it too, and never reads a frame from it
            seen.append(err)

    threading.Thread(target=impostor, daemon=True).start()
    with pytest.raises(ProtocolAbort, match=r"\[0, 1\] did not connect .*key confirmation"):
        parties.start()
    assert len(seen) == 1


def test_a_stalling_peer_does_not_hold_up_the_real_parties() -> None:
    """A connection that never completes its handshake (or trickles bytes) is handled in its own thread."""
    parties = NetworkParties(2, listen=("127.0.0.1", 0), control_key=KEY, startup_timeout_s=8.0)
    address = parties.bind()
    stalls = [socket.create_connection(address) for _ in range(3)]  # connect, then say nothing

    def party(rank: int) -> None:
        channel = ControlChannel(socket.create_connection(address), KEY, initiator=True, timeout_s=5)
        channel.send(wire.Message(kind="mpc-ready", round=0, stage="mpc-control", sender=rank, recipient=-1,
                                  meta={"rank": rank, "n_parties": 2, "norm_check": False, "generators": {}},
                                  arrays={"public_key": wire.bytes_array(bytes([rank]) * 32)}))

    for rank in (0, 1):
        threading.Thread(target=party, args=(rank,), daemon=True).start()
    t0 = time.monotonic()
    parties.start()
    assert time.monotonic() - t0 < 5.0  # well before the stalled handshakes time out
    assert parties.public_keys == (bytes([0]) * 32, bytes([1]) * 32)
    parties.close()
    for sock in stalls:
        sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def remote_parties(tmp_path: Path) -> Iterator[tuple[NetworkParties, list[subprocess.Popen[bytes]]]]:
    """2 parties + a dealer as separate programs that rendezvous at an address (here 127.0.0.1)."""
    key_file = write_control_key(tmp_path / "control.key")
    parties = NetworkParties(2, listen=("127.0.0.1", 0), control_key=read_control_key(key_file), norm_check=True,
                             timeout_s=30.0, startup_timeout_s=120.0)
    host, port = parties.bind()
    rendezvous = f"127.0.0.1:{_free_port()}"
    common = ["--parties", "2", "--rendezvous", rendezvous, "--interface", "lo", "--timeout", "30"]
    cmd = [sys.executable, "-m", "fedguard.secagg.mpc.network"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([*cmd, "party", "--rank", str(r), *common, "--coordinator", f"{host}:{port}",
                               "--control-key", str(key_file), "--norm-check"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r in range(2)]
    procs.append(subprocess.Popen([*cmd, "dealer", *common], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE))
    try:
        yield parties.start(), procs
    finally:
        parties.close()
        deadline = time.monotonic() + 20
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.mark.multiprocess
def test_parties_started_by_address_sum_exactly_and_check_norms(
    remote_parties: tuple[NetworkParties, list[subprocess.Popen[bytes]]],
) -> None:
    parties, procs = remote_parties
    assert all(set(g.values()) == {CHACHA} and "dealer" in g for g in parties.generators)
    spec = FixedPointSpec(clip=1.0, value_bits=16, ring_bits=64, max_weight=100)
    agg = MpcAggregator(parties=parties, norm_bound=1.0)  # the encoding travels in the round (aggregate_updates)
    rng = SecureRNG.for_testing("network")
    vectors = [rng.normal(64, std=0.05).astype(np.float32) for _ in range(3)]
    vectors.append(np.full(64, 0.9, dtype=np.float32))  # norm 7.2: over the bound
    updates = [ClientUpdate(c, 1, v, 10 + c) for c, v in enumerate(vectors)]
    out = aggregate_updates(updates, agg, spec, round_id=1, rng=SecureRNG.for_testing("q"))
    assert out.contributors == (0, 1, 2) and out.dropped.get("norm-check") == (3,)
    expected = sum(u.weight * u.vector.astype(np.float64) for u in updates[:3]) / sum(u.weight for u in updates[:3])
    assert np.abs(out.mean - expected).max() <= spec.error_bound() + 1e-7
    # the plain secure sum over the same connections equals the ring sum exactly
    plain = MpcAggregator(parties=parties)
    from fedguard.federation.protocol import RoundSpec
    from fedguard.federation.transport import InProcessTransport

    spec2 = RoundSpec(2, (5, 6), vector_length=9)
    xs = {c: SecureRNG.for_testing(f"x{c}").ring_elements(9, 64) for c in (5, 6)}
    result = InProcessTransport().run(plain.server(spec2), {c: plain.client(spec2, c, xs[c]) for c in xs}).result
    assert np.array_equal(result.ring_sum, ring_sum(list(xs.values()), 64))
    # a party that dies makes the next round abort, nothing revealed
    procs[1].kill()
    procs[1].wait()
    with pytest.raises(ProtocolAbort):
        InProcessTransport().run(plain.server(RoundSpec(3, (5, 6), vector_length=9)),
                                 {c: plain.client(RoundSpec(3, (5, 6), vector_length=9), c, xs[c]) for c in xs})
