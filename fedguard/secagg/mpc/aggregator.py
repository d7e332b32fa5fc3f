"""MPC secure aggregation: secret-shared updates across non-colluding compute parties (CrypTen).

The third secure-aggregation backend of fedguard (after pairwise masking and Paillier), in the
two-/three-server model of secure aggregation: ``K`` in {2, 3} compute parties that do not collude. It is
the backend FATE-LLM's §3 privacy layer calls for when the aggregate must be computed *without* any
single server seeing an update, and the one that can check updates, not only add them.

Protocol (one stage, ``input``):

1. The server asks each selected client for its input; the request names the parties' public keys by
   fingerprint (clients pin the keys themselves: from the parties the aggregator started in this process,
   or, for a client that starts none, from the party-keys file ``party_keys_file``,
   :mod:`fedguard.secagg.mpc.pin`; a request naming other keys is refused).
2. Client ``i`` additively shares its ring vector ``x_i`` in the round's ring Z_{2^k} (party 0's share
   travels in the ring's word: k/8 bytes per value) among the parties and encrypts each share to its party (X25519 + HKDF + AES-GCM: :mod:`fedguard.secagg.mpc.sharing`). The server relays
   ciphertexts it cannot read.
3. The server hands the ciphertexts of every client that replied to the parties
   (:mod:`fedguard.secagg.mpc.parties`). Each party decrypts its own shares, the parties agree on which
   clients' shares authenticate at every party, add their shares locally and reveal only
   ``Σ_i x_i`` mod 2^k — *exactly* the plaintext sum (the parties add in Z_{2^64}, which 2^k divides).
   Dropped clients are simply absent from the sum.

Weighted FedAvg comes from the encoding: ``x_i = [w_i·q_i, w_i]`` (:func:`fedguard.encoding.encode_weighted`),
so the revealed ``[Σ w_i q_i, Σ w_i]`` decodes to the weighted mean; the server never sees a weight.

**Norm bound under MPC** (``norm_bound=B``; needs the round's fixed-point spec, ``RoundSpec.fixed_point``,
and parties started with the norm check).
The correlated randomness of the check (Beaver masks, comparison triples, zero-sharings) comes from
CrypTen's dealer and parties, whose generators fedguard replaces by ChaCha20 streams keyed with 256-bit
seeds from ``os.urandom`` (:mod:`fedguard.secagg.mpc.crypten_rng`; CrypTen 0.4.1 itself uses Mersenne
Twister with 64-bit seeds, which is not a cryptographic generator).
The client then shares ``[q_i, w_i]`` (unweighted), the parties check ``||q_i / s||_2 <= B`` under MPC
(:class:`~fedguard.secagg.mpc.norm.NormCheck`: Beaver squares, chunk sums and a clamped tree sum, all
exact: the decision equals the plaintext one), reveal one bit per client, and compute ``w_i·q_i`` for the
accepted clients with a Beaver multiplication (exact in Z_{2^64}). Over-bound clients are excluded; the
result names them (``AggregateResult.dropped["norm-check"]``) and reveals nothing else about them. With
``norm_action="clip"`` they are scaled into the bound instead, exactly, by a secret factor from a public
ladder (:mod:`fedguard.secagg.mpc.norm`). Because
``w_i·q_i`` is computed from the very ``q_i`` that was checked, a client cannot pass the check with one
vector and contribute another.

Threat model: the server, the parties and the dealer are honest-but-curious. An input stays hidden unless
all ``K`` parties collude (the server relays only ciphertexts); with the norm check, the dealer of Beaver
triples (CrypTen's trusted third party, which sees no share) must not collude with any party either.
Clients may drop out or send garbage (excluded as ``invalid-shares``). Not covered: malicious
parties (CrypTen 0.4.1 is semi-honest), and a malicious client that bypasses fedguard's quantiser to send
elements outside ``[-M, M]``, which can wrap the squared norm modulo 2^64 (range proofs per element would
cost an MPC comparison per coordinate). See ``docs/secagg-mpc.md``.

Parties: by default (``backend="crypten"``) the aggregator starts ``K`` CrypTen party processes on this
machine and owns them (``close()`` or ``with`` stops them); ``backend="network"`` waits for party programs
on other machines; ``backend="simulated"`` keeps every party in this process — it protects nothing
against that process, exists for tests and simulations, and says so in :attr:`MpcAggregator.label`.

>>> from fedguard.federation.transport import InProcessTransport
>>> from fedguard.rng import SecureRNG
>>> agg = MpcAggregator(backend="simulated")  # every party in this process: see SimulatedParties
>>> agg.label
'mpc (simulated parties: no protection)'
>>> spec = RoundSpec(0, (1, 2, 3), vector_length=4)
>>> rng = SecureRNG.for_testing("doctest")
>>> xs = {c: rng.ring_elements(4, 64) for c in spec.participants}
>>> out = InProcessTransport().run(agg.server(spec), {c: agg.client(spec, c, xs[c]) for c in xs})
>>> bool((out.result.ring_sum == xs[1] + xs[2] + xs[3]).all())
True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from fedguard.encoding import FixedPointSpec, from_ring, to_ring
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
from fedguard.identity import Identity, Roster
from fedguard.rng import SecureRNG
from fedguard.secagg.identity_files import load_client_identity
from fedguard.secagg.mpc.norm import NormCheck
from fedguard.secagg.mpc.options import MpcOptions
from fedguard.secagg.mpc.parties import (
    AggregationJob,
    ComputeParties,
    CryptenParties,
    PinnedParties,
    SimulatedParties,
    check_pinned,
)
from fedguard.secagg.mpc.sharing import (
    KEY_BYTES,
    PURPOSE_SHARE_SIGNATURE,
    SealedShares,
    keys_fingerprint,
    seal,
    share_signature_body,
)
from fedguard.wire import Message, MessageSchema, bytes_array

__all__ = ["INVALID_DROPPED", "NORM_CHECK_DROPPED", "CryptenParties", "MpcAggregator", "MpcOptions", "NormCheck",
           "SimulatedParties", "unweighted_input"]

_INPUT = "input"
_REQUEST = MessageSchema(
    kind="mpc/request", meta={"vector_length": int, "ring_bits": int, "parties": str, "norm_check": bool}
)
NORM_CHECK_DROPPED = "norm-check"
"""Key of :attr:`AggregateResult.dropped` listing the clients excluded by the norm bound."""
INVALID_DROPPED = "invalid-shares"
"""Key of :attr:`AggregateResult.dropped` listing clients whose shares did not authenticate at every party."""

def _reply_schema(n_parties: int) -> MessageSchema:
    arrays = ({"epk": ("|u1", 1)} | {f"ct{k}": ("|u1", 1) for k in range(n_parties)}
              | {f"sig{k}": ("|u1", 1) for k in range(n_parties)})  # empty without an identity
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
            c: SealedShares(m.blob("epk"), tuple(m.blob(f"ct{k}") for k in range(self._parties.n_parties)),
                            tuple(m.blob(f"sig{k}") for k in range(self._parties.n_parties)))
            for c, m in replies.items()
        }
        job = AggregationJob(self.spec.round_id, self.spec.vector_length, self.spec.ring_bits, inputs,
                             self._norm,
                             min_contributors=max(self.threshold, self.spec.min_contributors))
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
                 encoding: FixedPointSpec | None, rng: SecureRNG, identity: Identity | None = None,
                 deployment: str = "") -> None:
        super().__init__(spec, client_id)
        self._identity, self._deployment = identity, deployment
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
        # shares in the round's ring (party 0's in its word: k/8 bytes per value), Z_{2^64} for the norm check
        share_bits = 64 if self._norm_check else self.spec.ring_bits
        sealed = seal(self._x, self._keys, round_id=self.spec.round_id, client_id=self.client_id, rng=self._rng,
                      ring_bits=share_bits)
        arrays = {"epk": bytes_array(sealed.ephemeral_key)}
        arrays |= {f"ct{k}": bytes_array(ct) for k, ct in enumerate(sealed.ciphertexts)}
        for k, ct in enumerate(sealed.ciphertexts):  # signed per party, bound to deployment, round and client
            sig = b"" if self._identity is None else self._identity.sign(
                PURPOSE_SHARE_SIGNATURE, deployment=self._deployment, round_id=self.spec.round_id,
                body=share_signature_body(k, sealed.ephemeral_key, ct))
            arrays[f"sig{k}"] = bytes_array(sig)
        return self._reply(kind="mpc/input", arrays=arrays)


class MpcAggregator(Aggregator):
    """Secure aggregation by additive secret sharing over ``K`` non-colluding compute parties.

    Args:
        options: :class:`~fedguard.secagg.mpc.options.MpcOptions` (``backend``, ``n_parties``,
            ``min_clients``, ``allow_single_client``, ``norm_bound``, ``norm_action``, ``clip_halvings``,
            ``timeout_s``, ``startup_timeout_s``, ``listen``, ``control_key_file``), a mapping of them, or
            ``None``; keyword arguments named like its fields override it (``MpcAggregator(n_parties=2)``).
            The default backend, ``"crypten"``, starts real CrypTen party processes here.
        parties: compute parties built by the caller (then ``backend`` is not used, and :meth:`close` leaves
            them running: they are the caller's).

    With ``norm_bound`` the round must carry its fixed-point encoding (``RoundSpec.fixed_point``, which
    :func:`~fedguard.federation.fedavg.aggregate_updates` sets): the parties read ``q`` and ``s`` from it.
    """

    name: ClassVar[str] = "mpc"
    stages: ClassVar[tuple[str, ...]] = (_INPUT,)
    input_stage: ClassVar[str] = _INPUT

    def __init__(self, options: MpcOptions | Mapping[str, Any] | None = None, *,
                 parties: ComputeParties | None = None, identities: Mapping[int, Identity] | None = None,
                 deployment: str = "", **fields: Any) -> None:
        opts = MpcOptions.build(options, fields)
        self.identities: dict[int, Identity] = dict(identities or {})
        """Signing identities of the clients this process plays: their shares are signed for the parties,
        which check them against their own roster (``SimulatedParties``/``CryptenParties(roster=)``)."""
        self.deployment = deployment
        self._identity_files = opts.identity_files
        self.roster: Roster | None = None
        """The roster from ``roster_file`` (parties built here check client signatures against it)."""
        if opts.roster_file is not None:
            self.roster = Roster.load(opts.roster_file)
            self.deployment = deployment or self.roster.deployment
        if parties is not None and not isinstance(parties, ComputeParties):
            raise ConfigError(f"parties must be ComputeParties, got {type(parties).__name__}")
        if parties is not None and opts.norm_bound is not None and not parties.supports_norm_check:
            raise ConfigError("norm_bound needs compute parties that run the norm check under MPC "
                              "(CryptenParties(norm_check=True))")
        self.options: MpcOptions = opts
        self.norm_action = opts.norm_action
        self.clip_halvings = opts.clip_halvings if opts.norm_action == "clip" else 0
        self.min_clients = opts.min_clients
        self.norm_bound = float(opts.norm_bound) if opts.norm_bound is not None else None
        self._owned = parties is None
        self._closed = False
        if parties is None:
            norm_check = opts.norm_bound is not None
            if opts.backend == "network" and opts.listen is None:
                raise ConfigError("this configuration only pins the compute parties (party_keys_file, no listen or "
                                  "control_key_file): it is a client's; build its client side with "
                                  "MpcAggregator.for_client, or give a coordinator listen and control_key_file")
            if opts.backend == "crypten":
                parties = CryptenParties(opts.n_parties, norm_check=norm_check, timeout_s=opts.timeout_s,
                                         startup_timeout_s=opts.startup_timeout_s, roster=self.roster).start()
            elif opts.backend == "network":
                from fedguard.secagg.mpc.network import NetworkParties, parse_address, read_control_key

                parties = NetworkParties(opts.n_parties, listen=parse_address(str(opts.listen)),
                                         control_key=read_control_key(str(opts.control_key_file)),
                                         norm_check=norm_check, timeout_s=opts.timeout_s,
                                         startup_timeout_s=opts.startup_timeout_s).start()
            else:
                parties = SimulatedParties(opts.n_parties, roster=self.roster)
        if opts.party_keys_file is not None:
            from fedguard.secagg.mpc.pin import read_party_keys

            try:
                check_pinned(parties, read_party_keys(opts.party_keys_file, opts.n_parties))
            except ConfigError:
                if self._owned:
                    parties.close()
                raise
        self.parties = parties

    @classmethod
    def for_client(cls, options: MpcOptions | Mapping[str, Any] | None = None, *,
                   identities: Mapping[int, Identity] | None = None, deployment: str = "",
                   **fields: Any) -> MpcAggregator:
        """The aggregator of a process that plays clients only (a Flower worker, a client machine): it starts
        no party and holds only the parties' public keys, read from ``party_keys_file``
        (:class:`~fedguard.secagg.mpc.parties.PinnedParties`); its :meth:`client` seals to those keys and
        refuses a request that names other parties. :class:`ConfigError` without ``party_keys_file``: such a
        client would have no way to learn the keys but from the server, which could then name parties of
        its own and read every share."""
        opts = MpcOptions.build(options, fields)
        if opts.party_keys_file is None:
            raise ConfigError("an MPC client that does not start the compute parties must pin their public keys: "
                              "set aggregator_options.party_keys_file (the file whoever starts the parties writes, "
                              "handed to the clients at set-up)")
        return cls(opts, parties=PinnedParties.from_file(opts.party_keys_file, opts.n_parties),
                   identities=identities, deployment=deployment)

    @property
    def simulated(self) -> bool:
        """Whether the parties are simulated in this process (no protection against it)."""
        return isinstance(self.parties, SimulatedParties)

    @property
    def label(self) -> str:
        return f"{self.name} (simulated parties: no protection)" if self.simulated else self.name

    def __repr__(self) -> str:
        return (f"MpcAggregator(parties={type(self.parties).__name__}({self.parties.n_parties}), "
                f"min_clients={self.min_clients}, norm_bound={self.norm_bound!r})")

    def threshold(self, n_clients: int) -> int:
        return min(self.min_clients, n_clients)

    def check_clients(self, n_clients: int) -> None:
        """:class:`ConfigError` unless ``n_clients`` reach ``min_clients`` (a sum over fewer would be refused
        by the parties; a sum over one client is that client's update)."""
        super().check_clients(n_clients)
        if self.min_clients > n_clients:
            hint = ("add clients" if n_clients > 1 else
                    "add clients, or set aggregator_options.min_clients=1 with allow_single_client=true, which "
                    "reveals that client's update to the parties")
            raise ConfigError(f"aggregator 'mpc' needs at least min_clients={self.min_clients} clients, got "
                              f"{n_clients}: {hint}")

    def _encoding(self, spec: RoundSpec) -> FixedPointSpec | None:
        """The round's fixed-point spec when the norm check is on (``None`` otherwise)."""
        if self.norm_bound is None:
            return None
        if spec.fixed_point is None:
            raise ConfigError("norm_bound needs the round's fixed-point encoding (RoundSpec.fixed_point, set by "
                              "aggregate_updates when it encodes the updates itself): the parties read q and s from it")
        return spec.fixed_point

    def _norm(self, spec: RoundSpec) -> NormCheck | None:
        encoding = self._encoding(spec)
        if self.norm_bound is None or encoding is None:
            return None
        if spec.vector_length < 2:
            raise ConfigError("the norm check needs vector_length >= 2 (update + weight slot)")
        return NormCheck.for_bound(self.norm_bound, encoding, spec.vector_length - 1,
                                   clip_halvings=self.clip_halvings, n_clients=spec.n_clients)

    def check_round(self, spec: RoundSpec) -> None:
        """The client-count rules and, with ``norm_bound``, that the round's encoding can hold the bound
        (the norm check's plan is built, no party is started)."""
        self.check_clients(spec.n_clients)
        self._norm(spec)
        if self._identity_files is not None:  # every participant signs: its identity is named when missing
            problems = []
            for c in spec.participants:
                try:
                    self._identity(c)
                except ConfigError as err:
                    problems.append(str(err))
            if problems:
                raise ConfigError.collect(problems)

    def _identity(self, client: int) -> Identity | None:
        """The client's signing identity: given at construction, or loaded from ``identity_files``."""
        if client not in self.identities and self._identity_files is not None and self.roster is not None:
            self.identities[client] = load_client_identity(self._identity_files, client, self.roster)
        return self.identities.get(client)

    def server(self, spec: RoundSpec, *, rng: SecureRNG | None = None) -> ServerSide:
        if self.min_clients > spec.n_clients:
            raise ConfigError(f"min_clients={self.min_clients} exceeds the {spec.n_clients} participants")
        return _MpcServer(spec, self.threshold(spec.n_clients), self.parties, self._norm(spec))

    def client(
        self, spec: RoundSpec, client_id: int, ring_input: np.ndarray, *, rng: SecureRNG | None = None
    ) -> ClientSide:
        return _MpcClient(spec, client_id, ring_input, self.parties.public_keys, self._encoding(spec),
                          rng if rng is not None else SecureRNG(), self._identity(client_id),
                          self.deployment)

    def close(self) -> None:
        """Stop the compute parties this aggregator started (parties passed in are the caller's). Idempotent."""
        if self._owned and not self._closed:
            self._closed = True
            self.parties.close()
