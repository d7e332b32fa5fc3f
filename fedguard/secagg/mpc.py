"""MPC secure aggregation: secret-shared updates across non-colluding compute parties (CrypTen).

The third secure-aggregation backend of fedguard (after pairwise masking and Paillier), in the
two-/three-server model of secure aggregation: ``K`` in {2, 3} compute parties that do not collude. It is
the backend FATE-LLM's §3 privacy layer calls for when the aggregate must be computed *without* any
single server seeing an update, and the one that can check updates, not only add them.

Protocol (one stage, ``input``):

1. The server asks each selected client for its input; the request names the parties' public keys by
   fingerprint (clients pin the keys themselves: they come from the aggregator's configuration).
2. Client ``i`` additively shares its ring vector ``x_i`` in Z_{2^64} among the parties and encrypts each
   share to its party (X25519 + HKDF + AES-GCM: :mod:`fedguard.secagg.mpc_sharing`). The server relays
   ciphertexts it cannot read.
3. The server hands the ciphertexts of every client that replied to the parties
   (:mod:`fedguard.secagg.mpc_parties`). Each party decrypts its own shares, the parties agree on which
   clients' shares authenticate at every party, add their shares locally and reveal only
   ``Σ_i x_i`` — which, because Z_{2^64} is the ring of :mod:`fedguard.encoding` (or contains it), is
   *exactly* the plaintext sum. Dropped clients are simply absent from the sum.

Weighted FedAvg comes from the encoding: ``x_i = [w_i·q_i, w_i]`` (:func:`fedguard.encoding.encode_weighted`),
so the revealed ``[Σ w_i q_i, Σ w_i]`` decodes to the weighted mean; the server never sees a weight.

**Norm bound under MPC** (``norm_bound=B``, needs ``encoding`` and parties started with the norm check).
The correlated randomness of the check (Beaver masks, comparison triples, zero-sharings) comes from
CrypTen's dealer and parties, whose generators fedguard replaces by ChaCha20 streams keyed with 256-bit
seeds from ``os.urandom`` (:mod:`fedguard.secagg.crypten_rng`; CrypTen 0.4.1 itself uses Mersenne
Twister with 64-bit seeds, which is not a cryptographic generator).
The client then shares ``[q_i, w_i]`` (unweighted), the parties check ``||q_i / s||_2 <= B`` under MPC
(:class:`~fedguard.secagg.mpc_norm.NormCheck`: Beaver squares, chunk sums and a clamped tree sum, all
exact: the decision equals the plaintext one), reveal one bit per client, and compute ``w_i·q_i`` for the
accepted clients with a Beaver multiplication (exact in Z_{2^64}). Over-bound clients are excluded; the
result names them (``AggregateResult.dropped["norm-check"]``) and reveals nothing else about them. With
``norm_action="clip"`` they are scaled into the bound instead, exactly, by a secret factor from a public
ladder (:mod:`fedguard.secagg.mpc_norm`). Because
``w_i·q_i`` is computed from the very ``q_i`` that was checked, a client cannot pass the check with one
vector and contribute another.

Threat model: the server, the parties and the dealer are honest-but-curious. An input stays hidden unless
all ``K`` parties collude (the server relays only ciphertexts); with the norm check, the dealer of Beaver
triples (CrypTen's trusted third party, which sees no share) must not collude with any party either.
Clients may drop out or send garbage (excluded as ``invalid-shares``). Not covered: malicious
parties (CrypTen 0.4.1 is semi-honest), and a malicious client that bypasses fedguard's quantiser to send
elements outside ``[-M, M]``, which can wrap the squared norm modulo 2^64 (range proofs per element would
cost an MPC comparison per coordinate). See ``docs/secagg-mpc.md``.

>>> from fedguard.federation.transport import InProcessTransport
>>> from fedguard.rng import SecureRNG
>>> agg = MpcAggregator(n_parties=3)  # simulated parties: see InProcessParties
>>> spec = RoundSpec(0, (1, 2, 3), vector_length=4)
>>> rng = SecureRNG.for_testing("doctest")
>>> xs = {c: rng.ring_elements(4, 64) for c in spec.participants}
>>> out = InProcessTransport().run(agg.server(spec), {c: agg.client(spec, c, xs[c]) for c in xs})
>>> bool((out.result.ring_sum == xs[1] + xs[2] + xs[3]).all())
True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import numpy as np

from fedguard.encoding import FixedPointSpec, coerce_fixed_point, from_ring, to_ring
from fedguard.errors import ConfigError, InvalidUpdateError, ProtocolViolation
from fedguard.federation.protocol import (
    AggregateResult,
    Aggregator,
    ClientSide,
    Outbox,
    RoundSpec,
    ServerSide,
    check_ring_vector,
)
from fedguard.federation.registry import register_aggregator
from fedguard.rng import SecureRNG
from fedguard.secagg.mpc_norm import NormCheck
from fedguard.secagg.mpc_parties import AggregationJob, ComputeParties, CryptenParties, InProcessParties
from fedguard.secagg.mpc_sharing import KEY_BYTES, SealedShares, keys_fingerprint, seal
from fedguard.wire import Message, MessageSchema, bytes_array

__all__ = ["MpcAggregator", "CryptenParties", "InProcessParties", "NormCheck"]

_INPUT = "input"
_REQUEST = MessageSchema(
    kind="mpc/request", meta={"vector_length": int, "ring_bits": int, "parties": str, "norm_check": bool}
)
NORM_CHECK_DROPPED = "norm-check"
"""Key of :attr:`AggregateResult.dropped` listing the clients excluded by the norm bound."""
INVALID_DROPPED = "invalid-shares"
"""Key of :attr:`AggregateResult.dropped` listing clients whose shares did not authenticate at every party."""

Backend = Literal["in-process", "crypten", "network"]


def _reply_schema(n_parties: int) -> MessageSchema:
    arrays = {"epk": ("|u1", 1)} | {f"ct{k}": ("|u1", 1) for k in range(n_parties)}
    return MessageSchema(kind="mpc/input", arrays=arrays)


def unweighted_input(ring_input: np.ndarray, spec: FixedPointSpec, ring_bits: int) -> np.ndarray:
    """From a ring input ``[w·q mod 2^k, w]`` to the norm check's input ``[q, w]`` in Z_{2^64}.

    Raises :class:`InvalidUpdateError` when the vector is not of that form (weight outside
    ``[1, max_weight]``, a slot not divisible by ``w``, or ``|q_j| > M``).
    """
    w = int(ring_input[-1])
    if not 1 <= w <= spec.max_weight:
        raise InvalidUpdateError(f"the weight slot must be in [1, max_weight={spec.max_weight}], got {w}")
    signed = from_ring(ring_input[:-1], ring_bits)
    q, rem = np.divmod(signed, np.int64(w))
    if rem.any():
        bad = int(np.flatnonzero(rem)[0])
        raise InvalidUpdateError(f"slot {bad} ({int(signed[bad])}) is not a multiple of the weight {w}")
    if q.size and int(np.abs(q).max()) > spec.max_int:
        bad = int(np.argmax(np.abs(q)))
        raise InvalidUpdateError(f"quantised value {int(q[bad])} at index {bad} exceeds M={spec.max_int}")
    out = np.empty(ring_input.size, dtype=np.uint64)
    out[:-1] = to_ring(q, 64)
    out[-1] = np.uint64(w)
    return out


class _MpcServer(ServerSide):
    stages = (_INPUT,)

    def __init__(self, spec: RoundSpec, threshold: int, parties: ComputeParties, norm: NormCheck | None) -> None:
        super().__init__(spec, threshold)
        self._parties = parties
        self._norm = norm
        self._reply = _reply_schema(parties.n_parties)
        self.excluded: tuple[int, ...] = ()
        self.invalid: tuple[int, ...] = ()
        self.party_seconds: dict[str, float] = {}

    def _open(self) -> Outbox:
        meta = {"vector_length": self.spec.vector_length, "ring_bits": self.spec.ring_bits,
                "parties": keys_fingerprint(self._parties.public_keys), "norm_check": self._norm is not None}
        return {c: self._message(_INPUT, c, kind=_REQUEST.kind, meta=meta) for c in self.spec.participants}

    def _schema(self, stage: str) -> MessageSchema:
        return self._reply

    def _check_reply(self, stage: str, msg: Message) -> None:
        # the server cannot read shares; it checks only the framing (the parties authenticate the rest)
        if msg.arrays["epk"].size != KEY_BYTES:
            raise ProtocolViolation(f"client {msg.sender}'s ephemeral key must be {KEY_BYTES} bytes",
                                    sender=msg.sender, round_id=self.spec.round_id, stage=stage)

    def _close(self, stage: str, replies: dict[int, Message]) -> AggregateResult:
        inputs = {
            c: SealedShares(m.blob("epk"), tuple(m.blob(f"ct{k}") for k in range(self._parties.n_parties)))
            for c, m in replies.items()
        }
        job = AggregationJob(self.spec.round_id, self.spec.vector_length, self.spec.ring_bits, inputs,
                             self._norm, min_contributors=self.threshold)
        out = self._parties.aggregate(job)
        self.excluded, self.invalid, self.party_seconds = out.excluded, out.invalid, dict(out.seconds)
        if out.excluded:
            self._dropped[NORM_CHECK_DROPPED] = out.excluded
        if out.invalid:
            self._dropped[INVALID_DROPPED] = out.invalid
        return self._result(out.ring_sum, set(out.contributors))


class _MpcClient(ClientSide):
    stages = (_INPUT,)

    def __init__(self, spec: RoundSpec, client_id: int, ring_input: np.ndarray, party_keys: tuple[bytes, ...],
                 encoding: FixedPointSpec | None, rng: SecureRNG) -> None:
        super().__init__(spec, client_id)
        x = check_ring_vector(ring_input, spec, f"ring input of client {client_id}", error=InvalidUpdateError)
        self._norm_check = encoding is not None
        self._x = unweighted_input(x, encoding, spec.ring_bits) if encoding is not None else x.copy()
        self._keys = party_keys
        self._fingerprint = keys_fingerprint(party_keys)
        self._rng = rng

    def _respond(self, stage: str, msg: Message) -> bytes:
        _REQUEST.validate(msg)
        problem = None
        if msg.meta["parties"] != self._fingerprint:
            problem = "the server names other compute parties than the ones this client trusts"
        elif msg.meta["norm_check"] != self._norm_check:
            problem = (f"the server asks for norm_check={msg.meta['norm_check']}, this client is configured "
                       f"with {self._norm_check}")
        elif msg.meta["vector_length"] != self.spec.vector_length or msg.meta["ring_bits"] != self.spec.ring_bits:
            problem = "the server's round parameters differ from this client's"
        if problem is not None:
            raise ProtocolViolation(problem, sender=msg.sender, round_id=self.spec.round_id, stage=stage)
        sealed = seal(self._x, self._keys, round_id=self.spec.round_id, client_id=self.client_id, rng=self._rng)
        arrays = {"epk": bytes_array(sealed.ephemeral_key)}
        arrays |= {f"ct{k}": bytes_array(ct) for k, ct in enumerate(sealed.ciphertexts)}
        return self._reply(kind="mpc/input", arrays=arrays)


class MpcAggregator(Aggregator):
    """Secure aggregation by additive secret sharing over ``K`` non-colluding compute parties.

    Args:
        parties: the compute parties; by default built from ``backend``.
        backend: ``"in-process"`` (simulated parties, no CrypTen: tests and simulations), ``"crypten"``
            (:class:`CryptenParties` processes on this machine, owned by this aggregator; call :meth:`close`)
            or ``"network"`` (parties on other hosts running :mod:`fedguard.secagg.mpc_network`'s party
            program; the aggregator listens on ``listen`` and waits for them).
        n_parties: ``K`` when the parties are built here (2 or 3 for CrypTen).
        min_clients: the fewest clients whose inputs the parties will reveal a sum of (default 2). A "sum"
            over one client *is* that client's update, so values below 2 are refused with
            :class:`ConfigError` unless ``allow_single_client=True`` says the caller accepts that.
        allow_single_client: the explicit opt-in for ``min_clients=1`` (e.g. a simulation with one client);
            with it a round in which only one client's shares survive reveals that client's update.
        norm_bound: ``B``, the largest accepted L2 norm of a client's (dequantised, unweighted) update;
            ``None`` switches the check off. Needs ``encoding`` and MPC parties with the norm check.
        norm_action: what happens to an over-bound update: ``"exclude"`` (default) leaves it out of the
            sum; ``"clip"`` scales it into the bound under MPC (a factor from a public ladder, at most one
            ladder step, <= 5.3%, below the exact clip; :mod:`fedguard.secagg.mpc_norm`) and excludes only
            updates more than ``2^clip_halvings`` times over the bound.
        clip_halvings: ``H`` for ``norm_action="clip"`` (default 4: updates up to 16x the bound are clipped).
        encoding: the :class:`FixedPointSpec` clients encode with (to read ``q`` and ``s``).
        timeout_s: per-round timeout of CrypTen parties built here.
        startup_timeout_s: how long parties built here may take to start (``"crypten"``) or to connect
            (``"network"``).
        listen: ``"HOST:PORT"`` the coordinator listens on (``backend="network"``).
        control_key_file: the 32-byte control key file shared with the parties (``backend="network"``).
    """

    name: ClassVar[str] = "mpc"
    stages: ClassVar[tuple[str, ...]] = (_INPUT,)
    input_stage: ClassVar[str] = _INPUT

    def __init__(
        self,
        *,
        parties: ComputeParties | None = None,
        backend: Backend = "in-process",
        n_parties: int = 3,
        min_clients: int = 2,
        allow_single_client: bool = False,
        norm_bound: float | None = None,
        norm_action: str = "exclude",
        clip_halvings: int = 4,
        encoding: FixedPointSpec | Mapping[str, Any] | None = None,
        timeout_s: float = 30.0,
        startup_timeout_s: float = 300.0,
        listen: str | None = None,
        control_key_file: str | None = None,
    ) -> None:
        problems = []
        if isinstance(min_clients, bool) or not isinstance(min_clients, int) or min_clients < 1:
            problems.append(f"min_clients must be an int >= 1, got {min_clients!r}")
        elif min_clients < 2 and allow_single_client is not True:
            problems.append(
                f"min_clients={min_clients} lets the parties reveal a lone client's update (a sum over one client "
                "is that client's input): use min_clients >= 2, or pass allow_single_client=True to accept that"
            )
        if not isinstance(allow_single_client, bool):
            problems.append(f"allow_single_client must be a bool, got {allow_single_client!r}")
        if backend not in ("in-process", "crypten", "network"):
            problems.append(f"backend must be 'in-process', 'crypten' or 'network', got {backend!r}")
        if backend == "network" and parties is None and (listen is None or control_key_file is None):
            problems.append("backend='network' needs listen='HOST:PORT' and control_key_file")
        if backend != "network" and (listen is not None or control_key_file is not None):
            problems.append("listen and control_key_file apply to backend='network' only")
        encoding_given = encoding is not None
        encoding = coerce_fixed_point(encoding, "encoding", problems)
        if norm_bound is not None:
            if not (isinstance(norm_bound, (int, float)) and not isinstance(norm_bound, bool)
                    and np.isfinite(norm_bound) and norm_bound > 0):
                problems.append(f"norm_bound must be a finite float > 0, got {norm_bound!r}")
            if not encoding_given:
                problems.append("norm_bound needs encoding (the FixedPointSpec the clients quantise with)")
        if norm_action not in ("exclude", "clip"):
            problems.append(f"norm_action must be 'exclude' or 'clip', got {norm_action!r}")
        elif norm_action == "clip" and norm_bound is None:
            problems.append("norm_action='clip' needs norm_bound")
        elif norm_action == "clip" and (isinstance(clip_halvings, bool) or not isinstance(clip_halvings, int)
                                        or clip_halvings < 1):
            problems.append(f"norm_action='clip' needs clip_halvings >= 1, got {clip_halvings!r}")
        if parties is not None and norm_bound is not None and not parties.supports_norm_check:
            problems.append("norm_bound needs compute parties that run the norm check under MPC "
                            "(CryptenParties(norm_check=True))")
        if backend == "in-process" and parties is None and norm_bound is not None:
            problems.append("norm_bound runs under MPC: use backend='crypten' (in-process parties only add shares)")
        if problems:
            raise ConfigError.collect(problems)
        self.clip_halvings = clip_halvings if norm_action == "clip" else 0
        if norm_bound is not None and isinstance(encoding, FixedPointSpec):
            # a bound too large for the exact check (or a clip ladder without headroom) fails here
            NormCheck.for_bound(norm_bound, encoding, 1, clip_halvings=self.clip_halvings)
        self.norm_action = norm_action
        self.min_clients = min_clients
        self.norm_bound = float(norm_bound) if norm_bound is not None else None
        self.encoding = encoding if norm_bound is not None else None
        self._owned = parties is None
        if parties is None:
            if backend == "crypten":
                parties = CryptenParties(n_parties, norm_check=norm_bound is not None, timeout_s=timeout_s,
                                         startup_timeout_s=startup_timeout_s).start()
            elif backend == "network":
                from fedguard.secagg.mpc_network import NetworkParties, parse_address, read_control_key

                parties = NetworkParties(n_parties, listen=parse_address(str(listen)),
                                         control_key=read_control_key(str(control_key_file)),
                                         norm_check=norm_bound is not None, timeout_s=timeout_s,
                                         startup_timeout_s=startup_timeout_s).start()
            else:
                parties = InProcessParties(n_parties)
        self.parties = parties

    def threshold(self, n_clients: int) -> int:
        return min(self.min_clients, n_clients)

    def _norm(self, spec: RoundSpec) -> NormCheck | None:
        if self.norm_bound is None or self.encoding is None:
            return None
        if spec.vector_length < 2:
            raise ConfigError("the norm check needs vector_length >= 2 (update + weight slot)")
        return NormCheck.for_bound(self.norm_bound, self.encoding, spec.vector_length - 1,
                                   clip_halvings=self.clip_halvings, n_clients=spec.n_clients)

    def server(self, spec: RoundSpec, *, rng: SecureRNG | None = None) -> ServerSide:
        if self.min_clients > spec.n_clients:
            raise ConfigError(f"min_clients={self.min_clients} exceeds the {spec.n_clients} participants")
        if self.encoding is not None and self.encoding.ring_bits != spec.ring_bits:
            raise ConfigError(f"encoding.ring_bits={self.encoding.ring_bits} differs from the round's {spec.ring_bits}")
        return _MpcServer(spec, self.threshold(spec.n_clients), self.parties, self._norm(spec))

    def client(
        self, spec: RoundSpec, client_id: int, ring_input: np.ndarray, *, rng: SecureRNG | None = None
    ) -> ClientSide:
        return _MpcClient(spec, client_id, ring_input, self.parties.public_keys, self.encoding,
                          rng if rng is not None else SecureRNG())

    def close(self) -> None:
        """Stop the compute parties this aggregator started (parties passed in are the caller's)."""
        if self._owned:
            self.parties.close()

    def __enter__(self) -> MpcAggregator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


register_aggregator("mpc", MpcAggregator)
