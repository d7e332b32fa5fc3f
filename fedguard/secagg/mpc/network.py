"""MPC compute parties on other machines: a party program, its control channel, and the coordinator side.

:class:`~fedguard.secagg.mpc.parties.CryptenParties` starts its parties as child processes of the server
on one machine. Across machines (each party run by a different organisation), every party runs this
module's party program on its own host, and the server's process holds a :class:`NetworkParties`:

* the parties rendezvous with each other over ``torch.distributed`` (gloo) at ``MASTER_ADDR``/
  ``RENDEZVOUS`` = ``--rendezvous HOST:PORT`` (party 0's machine), exactly as CrypTen expects; with the
  norm check, a dealer (CrypTen's trusted third party, rank ``K``) joins the same rendezvous;
* each party connects to the coordinator (``--coordinator HOST:PORT``) over a :class:`ControlChannel`,
  announces its rank, public key and the kind of its CrypTen generators, and then serves one
  :class:`~fedguard.secagg.mpc.parties.AggregationJob` per round, answering with the revealed result.

The control channel is a TCP stream authenticated and encrypted with a pre-shared 256-bit control key
(a file of mode 0600 given to the coordinator and to every party): both ends send a 32-byte nonce, derive
one ChaCha20-Poly1305 key per direction with HKDF-SHA256 from the control key and both nonces, and every
frame carries an 8-byte length and an AEAD ciphertext under a counter nonce. A peer without the key, a
modified, replayed, reordered or truncated frame each fail authentication, and the connection is dropped.
Frames carry :mod:`fedguard.wire` messages (no pickle): the client shares inside a job are already
encrypted to each party, and each party receives only its own.

Run a party (``python -m fedguard.secagg.mpc.network --help``)::

    python -m fedguard.secagg.mpc.network keygen --out control.key          # once; copy to every host
    python -m fedguard.secagg.mpc.network party --rank 0 --parties 3 \\
        --rendezvous 10.0.0.1:29500 --coordinator 10.0.0.9:29600 --control-key control.key [--norm-check] \\
        [--roster roster.json]   # check every share's client signature against the deployment's roster
    python -m fedguard.secagg.mpc.network dealer --parties 3 --rendezvous 10.0.0.1:29500   # --norm-check only

Clients that do not start the parties pin their public keys (:mod:`fedguard.secagg.mpc.pin`): each party
keeps a long-term key (``party-keygen --out party0.key`` prints its public key; ``party --key-file
party0.key``), and ``pin --out party_keys.json HEX0 HEX1 HEX2`` writes the file handed to every client
(``aggregator_options.party_keys_file``).

and on the server: ``NetworkParties(3, listen=("0.0.0.0", 29600), control_key=key, norm_check=...)``, or
``aggregator: mpc`` with ``aggregator_options: {backend: network, listen: "0.0.0.0:29600",
control_key_file: control.key, n_parties: 3}``.
"""

from __future__ import annotations

import argparse
import hmac
import os
import queue
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedguard import wire
from fedguard.checks import int_problem, is_int, number_problem
from fedguard.errors import ConfigError, MessageError, ProtocolAbort
from fedguard.identity import Roster
from fedguard.secagg.mpc.norm import NormCheck
from fedguard.secagg.mpc.parties import (
    AggregationJob,
    ComputeParties,
    PartiesResult,
    agreed_result,
    require_running,
)
from fedguard.secagg.mpc.sharing import SealedShares

CONTROL_KEY_BYTES = 32
_NONCE_BYTES = 32
_LENGTH = struct.Struct("<Q")
IDLE_TIMEOUT_S = 7 * 24 * 3600.0
"""How long a party waits for the next round before it gives up (a week)."""
HANDSHAKE_TIMEOUT_S = 10.0
"""How long a connecting party has to confirm the control key and announce itself."""
MAX_FRAME_BYTES = 1 << 33
"""Largest control frame accepted (8 GiB: a round's job for one party is ~8 bytes per value per client)."""


class ChannelError(ProtocolAbort):
    """The control channel failed: a peer without the control key, a tampered or replayed frame, a closed
    connection or a timeout."""


class KeyConfirmationError(ChannelError):
    """The peer does not hold the control key (retrying will not help)."""


# -- the control key ---------------------------------------------------------------------------------------
def write_control_key(path: str | Path) -> Path:
    """Write a fresh 256-bit control key to ``path`` (mode 0600; refuses to overwrite)."""
    target = Path(path)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(os.urandom(CONTROL_KEY_BYTES))
    return target


def read_control_key(path: str | Path) -> bytes:
    """Read a control key file: exactly 32 bytes, not readable by group or others."""
    return _read_secret_file(path, "control key", CONTROL_KEY_BYTES)


def _read_secret_file(path: str | Path, what: str, size: int) -> bytes:
    """The ``size`` bytes of the secret file ``path`` (``what`` names it in errors); :class:`ConfigError`
    when it cannot be read, is readable by group or others, or holds another number of bytes."""
    target = Path(path)
    try:
        mode = target.stat().st_mode
        data = target.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read the {what} {target}: {err}") from err
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{what} {target} is readable by others (mode {oct(mode & 0o777)}): chmod 600 it")
    if len(data) != size:
        raise ConfigError(f"{what} {target} must hold {size} bytes, got {len(data)}")
    return data


# -- a party's long-term key ---------------------------------------------------------------------------------
def write_party_key(path: str | Path) -> bytes:
    """Write a fresh X25519 private key for a compute party to ``path`` (32 raw bytes, mode 0600; refuses to
    overwrite) and return its public key: what the clients pin (:mod:`fedguard.secagg.mpc.pin`)."""
    from fedguard.secagg.mpc.sharing import new_party_key

    private = new_party_key()
    fd = os.open(Path(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(private.private_bytes_raw())
    return private.public_key().public_bytes_raw()


def read_party_key(path: str | Path) -> Any:
    """A party's private key file (:func:`write_party_key`): exactly 32 bytes, not readable by group or others;
    the X25519 private key."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.from_private_bytes(_read_secret_file(path, "party key", 32))


# -- the channel -------------------------------------------------------------------------------------------
class ControlChannel:
    """Mutually authenticated, encrypted, ordered frames over a connected TCP socket (see the module doc).

    ``initiator`` is the side that connected (a party); the coordinator accepted. The handshake ends with
    key confirmation (each side sends an HMAC of both nonces under a key derived from the control key), so
    a peer without the key is refused after 64 bytes, before any frame is read. Every read has a deadline
    for the whole frame (a peer that trickles bytes cannot hold a reader longer than its timeout). Every
    failure raises :class:`ChannelError`; after one the channel is closed.
    """

    def __init__(self, sock: socket.socket, key: bytes, *, initiator: bool, timeout_s: float) -> None:
        if not isinstance(key, bytes) or len(key) != CONTROL_KEY_BYTES:
            raise ConfigError(f"the control key must be {CONTROL_KEY_BYTES} bytes")
        self.sock = sock
        self.timeout_s = timeout_s
        self._send_counter = 0
        self._recv_counter = 0
        deadline = time.monotonic() + timeout_s
        mine = os.urandom(_NONCE_BYTES)
        try:
            sock.settimeout(timeout_s)
            sock.sendall(mine)
            theirs = self._read_exact(_NONCE_BYTES, deadline)
            first, second = (mine, theirs) if initiator else (theirs, mine)
            keys = HKDF(algorithm=hashes.SHA256(), length=96, salt=first + second,
                        info=b"fedguard/mpc-control/v1").derive(key)
            confirm = {role: hmac.new(keys[64:], role + first + second, "sha256").digest()
                       for role in (b"initiator", b"responder")}
            me, peer = (b"initiator", b"responder") if initiator else (b"responder", b"initiator")
            sock.sendall(confirm[me])
            if not hmac.compare_digest(self._read_exact(len(confirm[peer]), deadline), confirm[peer]):
                raise KeyConfirmationError("the peer failed key confirmation (it does not hold the control key)")
        except ChannelError:
            self.close()
            raise
        except OSError as err:
            self.close()
            raise ChannelError(f"control channel handshake failed: {err}") from err
        initiator_key, responder_key = ChaCha20Poly1305(keys[:32]), ChaCha20Poly1305(keys[32:64])
        self._send_aead, self._recv_aead = (initiator_key, responder_key) if initiator else (responder_key, initiator_key)

    def fileno(self) -> int:
        return self.sock.fileno()

    def _read_exact(self, n: int, deadline: float) -> bytes:
        chunks, got = [], 0
        while got < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChannelError("the peer did not send a whole message in time")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(min(n - got, 1 << 20))
            if not chunk:
                raise ChannelError("the control connection was closed by the peer")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    @staticmethod
    def _nonce(counter: int) -> bytes:
        return counter.to_bytes(12, "little")

    def send_bytes(self, payload: bytes) -> None:
        frame = self._send_aead.encrypt(self._nonce(self._send_counter), payload, None)
        self._send_counter += 1
        try:
            self.sock.settimeout(self.timeout_s)
            self.sock.sendall(_LENGTH.pack(len(frame)) + frame)
        except OSError as err:
            self.close()
            raise ChannelError(f"sending on the control channel failed: {err}") from err

    def recv_bytes(self, timeout_s: float | None = None) -> bytes:
        """One frame, read whole within ``timeout_s`` (default: the channel's timeout)."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else max(timeout_s, 1e-3))
        try:
            (length,) = _LENGTH.unpack(self._read_exact(_LENGTH.size, deadline))
            if not 16 <= length <= MAX_FRAME_BYTES:
                raise ChannelError(f"control frame of {length} bytes refused")
            frame = self._read_exact(length, deadline)
            payload = self._recv_aead.decrypt(self._nonce(self._recv_counter), frame, None)
        except InvalidTag:
            self.close()
            raise ChannelError("a control frame failed authentication (tampered, replayed or reordered)") from None
        except ChannelError:
            self.close()
            raise
        except OSError as err:  # timeouts included
            self.close()
            raise ChannelError(f"receiving on the control channel failed: {err}") from err
        self._recv_counter += 1
        return payload

    def send(self, msg: wire.Message) -> None:
        self.send_bytes(wire.encode(msg))

    def recv(self, timeout_s: float | None = None) -> wire.Message:
        data = self.recv_bytes(timeout_s)
        try:
            return wire.decode(data, max_bytes=MAX_FRAME_BYTES)
        except MessageError as err:
            self.close()
            raise ChannelError(f"malformed control message: {err}") from err

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# -- messages ----------------------------------------------------------------------------------------------
def _message(kind: str, *, round_id: int = 0, sender: int = wire.SERVER, recipient: int = wire.SERVER,
             meta: Mapping[str, Any] | None = None, arrays: Mapping[str, np.ndarray] | None = None) -> wire.Message:
    return wire.Message(kind=kind, round=round_id, stage="mpc-control", sender=sender, recipient=recipient,
                        meta=dict(meta or {}), arrays=dict(arrays or {}))


def _int(meta: Mapping[str, Any], key: str) -> int:
    value = meta.get(key)
    if not is_int(value):
        raise MessageError(f"control message field {key!r} must be an int, got {value!r}")
    return int(cast(int, value))


def _ints(meta: Mapping[str, Any], key: str) -> list[int]:
    value = meta.get(key)
    if not isinstance(value, list) or not all(is_int(v) for v in value):
        raise MessageError(f"control message field {key!r} must be a list of ints")
    return list(value)


def encode_job(job: AggregationJob, rank: int) -> wire.Message:
    """Party ``rank``'s view of ``job``: every client's ephemeral key, and only this party's ciphertext and
    the client's signature on it (empty without a roster), which the party checks against its own roster."""
    ids = sorted(job.inputs)
    cts = [job.inputs[c].ciphertexts[rank] if rank < len(job.inputs[c].ciphertexts) else b"" for c in ids]
    offsets = np.cumsum([0] + [len(ct) for ct in cts], dtype=np.int64)
    sigs = [job.inputs[c].signatures[rank] if rank < len(job.inputs[c].signatures) else b"" for c in ids]
    epks = b"".join(job.inputs[c].ephemeral_key for c in ids)
    norm = None if job.norm is None else {
        "bound": job.norm.bound, "length": job.norm.length, "chunk": job.norm.chunk,
        "chunks": job.norm.chunks, "threshold": job.norm.threshold,
        "clip_halvings": job.norm.clip_halvings, "scale_bits": job.norm.scale_bits,
    }
    return _message("mpc-job", round_id=job.round_id, recipient=rank, meta={
        "vector_length": job.vector_length, "ring_bits": job.ring_bits, "min_contributors": job.min_contributors,
        "norm": norm, "n_parties": max((len(s.ciphertexts) for s in job.inputs.values()), default=0),
        "epk_lengths": [len(job.inputs[c].ephemeral_key) for c in ids],
        "sig_lengths": [len(sig) for sig in sigs],
    }, arrays={"ids": np.asarray(ids, dtype=np.int64), "epk": wire.bytes_array(epks),
               "offsets": offsets, "ct": wire.bytes_array(b"".join(cts)), "sig": wire.bytes_array(b"".join(sigs))})


def decode_job(msg: wire.Message, rank: int) -> AggregationJob:
    """The job a party serves (its own ciphertexts in slot ``rank``); :class:`MessageError` if malformed."""
    if msg.kind != "mpc-job":
        raise MessageError(f"expected an mpc-job message, got {msg.kind!r}")
    meta = msg.meta
    ids = [int(i) for i in msg.array("ids", "<i8")]
    offsets = msg.array("offsets", "<i8")
    epk, ct = msg.blob("epk"), msg.blob("ct")
    epk_lengths = _ints(meta, "epk_lengths")
    n_parties = _int(meta, "n_parties")
    sig = msg.blob("sig") if "sig" in msg.arrays else b""
    sig_lengths = _ints(meta, "sig_lengths") if "sig_lengths" in meta else [0] * len(ids)
    if (len(epk_lengths) != len(ids) or offsets.size != len(ids) + 1 or not 0 <= rank < n_parties
            or sum(epk_lengths) != len(epk) or int(offsets[-1]) != len(ct) or bool(np.any(np.diff(offsets) < 0))
            or len(sig_lengths) != len(ids) or any(n < 0 for n in sig_lengths) or sum(sig_lengths) != len(sig)):
        raise MessageError("mpc-job message has inconsistent ids, keys, ciphertext offsets or signatures")
    inputs, start, sig_start = {}, 0, 0
    for i, c in enumerate(ids):
        key = epk[start:start + epk_lengths[i]]
        start += epk_lengths[i]
        mine = ct[int(offsets[i]):int(offsets[i + 1])]
        my_sig = sig[sig_start:sig_start + sig_lengths[i]]
        sig_start += sig_lengths[i]
        inputs[c] = SealedShares(key, tuple(mine if k == rank else b"" for k in range(n_parties)),
                                 tuple(my_sig if k == rank else b"" for k in range(n_parties)))
    norm = meta.get("norm")
    check = None
    if norm is not None:
        if not isinstance(norm, dict) or not isinstance(norm.get("bound"), (int, float)):
            raise MessageError("mpc-job norm must be a mapping with a numeric bound")
        check = NormCheck(float(norm["bound"]), _int(norm, "length"), _int(norm, "chunk"), _int(norm, "chunks"),
                          _int(norm, "threshold"), _int(norm, "clip_halvings"), _int(norm, "scale_bits"))
    try:
        return AggregationJob(round_id=msg.round, vector_length=_int(meta, "vector_length"),
                              ring_bits=_int(meta, "ring_bits"), inputs=inputs, norm=check,
                              min_contributors=_int(meta, "min_contributors"))
    except ConfigError as err:
        raise MessageError(f"mpc-job message: {err}") from err


def encode_result(result: Mapping[str, Any], rank: int, round_id: int) -> wire.Message:
    if "abort" in result:
        return _message("mpc-result", round_id=round_id, sender=rank, meta={"abort": str(result["abort"])})
    return _message("mpc-result", round_id=round_id, sender=rank, meta={
        "contributors": [int(c) for c in result["contributors"]], "excluded": [int(c) for c in result["excluded"]],
        "invalid": [int(c) for c in result["invalid"]],
        "seconds": {k: float(v) for k, v in result["seconds"].items()},
    }, arrays={"ring_sum": np.asarray(result["ring_sum"], dtype=np.uint64)})


def decode_result(msg: wire.Message) -> dict[str, Any]:
    if msg.kind == "mpc-error":
        raise ProtocolAbort(f"MPC party {msg.sender}: {msg.meta.get('reason')}", round_id=msg.round)
    if msg.kind != "mpc-result":
        raise MessageError(f"expected an mpc-result message, got {msg.kind!r}")
    if "abort" in msg.meta:
        return {"abort": str(msg.meta["abort"])}
    seconds = msg.meta.get("seconds")
    return {"ring_sum": msg.array("ring_sum", "<u8"), "contributors": _ints(msg.meta, "contributors"),
            "excluded": _ints(msg.meta, "excluded"), "invalid": _ints(msg.meta, "invalid"),
            "seconds": dict(seconds) if isinstance(seconds, dict) else {}}


# -- the party program -------------------------------------------------------------------------------------
def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 hosts in brackets) -> ``(host, port)``; :class:`ConfigError` otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def connect(address: tuple[str, int], key: bytes, *, deadline_s: float, timeout_s: float) -> ControlChannel:
    """Connect to the coordinator, retrying until ``deadline_s`` seconds have passed."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            sock = socket.create_connection(address, timeout=min(5.0, timeout_s))
            return ControlChannel(sock, key, initiator=True, timeout_s=timeout_s)
        except KeyConfirmationError:
            raise
        except (OSError, ChannelError) as err:  # not up yet, or a handshake cut short: try again
            if time.monotonic() >= deadline:
                raise ChannelError(f"could not reach the coordinator at {address[0]}:{address[1]}: {err}") from err
            time.sleep(0.2)


def serve_party(rank: int, n_parties: int, rendezvous: tuple[str, int], coordinator: tuple[str, int],
                control_key: bytes, *, norm_check: bool = False, timeout_s: float = 60.0,
                startup_timeout_s: float = 300.0, interface: str | None = None, roster: Roster | None = None,
                private_key: Any = None) -> None:
    """Run one compute party until the coordinator says close (or the channel fails).

    ``private_key``: the party's long-term X25519 key (:func:`read_party_key`), whose public half the
    clients pin (:mod:`fedguard.secagg.mpc.pin`); without it the party draws a fresh key, which only a
    client that takes the keys from the coordinator's own parties can use.

    With a ``roster`` (the deployment's client identities, ``--roster`` on the command line) the party does
    what :class:`~fedguard.secagg.mpc.parties.CryptenParties` parties do: a share counts only with its
    client's Ed25519 signature for this party, deployment and round (an unsigned, forged, replayed or
    non-rostered share is invalid, so a coordinator cannot make up clients), and a second job for a round
    this party has served is refused (a replay beside a fake input). Without one it trusts the coordinator
    to relay only real clients' shares (honest-but-curious)."""
    from fedguard.secagg.mpc.crypten_rng import describe_generators
    from fedguard.secagg.mpc.parties import _party_aggregate, _prepare_process
    from fedguard.secagg.mpc.sharing import new_party_key, public_key_bytes

    # CrypTen's world is the K parties; the dealer joins as rank K (crypten adds it to the rendezvous)
    crypten = _prepare_process(rank, n_parties, rendezvous[1], timeout_s, norm_check, host=rendezvous[0],
                               interface=interface)
    private = private_key if private_key is not None else new_party_key()
    served: set[int] = set()  # rounds this party has served (a second job for one is refused with a roster)
    crypten.init()
    channel = connect(coordinator, control_key, deadline_s=startup_timeout_s, timeout_s=timeout_s)
    channel.send(_message("mpc-ready", sender=rank, meta={
        "rank": rank, "n_parties": n_parties, "norm_check": norm_check,
        "generators": describe_generators(crypten)}, arrays={"public_key": wire.bytes_array(public_key_bytes(private))}))
    try:
        while True:
            msg = channel.recv(timeout_s=IDLE_TIMEOUT_S)  # a party waits idle between rounds
            if msg.kind == "mpc-close":
                break
            try:
                job = decode_job(msg, rank)
                result = _party_aggregate(crypten, rank, n_parties, private, job, roster, served)
            except Exception as err:  # noqa: BLE001 - reported, then this party stops (the round aborts)
                channel.send(_message("mpc-error", round_id=msg.round, sender=rank,
                                      meta={"reason": f"{type(err).__name__}: {str(err)[:300]}"}))
                raise
            channel.send(encode_result(result, rank, msg.round))
    finally:
        channel.close()
    crypten.uninit()


def serve_dealer(n_parties: int, rendezvous: tuple[str, int], *, timeout_s: float = 60.0,
                 interface: str | None = None) -> None:
    """Run CrypTen's dealer (rank ``n_parties``) for parties started with ``--norm-check``."""
    from fedguard.secagg.mpc.parties import _dealer_main

    _dealer_main(n_parties, rendezvous[1], timeout_s, host=rendezvous[0], interface=interface)


# -- the coordinator side ----------------------------------------------------------------------------------
class NetworkParties(ComputeParties):
    """``n_parties`` compute parties running :func:`serve_party` on their own hosts.

    :meth:`start` listens on ``listen`` and waits (up to ``startup_timeout_s``) until every rank has
    connected with the control key; a peer that fails the handshake is dropped and the wait goes on.
    Failure semantics match :class:`~fedguard.secagg.mpc.parties.CryptenParties`: a party that errs, closes
    its connection or does not answer within ``timeout_s`` makes :meth:`aggregate` raise
    :class:`ProtocolAbort`, and the coordinator then closes every connection (the parties stop).
    """

    def __init__(self, n_parties: int, *, listen: tuple[str, int], control_key: bytes, norm_check: bool = False,
                 timeout_s: float = 60.0, startup_timeout_s: float = 300.0) -> None:
        problems = [p for p in (
            int_problem("n_parties (CrypTen parties)", n_parties, low=2, high=3),
            number_problem("timeout_s", timeout_s, low=0.0, low_open=True),
            number_problem("startup_timeout_s", startup_timeout_s, low=0.0, low_open=True),
        ) if p]
        if not isinstance(control_key, bytes) or len(control_key) != CONTROL_KEY_BYTES:
            problems.append(f"control_key must be {CONTROL_KEY_BYTES} bytes")
        if problems:
            raise ConfigError.collect(problems)
        self.n_parties = n_parties
        self.listen = listen
        self.norm_check = bool(norm_check)
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self._key = control_key
        self._channels: dict[int, ControlChannel] = {}
        self._public: dict[int, bytes] = {}
        self._generators: dict[int, dict[str, str]] = {}
        self._state = "new"
        self._server: socket.socket | None = None
        self.address: tuple[str, int] | None = None

    def bind(self) -> tuple[str, int]:
        """Open the listening socket (so that parties can be pointed at it, e.g. port 0 -> a free port)."""
        if self._server is None or self.address is None:
            family = socket.AF_INET6 if ":" in self.listen[0] else socket.AF_INET
            server = socket.create_server(self.listen, family=family, reuse_port=False)
            server.listen(self.n_parties * 4)
            self._server = server
            host, port = server.getsockname()[:2]
            self.address = (str(host), int(port))
        return self.address

    def start(self) -> NetworkParties:
        """Wait until every rank has connected. Each connection's handshake and announcement run in a
        thread of their own with a deadline of ``HANDSHAKE_TIMEOUT_S``, so a slow or hostile peer cannot
        hold up the parties behind it; refused peers are listed if the wait times out."""
        if self._state != "new":
            raise ConfigError(f"these parties are already {self._state}")
        self.bind()
        server = self._server
        if server is None:
            raise ConfigError("no listening socket")
        deadline = time.monotonic() + self.startup_timeout_s
        arrivals: queue.Queue[tuple[str, ControlChannel | None, wire.Message | None, str]] = queue.Queue()
        refused: list[str] = []
        try:
            while len(self._channels) < self.n_parties:
                while not arrivals.empty():
                    peer, channel, msg, error = arrivals.get()
                    if channel is None or msg is None:
                        refused.append(f"{peer}: {error}")
                        continue
                    try:
                        self._admit(channel, msg)
                    except (ChannelError, MessageError, ConfigError) as err:
                        channel.close()
                        refused.append(f"{peer}: {err}")
                if len(self._channels) == self.n_parties:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(self.n_parties)) - set(self._channels))
                    raise ProtocolAbort(f"MPC parties {missing} did not connect within {self.startup_timeout_s:g} s"
                                        + (f" (refused: {'; '.join(refused[-3:])})" if refused else ""))
                server.settimeout(min(remaining, 0.2))
                try:
                    sock, address = server.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=self._handshake, args=(sock, f"{address[0]}:{address[1]}", arrivals),
                                 daemon=True).start()
        except BaseException:
            self._abort()
            raise
        self._state = "running"
        return self

    def _handshake(self, sock: socket.socket, peer: str, arrivals: queue.Queue[Any]) -> None:
        """Key confirmation and the party's announcement, within ``HANDSHAKE_TIMEOUT_S`` (in a thread)."""
        try:
            channel = ControlChannel(sock, self._key, initiator=False, timeout_s=min(self.timeout_s, HANDSHAKE_TIMEOUT_S))
            msg = channel.recv(timeout_s=HANDSHAKE_TIMEOUT_S)
        except (ChannelError, MessageError) as err:
            arrivals.put((peer, None, None, str(err)))
            return
        arrivals.put((peer, channel, msg, ""))

    def _admit(self, channel: ControlChannel, msg: wire.Message) -> None:
        meta = msg.meta
        raw_rank = meta.get("rank")
        problem = None
        if msg.kind != "mpc-ready" or not is_int(raw_rank):
            channel.close()
            raise ConfigError("expected an mpc-ready message with an int rank")
        rank = int(cast(int, raw_rank))
        if not 0 <= rank < self.n_parties or rank in self._channels:
            problem = f"rank {rank} is out of range or already connected"
        elif meta.get("n_parties") != self.n_parties or meta.get("norm_check") is not self.norm_check:
            problem = (f"the party was started for {meta.get('n_parties')} parties, norm_check="
                       f"{meta.get('norm_check')}; expected {self.n_parties}, {self.norm_check}")
        key = msg.blob("public_key") if "public_key" in msg.arrays else b""
        if problem is None and len(key) != 32:
            problem = "the party's public key must be 32 bytes"
        if problem is not None:
            channel.close()
            raise ConfigError(problem)
        self._channels[rank] = channel
        self._public[rank] = key
        generators = meta.get("generators")
        self._generators[rank] = {str(k): str(v) for k, v in generators.items()} if isinstance(generators, dict) else {}

    @property
    def public_keys(self) -> tuple[bytes, ...]:
        if self._state != "running":
            raise ConfigError(f"the parties are {self._state}: start them first")
        return tuple(self._public[r] for r in range(self.n_parties))

    @property
    def supports_norm_check(self) -> bool:
        return self.norm_check

    @property
    def generators(self) -> tuple[dict[str, str], ...]:
        """What each party reported its CrypTen randomness runs on (rank order)."""
        return tuple(dict(self._generators.get(r, {})) for r in range(self.n_parties))

    def aggregate(self, job: AggregationJob) -> PartiesResult:
        require_running(self._state, job, self.norm_check, "start the parties with --norm-check")
        try:
            for rank, channel in self._channels.items():
                channel.send(encode_job(job, rank))
            results = self._collect(job.round_id, time.monotonic() + self.timeout_s + min(2.0, self.timeout_s / 2))
        except (ChannelError, MessageError) as err:
            self._abort()
            raise ProtocolAbort(f"lost the MPC compute parties in round {job.round_id}: {err}; aborted, nothing "
                                "revealed", round_id=job.round_id) from err
        except ProtocolAbort:
            self._abort()
            raise
        return agreed_result(results, job, on_disagreement=self._abort)

    def _collect(self, round_id: int, deadline: float) -> dict[int, dict[str, Any]]:
        pending = {ch.fileno(): (rank, ch) for rank, ch in self._channels.items()}
        out: dict[int, dict[str, Any]] = {}
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProtocolAbort(f"MPC party(ies) {sorted(r for r, _ in pending.values())} did not answer "
                                    f"round {round_id} within the timeout: aborted, nothing revealed", round_id=round_id)
            ready, _, _ = select.select(list(pending), [], [], remaining)
            for fd in ready:
                rank, channel = pending.pop(fd)
                msg = channel.recv(timeout_s=max(remaining, 1.0))
                if msg.round != round_id or msg.sender != rank:
                    raise MessageError(f"party {rank} answered for round {msg.round} as {msg.sender}")
                out[rank] = decode_result(msg)
        return out

    def _abort(self) -> None:
        self._state = "aborted"
        for channel in self._channels.values():
            channel.close()
        if self._server is not None:
            self._server.close()
            self._server = None

    def close(self) -> None:
        """Tell every party to stop, then close the connections."""
        if self._state == "running":
            for rank, channel in self._channels.items():
                try:
                    channel.send(_message("mpc-close", recipient=rank))
                except ChannelError:
                    pass
            self._state = "closed"
        for channel in self._channels.values():
            channel.close()
        if self._server is not None:
            self._server.close()
            self._server = None

    def __enter__(self) -> NetworkParties:
        if self._state == "new":
            self.start()
        return self


# -- command line ------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedguard.secagg.mpc.network",
                                     description="Run an MPC compute party (or CrypTen's dealer) on this host.")
    sub = parser.add_subparsers(dest="command", required=True)
    keygen = sub.add_parser("keygen", help="write a fresh control key (mode 0600)")
    keygen.add_argument("--out", required=True)
    party_keygen = sub.add_parser("party-keygen", help="write a party's long-term private key (mode 0600) and "
                                                       "print its public key (hex), which the clients pin")
    party_keygen.add_argument("--out", required=True)
    pin = sub.add_parser("pin", help="write the party-keys file the clients pin (aggregator_options."
                                     "party_keys_file) from the parties' public keys, in rank order")
    pin.add_argument("--out", required=True)
    pin.add_argument("public_keys", nargs="+", help="each party's public key (64 hex digits), rank 0 first")
    for name in ("party", "dealer"):
        p = sub.add_parser(name, help=f"run a compute {name}")
        p.add_argument("--parties", type=int, required=True, help="number of compute parties K (2 or 3)")
        p.add_argument("--rendezvous", required=True, help="HOST:PORT of the gloo rendezvous (party 0's host)")
        p.add_argument("--timeout", type=float, default=60.0, help="seconds a round may take")
        p.add_argument("--interface", default=None, help="network interface gloo uses (default: automatic)")
        if name == "party":
            p.add_argument("--rank", type=int, required=True)
            p.add_argument("--coordinator", required=True, help="HOST:PORT the server listens on")
            p.add_argument("--control-key", required=True, help="the 32-byte control key file (mode 0600)")
            p.add_argument("--norm-check", action="store_true", help="a dealer serves the norm check")
            p.add_argument("--roster", default=None,
                           help="the deployment's client roster (`fedguard roster add`): accept only shares "
                                "signed by rostered clients, and serve each round once")
            p.add_argument("--key-file", default=None,
                           help="this party's long-term private key (party-keygen), whose public key the clients "
                                "pin; default: a fresh key per start, which clients cannot pin")
            p.add_argument("--startup-timeout", type=float, default=300.0,
                           help="seconds to keep trying to reach the coordinator")
    args = parser.parse_args(argv)
    if args.command == "keygen":
        print(write_control_key(args.out))
        return 0
    if args.command == "party-keygen":
        print(write_party_key(args.out).hex())
        return 0
    if args.command == "pin":
        from fedguard.secagg.mpc.pin import write_party_keys

        try:
            keys = [bytes.fromhex(k) for k in args.public_keys]
        except ValueError as err:
            raise ConfigError(f"public keys must be hex: {err}") from err
        print(write_party_keys(args.out, keys))
        return 0
    if args.command == "dealer":
        serve_dealer(args.parties, parse_address(args.rendezvous), timeout_s=args.timeout, interface=args.interface)
        return 0
    serve_party(args.rank, args.parties, parse_address(args.rendezvous), parse_address(args.coordinator),
                read_control_key(args.control_key), norm_check=args.norm_check, timeout_s=args.timeout,
                interface=args.interface, roster=Roster.load(args.roster) if args.roster else None,
                startup_timeout_s=args.startup_timeout,
                private_key=read_party_key(args.key_file) if args.key_file else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
