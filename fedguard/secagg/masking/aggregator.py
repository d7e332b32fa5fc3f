"""Secure aggregation by pairwise masking that survives dropouts: SecAgg and SecAgg+.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS 2017), with
the sparse communication graph of Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead" (CCS 2020). The server learns the sum, in ``Z_{2^k}``, of the ring vectors of the clients that
sent a masked input, and nothing else about them; the weight slot of each ring vector (see
:mod:`fedguard.encoding`) is masked like every other slot, so weights never travel in the clear.

The masked input of client ``u`` (its ring vector ``x_u``) is

    y_u = x_u + PRG(b_u) + Σ_{v ∈ N(u) ∩ A1, v > u} PRG(s_uv) - Σ_{v ∈ N(u) ∩ A1, v < u} PRG(s_uv)  (mod 2^k)

where ``b_u`` is a fresh 256-bit self-mask seed, ``s_uv = s_vu`` is the X25519+HKDF key agreed between
``u`` and ``v`` from their *masking* key pairs, ``PRG`` is ChaCha20 (:func:`fedguard.rng.expand_seed`),
``N(u)`` are ``u``'s ``d`` neighbours in the communication graph (:mod:`fedguard.secagg.masking.graph`;
``d = n - 1`` is classic SecAgg, ``d = O(log n)`` is SecAgg+) and ``A1`` the clients that completed the
share stage. The pairwise masks cancel in ``Σ y_u`` between clients that both sent inputs; the server
removes the rest after the unmask stage.

Stages (every message carries the round id and its stage; the foundation's stage machine refuses
foreign-round, out-of-order, replayed and misaddressed messages):

1. ``advertise`` - the server announces the parameters and the graph seed; each client answers with two
   X25519 public keys (``c``: share encryption, ``s``: masking) and a commitment to ``b_u``.
   Responders: ``A0``.
2. ``share`` - each client receives its neighbours' public keys, Shamir-shares ``b_u`` and its masking
   private key ``s_u`` with threshold ``t`` among its *holders* ``N[u] = N(u) ∪ {u}`` (``k = d + 1`` of
   them) and sends each share to its holder encrypted with ChaCha20-Poly1305 under the ``c``-key agreed
   with that holder (:mod:`fedguard.secagg.masking.crypto`), through the server. Responders: ``A1``.
3. ``mask`` (the input stage) - each client receives the encrypted shares addressed to it and sends
   ``y_u``. Responders: ``A2``; the result is the sum over exactly ``A2``.
4. ``unmask`` - the server announces ``A2``; each holder reveals, for every owner whose shares it holds,
   the share of ``b_owner`` if the owner is in ``A2`` and the share of ``s_owner`` if it is not - never
   both. From ``t`` shares the server reconstructs every ``b_u`` (``u ∈ A2``; checked against the
   commitment) and every ``s_w`` of a dropped ``w ∈ A1 \\ A2`` with a neighbour in ``A2`` (checked
   against ``w``'s public key), and subtracts ``PRG(b_u)`` and the uncancelled ``PRG(s_wv)``.

Double masking is what makes dropouts safe: a client that is merely *late* (its ``y_u`` arrives after
the server declared it dropped) is protected by ``PRG(b_u)``, whose shares are never revealed because the
honest holders reveal ``s_u`` instead.

When the round completes (the rules a client follows, after Bonawitz et al. and Bell et al.; the
server checks them first and aborts with :class:`ProtocolAbort`, and :meth:`MaskingAggregator.survives`
states them exactly):

* at least ``t`` clients reply in every stage;
* ``advertise``: every ``u ∈ A0`` has at least ``t`` holders in ``A0`` (else its secrets could never be
  reconstructed: a client refuses to share with fewer);
* ``share``: every ``u ∈ A1`` has at least ``t`` holders in ``A1`` (a client refuses to mask otherwise);
* ``mask``: the subgraph of the communication graph induced on ``A2`` is connected. Otherwise the server
  could remove the masks and learn the separate sums of the components (a lone survivor's input!); the
  clients check this too before revealing anything. Always true for the complete graph;
* ``unmask``: every ``u ∈ A2``, and every dropped ``w ∈ A1 \\ A2`` with a neighbour in ``A2``, has at
  least ``t`` holders among the clients that replied in ``unmask``.

Parameters: neighbours ``d`` and threshold ``t`` with ``k = d + 1`` holders per client must satisfy
``k/2 < t <= k``. ``t > k/2`` is Bonawitz et al.'s condition that a server cannot assemble ``t`` shares of
both ``b_u`` and ``s_u`` by telling disjoint halves of the holders different stories; the default is the
smallest such ``t = ⌊k/2⌋ + 1``, which survives the most dropouts.

Threat model: an honest-but-curious server and up to ``t - 1`` colluding clients, who learn nothing beyond
the sum when the graph is complete; with a sparse graph, coalitions that disconnect the honest survivors
can learn sums over the pieces (Bell et al. bound this probabilistically; it is not checked at run time).
A malicious server that lies about ``A2`` to different clients or substitutes relayed keys is out of scope
here: :class:`~fedguard.secagg.masking.signed.SignedMaskingAggregator` adds signed keys and the
consistency-check round against it.

>>> import numpy as np
>>> from fedguard.federation import InProcessTransport, RoundSpec
>>> from fedguard.rng import SecureRNG
>>> agg = MaskingAggregator()
>>> spec = RoundSpec(round_id=0, participants=(0, 1, 2), vector_length=3)
>>> xs = {c: np.arange(3, dtype=np.uint64) * np.uint64(c + 1) for c in spec.participants}
>>> rng = SecureRNG.for_testing("doctest")
>>> clients = {c: agg.client(spec, c, xs[c], rng=rng.spawn(str(c))) for c in spec.participants}
>>> outcome = InProcessTransport().run(agg.server(spec), clients, drop_at={2: "mask"})
>>> outcome.result.ring_sum.tolist(), outcome.result.contributors
([0, 3, 6], (0, 1))
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedguard.checks import check_int
from fedguard.encoding import to_wire
from fedguard.errors import ConfigError, InvalidUpdateError, MessageError, ProtocolAbort, ProtocolViolation
from fedguard.federation.protocol import (
    AggregateResult,
    Aggregator,
    ClientSide,
    Outbox,
    RoundSpec,
    ServerSide,
    check_ring_vector,
    ring_input_schema,
    too_few_contributors,
)
from fedguard.rng import SecureRNG
from fedguard.secagg.masking import shamir
from fedguard.secagg.masking.crypto import (
    KEY_BYTES,
    PAIR_MASK_NONCE,
    PURPOSE_MASK,
    PURPOSE_SHARE,
    SELF_MASK_NONCE,
    Mask,
    agree,
    apply_masks,
    commit_seed,
    generate_private_key,
    load_private,
    open_sealed,
    private_bytes,
    public_bytes,
    seal,
    sealed_size,
)
from fedguard.secagg.masking.graph import CommunicationGraph, check_degree
from fedguard.secagg.masking.options import MaskingOptions, threshold_problems
from fedguard.wire import Message, MessageSchema

ADVERTISE, SHARE, MASK, UNMASK = "advertise", "share", "mask", "unmask"
STAGES: tuple[str, ...] = (ADVERTISE, SHARE, MASK, UNMASK)
BAD_SHARE = "bad-share"
"""Key of ``AggregateResult.dropped`` naming the holders whose revealed shares were corrected."""

_S = shamir.SHARE_BYTES
_PLAINTEXT_BYTES = 2 * _S  # share of b_u ‖ share of s_u
CIPHERTEXT_BYTES = sealed_size(_PLAINTEXT_BYTES)
"""Bytes of one encrypted share pair on the wire (nonce + 2 shares + tag)."""

# server -> client
_ADVERTISE_REQ = MessageSchema(
    kind="masking/advertise-request",
    meta={"vector_length": int, "ring_bits": int, "threshold": int, "neighbours": int},
    arrays={"graph_seed": ("|u1", 1)},
)
_SHARE_REQ = MessageSchema(
    kind="masking/share-request",
    arrays={"neighbours": ("<i8", 1), "c_keys": ("|u1", 2), "s_keys": ("|u1", 2)},
)
_MASK_REQ = MessageSchema(kind="masking/mask-request", arrays={"senders": ("<i8", 1), "ciphertexts": ("|u1", 2)})
_UNMASK_REQ = MessageSchema(kind="masking/unmask-request", arrays={"survivors": ("<i8", 1)})
# client -> server
_KEYS = MessageSchema(
    kind="masking/keys", arrays={"c_key": ("|u1", 1), "s_key": ("|u1", 1), "commitment": ("|u1", 1)}
)
_SHARES = MessageSchema(kind="masking/shares", arrays={"recipients": ("<i8", 1), "ciphertexts": ("|u1", 2)})
_MASKED = ring_input_schema("masking/masked-input")
_REVEAL = MessageSchema(
    kind="masking/unmask-shares",
    arrays={"b_owners": ("<i8", 1), "b_shares": ("|u1", 2), "s_owners": ("<i8", 1), "s_shares": ("|u1", 2)},
)
_REPLY_SCHEMAS = {ADVERTISE: _KEYS, SHARE: _SHARES, MASK: _MASKED, UNMASK: _REVEAL}


class ShareCommitmentError(ProtocolAbort):
    """A secret reconstructed from revealed shares does not match its owner's commitment (the hash of a
    self-mask seed, or the public key of a masking key): a share was tampered with. The round aborts."""


def _x(client: int) -> int:
    """Shamir evaluation point of a holder: its client id + 1 (ids are distinct and >= 0)."""
    return client + 1


def _ids(arr: np.ndarray) -> list[int]:
    return [int(v) for v in arr]


def _rows(blobs: Sequence[bytes], width: int) -> np.ndarray:
    if not blobs:
        return np.zeros((0, width), dtype=np.uint8)
    return np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), width)


def _check_increasing(ids: list[int], what: str) -> None:
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise MessageError(f"{what} must be strictly increasing client ids, got {ids}")


@dataclass(frozen=True, slots=True)
class MaskingParams:
    """The resolved parameters of one round: ``n`` clients, ``d`` neighbours, threshold ``t``."""

    n_clients: int
    neighbours: int
    threshold: int

    @property
    def holders(self) -> int:
        """``k = d + 1``: how many clients hold a share of each client's secrets."""
        return self.neighbours + 1


# -- the survival rules, shared by the server and MaskingAggregator.survives ----------------------------
def _short_of_holders(graph: CommunicationGraph, owners: Collection[int], alive: Collection[int], t: int
                      ) -> tuple[int, int] | None:
    """The first owner with fewer than ``t`` holders in ``alive`` (and how many it has), else None."""
    alive_set = set(alive)
    for u in sorted(owners):
        have = len(graph.holders(u) & alive_set)
        if have < t:
            return u, have
    return None


def _owners_to_unmask(graph: CommunicationGraph, a1: Collection[int], a2: Collection[int]
                      ) -> tuple[list[int], list[int]]:
    """Owners whose ``b`` must be reconstructed (``A2``) and dropped owners whose ``s`` must be
    (``w ∈ A1 \\ A2`` with a neighbour in ``A2``)."""
    survivors = set(a2)
    dropped = [w for w in sorted(set(a1) - survivors) if graph.neighbours(w) & survivors]
    return sorted(survivors), dropped


class _MaskingServer(ServerSide):
    stages = STAGES

    def __init__(self, spec: RoundSpec, params: MaskingParams, graph: CommunicationGraph, graph_seed: bytes,
                 unmask_workers: int = 1) -> None:
        super().__init__(spec, params.threshold)
        self._workers = unmask_workers
        self.params = params
        self.graph = graph
        self._graph_seed = graph_seed
        self._c_keys: dict[int, bytes] = {}
        self._s_keys: dict[int, bytes] = {}
        self._commitments: dict[int, bytes] = {}
        self._a0: frozenset[int] = frozenset()
        self._a1: frozenset[int] = frozenset()
        self._a2: frozenset[int] = frozenset()
        self._forwarded: dict[int, tuple[int, ...]] = {}  # holder -> owners whose shares it received
        self._masked_sum = np.zeros(0, dtype=np.uint64)  # set when the mask stage closes
        self._revealed: dict[int, dict[str, list[tuple[int, int]]]] = {}  # holder -> decoded b/s shares
        self.bad_shares: dict[int, list[int]] = {}
        """Holders whose revealed share was wrong (and corrected), with the owners they lied about."""

    def _abort(self, stage: str, message: str) -> ProtocolAbort:
        # before the unmask stage no client has revealed a share: nothing can have been decoded
        return ProtocolAbort(f"round {self.spec.round_id} aborted in stage {stage!r}: {message}",
                             round_id=self.spec.round_id, stage=stage, nothing_revealed=stage != UNMASK)

    # -- stage machine hooks ---------------------------------------------------------------------------
    def _open(self) -> Outbox:
        meta = {"vector_length": self.spec.vector_length, "ring_bits": self.spec.ring_bits,
                "threshold": self.params.threshold, "neighbours": self.params.neighbours}
        seed = np.frombuffer(self._graph_seed, dtype=np.uint8)
        return {c: self._message(ADVERTISE, c, kind=_ADVERTISE_REQ.kind, meta=meta, arrays={"graph_seed": seed})
                for c in self.spec.participants}

    def _schema(self, stage: str) -> MessageSchema:
        if stage == MASK:  # the masked input travels in the round's ring width (uint32 for a 32-bit ring)
            return ring_input_schema(_MASKED.kind, ring_bits=self.spec.ring_bits)
        return _REPLY_SCHEMAS[stage]

    def _check_reply(self, stage: str, msg: Message) -> None:
        u = msg.sender
        if stage == ADVERTISE:
            for name in ("c_key", "s_key", "commitment"):
                if msg.arrays[name].size != KEY_BYTES:
                    raise MessageError(f"{name} of client {u} must be {KEY_BYTES} bytes, got {msg.arrays[name].size}")
        elif stage == SHARE:
            expected = sorted(self.graph.neighbours(u) & self._a0)
            got = _ids(msg.arrays["recipients"])
            if got != expected:
                raise MessageError(f"client {u} sent shares to {got}; its online neighbours are {expected}")
            if msg.arrays["ciphertexts"].shape != (len(expected), CIPHERTEXT_BYTES):
                raise MessageError(f"ciphertexts of client {u} must have shape ({len(expected)}, {CIPHERTEXT_BYTES}), "
                                   f"got {msg.arrays['ciphertexts'].shape}")
        elif stage == MASK:
            check_ring_vector(msg.arrays["x"], self.spec, f"masked input of client {u}")
        else:
            held = set(self._forwarded[u]) | {u}
            want_b = sorted(held & self._a2)
            want_s = sorted(held - self._a2)
            for name, want in (("b", want_b), ("s", want_s)):
                got = _ids(msg.arrays[f"{name}_owners"])
                if got != want:
                    raise MessageError(f"client {u} revealed {name}-shares of {got}; expected {want}")
                shares = msg.arrays[f"{name}_shares"]
                if shares.shape != (len(want), _S):
                    raise MessageError(f"{name}_shares of client {u} must have shape ({len(want)}, {_S}), "
                                       f"got {shares.shape}")
            # decoded once, here; kept only once the reply is accepted (this is the last check)
            self._revealed[u] = {name: [(o, shamir.decode_value(row.tobytes())) for o, row in
                                        zip(_ids(msg.arrays[f"{name}_owners"]), msg.arrays[f"{name}_shares"],
                                            strict=True)] for name in ("b", "s")}

    def _close(self, stage: str, replies: dict[int, Message]) -> Outbox | AggregateResult:
        if stage == ADVERTISE:
            return self._close_advertise(replies)
        if stage == SHARE:
            return self._close_share(replies)
        if stage == MASK:
            return self._close_mask(replies)
        return self._close_unmask(replies)

    # -- stage closers -----------------------------------------------------------------------------------
    def _close_advertise(self, replies: dict[int, Message]) -> Outbox:
        a0 = frozenset(replies)
        short = _short_of_holders(self.graph, a0, a0, self.threshold)
        if short is not None:
            raise self._abort(ADVERTISE, f"client {short[0]} has only {short[1]} of its {self.params.holders} "
                                         f"share holders online; t={self.threshold} are needed")
        self._a0 = a0
        for u, msg in replies.items():
            self._c_keys[u] = msg.blob("c_key")
            self._s_keys[u] = msg.blob("s_key")
            self._commitments[u] = msg.blob("commitment")
        out = {}
        for u in sorted(a0):
            nbrs = sorted(self.graph.neighbours(u) & a0)
            out[u] = self._message(SHARE, u, kind=_SHARE_REQ.kind, arrays={
                "neighbours": np.array(nbrs, dtype=np.int64),
                "c_keys": _rows([self._c_keys[v] for v in nbrs], KEY_BYTES),
                "s_keys": _rows([self._s_keys[v] for v in nbrs], KEY_BYTES),
            })
        return out

    def _close_share(self, replies: dict[int, Message]) -> Outbox:
        a1 = frozenset(replies)
        short = _short_of_holders(self.graph, a1, a1, self.threshold)
        if short is not None:
            raise self._abort(SHARE, f"client {short[0]} has only {short[1]} of its {self.params.holders} share "
                                     f"holders left after the share stage; t={self.threshold} are needed")
        self._a1 = a1
        inbound: dict[int, dict[int, bytes]] = {u: {} for u in a1}
        for sender, msg in replies.items():
            cts = msg.arrays["ciphertexts"]
            for recipient, row in zip(_ids(msg.arrays["recipients"]), cts, strict=True):
                if recipient in inbound:
                    inbound[recipient][sender] = row.tobytes()
        out = {}
        for u in sorted(a1):
            senders = sorted(inbound[u])
            self._forwarded[u] = tuple(senders)
            out[u] = self._message(MASK, u, kind=_MASK_REQ.kind, arrays={
                "senders": np.array(senders, dtype=np.int64),
                "ciphertexts": _rows([inbound[u][v] for v in senders], CIPHERTEXT_BYTES),
            })
        return out

    def _close_mask(self, replies: dict[int, Message]) -> Outbox:
        a2 = frozenset(replies)
        abort = too_few_contributors(self.spec, len(a2), stage=MASK)
        if abort is not None:  # refuse to ask for unmasking shares: nothing is unmasked
            raise abort
        if not self.graph.is_connected(a2):
            raise self._abort(MASK, f"the {len(a2)} clients that sent masked inputs are not connected in the "
                                    f"communication graph: unmasking would reveal partial sums")
        total = np.zeros(self.spec.vector_length, dtype=np.uint64)
        for u in sorted(a2):
            total += replies[u].arrays["x"]
        self._a2, self._masked_sum = a2, total
        survivors = np.array(sorted(a2), dtype=np.int64)
        return {u: self._message(UNMASK, u, kind=_UNMASK_REQ.kind, arrays={"survivors": survivors})
                for u in sorted(a2)}

    def _close_unmask(self, replies: dict[int, Message]) -> AggregateResult:
        a3 = frozenset(replies)
        t = self.threshold
        b_owners, s_owners = _owners_to_unmask(self.graph, self._a1, self._a2)
        for owners, kind in ((b_owners, "self-mask seed"), (s_owners, "masking key")):
            short = _short_of_holders(self.graph, owners, a3, t)
            if short is not None:
                raise self._abort(UNMASK, f"only {short[1]} shares of the {kind} of client {short[0]} were "
                                          f"revealed; t={t} are needed")
        b_shares: dict[int, list[shamir.Share]] = {u: [] for u in b_owners}
        s_shares: dict[int, list[shamir.Share]] = {w: [] for w in s_owners}
        for holder in sorted(a3):
            revealed = self._revealed[holder]
            for name, table in (("b", b_shares), ("s", s_shares)):
                for owner, value in revealed[name]:
                    if owner in table:
                        table[owner].append(shamir.Share(_x(holder), value))
        rid = self.spec.round_id
        masks: list[Mask] = []
        for u in b_owners:
            seed = self._reconstruct(b_shares[u], u, "self-mask seed")
            if not hmac.compare_digest(commit_seed(seed, round_id=rid, client=u), self._commitments[u]):
                raise ShareCommitmentError(
                    f"the self-mask seed of client {u} reconstructed from holders "
                    f"{[s.x - 1 for s in b_shares[u][:t]]} does not match its commitment: tampered share",
                    round_id=rid, stage=UNMASK)
            masks.append(Mask(seed, -1, SELF_MASK_NONCE))
        survivors = self._a2
        for w in s_owners:
            raw = self._reconstruct(s_shares[w], w, "masking key")
            key = load_private(raw)
            if not hmac.compare_digest(public_bytes(key), self._s_keys[w]):
                raise ShareCommitmentError(
                    f"the masking key of client {w} reconstructed from holders "
                    f"{[s.x - 1 for s in s_shares[w][:t]]} does not match its public key: tampered share",
                    round_id=rid, stage=UNMASK)
            for v in sorted(self.graph.neighbours(w) & survivors):
                seed = agree(key, self._s_keys[v], purpose=PURPOSE_MASK, round_id=rid, a=w, b=v)
                # client v added +PRG(s_vw) if v < w, else subtracted it: undo that
                masks.append(Mask(seed, -1 if v < w else 1, PAIR_MASK_NONCE))
        total = self._masked_sum  # the stage machine closes mask (which sets it) before unmask
        apply_masks(total, masks, workers=self._workers)
        if self.spec.ring_bits < 64:
            total &= np.uint64((1 << self.spec.ring_bits) - 1)
        self._masked_sum = np.zeros(0, dtype=np.uint64)
        return self._result(total, set(self._a2))

    def _reconstruct(self, shares: list[shamir.Share], owner: int, what: str) -> bytes:
        """The secret from *every* revealed share: all are checked against one polynomial and, when some
        are not, up to ``⌊(m - t)/2⌋`` bad ones are corrected (Reed–Solomon / Berlekamp–Welch) and their
        holders recorded in :attr:`bad_shares` (and in the result's ``dropped["bad-share"]``)."""
        chosen = sorted(shares, key=lambda s: s.x)
        try:
            secret, bad = shamir.robust_reconstruct_bytes(chosen, self.threshold)
        except (shamir.InconsistentSharesError, MessageError) as err:
            raise ShareCommitmentError(f"the {what} of client {owner} cannot be reconstructed: {err}",
                                       round_id=self.spec.round_id, stage=UNMASK) from err
        for x in bad:
            self.bad_shares.setdefault(x - 1, []).append(owner)
        if bad:
            self._dropped[BAD_SHARE] = tuple(sorted(self.bad_shares))
        return secret


@dataclass(frozen=True, slots=True)
class _ClientKeys:
    """What a client fixes in the advertise stage."""

    graph: CommunicationGraph
    c_sk: X25519PrivateKey
    s_sk: X25519PrivateKey
    b_seed: bytes


class _MaskingClient(ClientSide):
    stages = STAGES

    def __init__(self, spec: RoundSpec, client_id: int, ring_input: np.ndarray, params: MaskingParams,
                 rng: SecureRNG) -> None:
        super().__init__(spec, client_id)
        self._x = check_ring_vector(ring_input, spec, f"ring input of client {client_id}", error=InvalidUpdateError)
        self.params = params
        self._rng = rng
        self._keys: _ClientKeys | None = None
        self._peers: dict[int, tuple[bytes, bytes]] = {}  # neighbour -> (c_pk, s_pk)
        self._share_keys: dict[int, bytes] = {}
        self._own_shares: tuple[int, int] = (0, 0)
        self._held: dict[int, tuple[int, int]] = {}  # owner -> (b-share, s-share) values at my x
        self._senders: tuple[int, ...] = ()

    def _violation(self, msg: Message, text: str) -> ProtocolViolation:
        return ProtocolViolation(f"client {self.client_id} refuses the {self.stage} message: {text}",
                                 sender=msg.sender, round_id=self.spec.round_id, stage=self.stage)

    def _state(self, msg: Message) -> _ClientKeys:
        if self._keys is None:  # unreachable: the stage machine runs advertise first
            raise self._violation(msg, "no keys: the advertise stage has not run")
        return self._keys

    def _respond(self, stage: str, msg: Message) -> bytes:
        if stage == ADVERTISE:
            return self._advertise(msg)
        if stage == SHARE:
            return self._share(msg)
        if stage == MASK:
            return self._mask(msg)
        return self._unmask(msg)

    def _check_params(self, msg: Message) -> None:
        """Refuse an advertise request whose round parameters differ from this client's."""
        mine = {"vector_length": self.spec.vector_length, "ring_bits": self.spec.ring_bits,
                "threshold": self.params.threshold, "neighbours": self.params.neighbours}
        diff = [f"{k}={msg.meta[k]} (expected {v})" for k, v in mine.items() if msg.meta[k] != v]
        if diff:
            raise self._violation(msg, "parameters differ: " + ", ".join(diff))

    def _advertise(self, msg: Message) -> bytes:
        _ADVERTISE_REQ.validate(msg)
        self._check_params(msg)
        seed = msg.blob("graph_seed")
        if len(seed) != 32:
            raise MessageError(f"graph seed must be 32 bytes, got {len(seed)}")
        graph = CommunicationGraph.harary(self.spec.participants, self.params.neighbours, seed)
        rng = self._rng
        c_sk, s_sk, b_seed = generate_private_key(rng), generate_private_key(rng), rng.bytes(KEY_BYTES)
        self._keys = _ClientKeys(graph, c_sk, s_sk, b_seed)
        commitment = commit_seed(b_seed, round_id=self.spec.round_id, client=self.client_id)
        return self._reply(kind=_KEYS.kind, arrays={
            "c_key": np.frombuffer(public_bytes(c_sk), dtype=np.uint8),
            "s_key": np.frombuffer(public_bytes(s_sk), dtype=np.uint8),
            "commitment": np.frombuffer(commitment, dtype=np.uint8),
        })

    def _share(self, msg: Message) -> bytes:
        _SHARE_REQ.validate(msg)
        keys = self._state(msg)
        me, t = self.client_id, self.params.threshold
        nbrs = _ids(msg.arrays["neighbours"])
        _check_increasing(nbrs, "neighbours")
        foreign = set(nbrs) - keys.graph.neighbours(me)
        if foreign:
            raise self._violation(msg, f"clients {sorted(foreign)} are not my neighbours in the graph")
        for name in ("c_keys", "s_keys"):
            if msg.arrays[name].shape != (len(nbrs), KEY_BYTES):
                raise MessageError(f"{name} must have shape ({len(nbrs)}, {KEY_BYTES}), got {msg.arrays[name].shape}")
        if len(nbrs) + 1 < t:
            raise self._violation(msg, f"only {len(nbrs) + 1} share holders are online; t={t} are needed")
        rid = self.spec.round_id
        peers = {v: (msg.arrays["c_keys"][i].tobytes(), msg.arrays["s_keys"][i].tobytes()) for i, v in enumerate(nbrs)}
        share_keys = {v: agree(keys.c_sk, peers[v][0], purpose=PURPOSE_SHARE, round_id=rid, a=me, b=v) for v in nbrs}
        holders = sorted([*nbrs, me])
        xs = [_x(h) for h in holders]
        b_sh = shamir.split_bytes(keys.b_seed, t, xs, rng=self._rng)
        s_sh = shamir.split_bytes(private_bytes(keys.s_sk), t, xs, rng=self._rng)
        by_holder = {h: (b.y, s.y) for h, b, s in zip(holders, b_sh, s_sh, strict=True)}
        cts = [seal(share_keys[v], shamir.encode_value(by_holder[v][0]) + shamir.encode_value(by_holder[v][1]),
                    round_id=rid, sender=me, recipient=v, rng=self._rng) for v in nbrs]
        self._peers, self._share_keys, self._own_shares = peers, share_keys, by_holder[me]
        return self._reply(kind=_SHARES.kind, arrays={
            "recipients": np.array(nbrs, dtype=np.int64), "ciphertexts": _rows(cts, CIPHERTEXT_BYTES)})

    def _mask(self, msg: Message) -> bytes:
        _MASK_REQ.validate(msg)
        keys = self._state(msg)
        me, t, rid = self.client_id, self.params.threshold, self.spec.round_id
        senders = _ids(msg.arrays["senders"])
        _check_increasing(senders, "senders")
        unknown = set(senders) - set(self._peers)
        if unknown:
            raise self._violation(msg, f"shares from {sorted(unknown)}, who are not my online neighbours")
        if msg.arrays["ciphertexts"].shape != (len(senders), CIPHERTEXT_BYTES):
            raise MessageError(f"ciphertexts must have shape ({len(senders)}, {CIPHERTEXT_BYTES}), "
                               f"got {msg.arrays['ciphertexts'].shape}")
        if len(senders) + 1 < t:
            raise self._violation(msg, f"only {len(senders) + 1} of my share holders completed the share stage; "
                                       f"t={t} are needed")
        held: dict[int, tuple[int, int]] = {me: self._own_shares}
        for v, row in zip(senders, msg.arrays["ciphertexts"], strict=True):
            plain = open_sealed(self._share_keys[v], row.tobytes(), round_id=rid, sender=v, recipient=me)
            held[v] = (shamir.decode_value(plain[:_S]), shamir.decode_value(plain[_S:]))
        masks = [Mask(keys.b_seed, 1, SELF_MASK_NONCE)] + [
            Mask(agree(keys.s_sk, self._peers[v][1], purpose=PURPOSE_MASK, round_id=rid, a=me, b=v),
                 1 if me < v else -1, PAIR_MASK_NONCE) for v in senders]
        y = self._x.copy()
        apply_masks(y, masks)
        if self.spec.ring_bits < 64:
            y &= np.uint64((1 << self.spec.ring_bits) - 1)
        self._held, self._senders = held, tuple(senders)
        return self._reply(kind=_MASKED.kind, arrays={"x": to_wire(y, self.spec.ring_bits)})

    def _unmask(self, msg: Message) -> bytes:
        _UNMASK_REQ.validate(msg)
        alive = self._check_survivors(msg, _ids(msg.arrays["survivors"]))
        return self._reveal(alive)

    def _check_survivors(self, msg: Message, survivors: list[int]) -> set[int]:
        """The announced survivor set ``A2``, checked against everything this client knows (refusing with
        :class:`ProtocolViolation` a set that would let the server unmask a partial sum)."""
        graph = self._state(msg).graph
        me, t = self.client_id, self.params.threshold
        _check_increasing(survivors, "survivors")
        alive = set(survivors)
        if not alive <= set(self.spec.participants):
            raise self._violation(msg, f"survivors {sorted(alive - set(self.spec.participants))} are not participants")
        if me not in alive:
            raise self._violation(msg, f"I sent a masked input but am not listed among the survivors {survivors}")
        if len(alive) < t:
            raise self._violation(msg, f"only {len(alive)} survivors; t={t} are needed")
        abort = too_few_contributors(self.spec, len(alive), f"client {me}", stage=UNMASK)
        if abort is not None:  # an honest client never helps unmask a sum over too few inputs
            raise self._violation(msg, str(abort))
        bogus = (alive & graph.neighbours(me)) - set(self._senders)
        if bogus:
            raise self._violation(msg, f"neighbours {sorted(bogus)} are listed as survivors but never sent me shares")
        if not graph.is_connected(alive):
            raise self._violation(msg, "the survivors are not connected in the communication graph: revealing "
                                       "self-mask shares would expose partial sums")
        return alive

    def _reveal(self, alive: set[int]) -> bytes:
        """For each owner whose shares I hold: the share of ``b`` if it survived, else of ``s`` (never both)."""
        owners = sorted(self._held)
        b_owners = [o for o in owners if o in alive]
        s_owners = [o for o in owners if o not in alive]  # never both shares for one owner
        return self._reply(kind=_REVEAL.kind, arrays={
            "b_owners": np.array(b_owners, dtype=np.int64),
            "b_shares": _rows([shamir.encode_value(self._held[o][0]) for o in b_owners], _S),
            "s_owners": np.array(s_owners, dtype=np.int64),
            "s_shares": _rows([shamir.encode_value(self._held[o][1]) for o in s_owners], _S),
        })


class MaskingAggregator(Aggregator):
    """Pairwise-masking secure aggregation (SecAgg; SecAgg+ with ``neighbours``); see the module doc.

    Args:
        options: :class:`~fedguard.secagg.masking.options.MaskingOptions` (``neighbours``, ``threshold``,
            ``unmask_workers``), a mapping of them, or ``None``; keyword arguments named like its fields
            override it (``MaskingAggregator(neighbours=4)``).
        rng: draws the secret key from which the communication graph of each round is derived (the graph
            must be unpredictable to clients before the round). Default: a fresh :class:`SecureRNG`.
    """

    name: ClassVar[str] = "masking"
    stages: ClassVar[tuple[str, ...]] = STAGES
    input_stage: ClassVar[str] = MASK
    options_class: ClassVar[type[MaskingOptions]] = MaskingOptions

    def __init__(self, options: MaskingOptions | Mapping[str, Any] | None = None, *,
                 rng: SecureRNG | None = None, **fields: Any) -> None:
        self.options: MaskingOptions = self.options_class.build(options, fields)
        self.neighbours = self.options.neighbours
        self.unmask_workers = self.options.unmask_workers
        self._threshold = self.options.threshold
        self._graph_key = (rng if rng is not None else SecureRNG()).bytes(32)

    def __repr__(self) -> str:
        return f"MaskingAggregator(neighbours={self.neighbours!r}, threshold={self._threshold!r})"

    def check_clients(self, n_clients: int) -> None:
        """:class:`ConfigError` unless ``neighbours`` and ``threshold`` fit a round of ``n_clients``."""
        check_int("n_clients", n_clients, low=1)
        try:
            super().check_clients(n_clients)
        except ConfigError as err:
            raise ConfigError(f"{err} (change aggregator_options.neighbours or threshold, or the number of "
                              f"clients)") from err

    def params(self, n_clients: int) -> MaskingParams:
        """The neighbours and threshold for a round of ``n_clients`` (:class:`ConfigError` naming the
        numbers when they do not fit)."""
        d = n_clients - 1 if self.neighbours is None else self.neighbours
        check_degree(n_clients, d)
        k = d + 1
        t = k // 2 + 1 if self._threshold is None else self._threshold
        problems = threshold_problems(t, d, f", n={n_clients} clients")
        if problems:
            raise ConfigError.collect(problems)
        return MaskingParams(n_clients, d, t)

    def threshold(self, n_clients: int) -> int:
        return self.params(n_clients).threshold

    def graph_seed(self, spec: RoundSpec) -> bytes:
        """The round's graph seed: ``HMAC-SHA256(key, round ‖ participants ‖ d)`` under this aggregator's
        secret key (deterministic, so :meth:`survives` can evaluate the rules on the round's graph)."""
        params = self.params(spec.n_clients)
        data = struct.pack(f"<QQ{spec.n_clients}q", spec.round_id, params.neighbours, *spec.participants)
        return hmac.new(self._graph_key, b"fedguard/secagg/graph/v1" + data, hashlib.sha256).digest()

    def graph(self, spec: RoundSpec) -> CommunicationGraph:
        """The communication graph the server of round ``spec`` announces."""
        return CommunicationGraph.harary(spec.participants, self.params(spec.n_clients).neighbours,
                                         self.graph_seed(spec))

    def server(self, spec: RoundSpec, *, rng: SecureRNG | None = None) -> ServerSide:
        """The server side of round ``spec``. The masking server draws no randomness of its own (the graph
        seed comes from this aggregator's key, see :meth:`graph_seed`), so ``rng`` is accepted for the
        :class:`Aggregator` interface and not used."""
        seed = self.graph_seed(spec)
        params = self.params(spec.n_clients)
        graph = CommunicationGraph.harary(spec.participants, params.neighbours, seed)
        return _MaskingServer(spec, params, graph, seed, self.unmask_workers)

    def client(self, spec: RoundSpec, client_id: int, ring_input: np.ndarray, *, rng: SecureRNG | None = None
               ) -> ClientSide:
        return _MaskingClient(spec, client_id, ring_input, self.params(spec.n_clients),
                              rng if rng is not None else SecureRNG())

    def survives(self, spec: RoundSpec, alive_per_stage: list[set[int]]) -> bool:
        """Whether the round completes when the clients in ``alive_per_stage[i]`` reply in stage ``i``:
        the rules of the module docstring, evaluated on this round's graph."""
        if len(alive_per_stage) != len(STAGES):
            raise ConfigError(f"alive_per_stage needs one set per stage {STAGES}, got {len(alive_per_stage)}")
        t = self.threshold(spec.n_clients)
        graph = self.graph(spec)
        sets: list[set[int]] = []
        previous = set(spec.participants)
        for alive in alive_per_stage:
            previous = previous & set(alive)
            sets.append(previous)
        a0, a1, a2, a3 = sets
        if len(a2) < spec.min_contributors or any(len(a) < t for a in sets):
            return False
        if _short_of_holders(graph, a0, a0, t) or _short_of_holders(graph, a1, a1, t):
            return False
        if not graph.is_connected(a2):
            return False
        b_owners, s_owners = _owners_to_unmask(graph, a1, a2)
        return _short_of_holders(graph, b_owners, a3, t) is None and _short_of_holders(graph, s_owners, a3, t) is None

