"""SecAgg / SecAgg+ against an *active* server: signed round keys, a coin-flipped graph and a consistency round.

Bonawitz et al. (CCS 2017, §4 and Fig. 4, "active adversary") make pairwise masking hold against a server
that deviates from the protocol by giving every client a long-term signing key whose public half every
other client knows out of band (:class:`~fedguard.identity.Roster`), and by adding one round. This module
is :class:`SignedMaskingAggregator`: the protocol of :mod:`fedguard.secagg.masking.aggregator` with

1. **signed round keys** (``advertise``): client ``u`` draws its keys and a 256-bit coin ``r_u``, and sends
   its keys, the coin's commitment ``h_u = SHA-256(ctx("masking/coin") ‖ r_u)`` and ``σ_u = Sign(sk_u,
   ctx("masking/keys") ‖ h_u ‖ c_pk_u ‖ s_pk_u)``, where ``ctx`` binds the deployment, the round and ``u``
   (:func:`fedguard.identity.signed_context`). The server relays ``σ_v`` with each neighbour's keys; a
   client refuses the share request when any relayed signature fails (``share``): a substituted key, a
   key replayed from another round or deployment, a key of a client not on the roster (a Sybil) - each
   changes the signed bytes.
2. **the SecAgg+ graph from a coin flip among the clients** (``coin``, commit-then-reveal, Blum's coin
   flipping over the phone): once ``advertise`` closes the server sends every client the list ``L`` of the
   commitments it received (ids and ``h_v``); only then does a client reveal ``r_u``. The graph seed is
   ``SHA-256("fedguard/secagg/graph-seed/v1" ‖ deployment ‖ round ‖ (v, h_v, r_v) for every v ∈ L)``
   (:func:`graph_seed_from_coins`); the share request carries every ``r_v``, each client checks each
   against ``h_v`` and derives the seed and the Harary graph itself. Why the server cannot choose the graph:
   it fixes ``L`` before it has seen any honest client's coin, every honest client in ``L`` contributes a
   uniform ``r_u`` hidden by its commitment until then, and a reveal cannot be changed afterwards
   (SHA-256 binds). After the reveals the server's only choices are to go on or to abort - every reveal of
   ``L`` is needed (a missing one aborts the round, :meth:`_SignedServer._close`), so dropping a revealer
   it does not like costs it a *restart*, with fresh coins: ``m`` restarts give it the best of ``m``
   independent uniform graphs, never a graph of its choice (``docs/secagg-masking.md`` has the bound).
   A server that shows different clients different lists gives them different seeds; the consistency
   round (3.) binds the seed, so at most one seed can ever be unmasked under.
3. a **consistency-check round** (``consistency``, between ``mask`` and ``unmask``): the server announces
   the survivor set ``A2``; each client checks it (as the unsigned protocol does before unmasking) and
   answers ``Sign(sk_u, ctx("masking/survivors") ‖ seed ‖ A2)``. The unmask request carries the set and the
   signatures the server collected; a client reveals shares only if the set is the one *it* signed (under
   the graph seed it derived) and at least ``max(t, ⌊(n + c)/2⌋ + 1)`` distinct rostered survivors signed
   it too, for ``c`` tolerated corrupt clients (:func:`signatures_needed`; SecAgg+'s ``t`` counts only a
   neighbourhood). A server that tells different clients different survivor sets (to collect ``t`` shares
   of both ``b_u`` and ``s_u`` of one client ``u``, which unmasks ``x_u``) or different graphs gets no
   share from an honest client shown a set it did not sign, and cannot gather a majority of signatures on
   each of two sets from honest clients who sign only one.

What it protects (after Bonawitz et al., Thm. A.2/A.3): against a malicious server colluding with fewer
than ``t`` clients, and at most ``max_corrupt`` corrupt clients (a corrupt client can sign two sets; the
signature count :func:`signatures_needed` exceeds ``(n + max_corrupt)/2``, so two sets are never both
accepted), the server learns nothing beyond sums over at least ``t`` inputs (and at least
``RoundSpec.min_contributors``). A round therefore needs more than ``(n + c)/2`` of its participants to
survive to the consistency round, and every client that advertised to reveal its coin. With SecAgg+'s
sparse graph the condition is per neighbourhood and holds only with the probability Bell et al. bound, now
over a graph no party chose; ``docs/secagg-masking.md`` gives the numbers. The server still chooses
*which* honest clients it drops: selective dropping is within its power and the threshold bounds how small
a sum it can obtain. A client must take part in a round id at most once (the trainer does): two
sessions of one round would give the server two coin flips.

Ed25519 signing is deterministic; all other randomness (keys, masks, coins) is the client's (OS entropy
by default).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedguard import wire
from fedguard.errors import ConfigError, MessageError
from fedguard.federation.protocol import AggregateResult, ClientSide, Outbox, RoundSpec, ServerSide
from fedguard.identity import SIGNATURE_BYTES, Identity, Roster, signed_context
from fedguard.rng import SecureRNG
from fedguard.secagg.identity_files import load_client_identity
from fedguard.secagg.masking.aggregator import (
    _ADVERTISE_REQ,
    _KEYS,
    _SHARE_REQ,
    ADVERTISE,
    MASK,
    SHARE,
    UNMASK,
    MaskingAggregator,
    MaskingParams,
    _check_increasing,
    _ClientKeys,
    _ids,
    _MaskingClient,
    _MaskingServer,
    _rows,
)
from fedguard.secagg.masking.crypto import KEY_BYTES, commit_seed, generate_private_key, public_bytes
from fedguard.secagg.masking.graph import CommunicationGraph
from fedguard.secagg.masking.options import MaskingOptions, SignedMaskingOptions
from fedguard.wire import Message, MessageSchema

COIN = "coin"
CONSISTENCY = "consistency"
SIGNED_STAGES: tuple[str, ...] = (ADVERTISE, COIN, SHARE, MASK, CONSISTENCY, UNMASK)
PURPOSE_KEYS = "masking/keys"
PURPOSE_COIN = "masking/coin"
PURPOSE_SURVIVORS = "masking/survivors"
COIN_BYTES = 32
"""Bytes of each client's coin ``r_u`` (and of its commitment ``h_u``)."""
_SEED_DOMAIN = b"fedguard/secagg/graph-seed/v1\x00"
_KEPT_GRAPHS = 16

_SIGNED_ADVERTISE_REQ = MessageSchema(kind="masking/signed-advertise-request", meta=dict(_ADVERTISE_REQ.meta))
_SIGNED_KEYS = MessageSchema(kind="masking/signed-keys",
                             arrays={**_KEYS.arrays, "coin_commitment": ("|u1", 1), "sig": ("|u1", 1)})
_COIN_REQ = MessageSchema(kind="masking/coin-request", arrays={"clients": ("<i8", 1), "commitments": ("|u1", 2)})
_COIN = MessageSchema(kind="masking/coin-reveal", arrays={"coin": ("|u1", 1)})
_SIGNED_SHARE_REQ = MessageSchema(kind="masking/signed-share-request",
                                  arrays={**_SHARE_REQ.arrays, "sigs": ("|u1", 2), "coins": ("|u1", 2)})
_CONSISTENCY_REQ = MessageSchema(kind="masking/consistency-request", arrays={"survivors": ("<i8", 1)})
_CONSISTENCY = MessageSchema(kind="masking/survivors-signature", arrays={"sig": ("|u1", 1)})
_SIGNED_UNMASK_REQ = MessageSchema(kind="masking/signed-unmask-request",
                                   arrays={"survivors": ("<i8", 1), "signers": ("<i8", 1), "sigs": ("|u1", 2)})
_SIGNED_REPLIES = {ADVERTISE: _SIGNED_KEYS, COIN: _COIN, CONSISTENCY: _CONSISTENCY}  # the other stages: the base's


def signatures_needed(spec: RoundSpec, params: MaskingParams, max_corrupt: int = 0) -> int:
    """Valid signatures on one survivor set before a client reveals: ``max(t, ⌊(n + c)/2⌋ + 1)`` for ``n``
    participants and at most ``c = max_corrupt`` corrupt clients. Honest clients sign one set each, corrupt
    ones may sign both; two different sets both reach ``s`` signatures only if ``2s <= n + c``, so with
    ``s > (n + c)/2`` at most one set is ever accepted (Bonawitz et al.'s ``t > (n + c)/2`` condition).
    ``t`` alone would not do for SecAgg+, whose ``t`` counts a neighbourhood, not the round. The price is
    liveness: more than ``(n + c)/2`` clients must survive to the consistency round."""
    return max(params.threshold, (spec.n_clients + max_corrupt) // 2 + 1)


def keys_body(coin_commitment: bytes, c_key: bytes, s_key: bytes) -> bytes:
    """What a client's key signature covers besides the context: its coin commitment and its two keys."""
    return coin_commitment + c_key + s_key


def coin_commitment(coin: bytes, *, deployment: str, round_id: int, client: int) -> bytes:
    """``h_u = SHA-256(ctx("masking/coin", deployment, round, u) ‖ r_u)``: binding (SHA-256's collision
    resistance) and hiding (``r_u`` is 256 uniform bits) - a reveal cannot be changed once committed."""
    return hashlib.sha256(signed_context(PURPOSE_COIN, deployment=deployment, round_id=round_id, client=client,
                                         body=coin)).digest()


def graph_seed_from_coins(*, deployment: str, round_id: int, clients: list[int], commitments: list[bytes],
                          coins: list[bytes]) -> bytes:
    """The round's graph seed: ``SHA-256(domain ‖ deployment ‖ round ‖ |L| ‖ (v ‖ h_v ‖ r_v) for v ∈ L)``
    over the commitment list ``L`` (ids increasing) and every reveal. Uniform as long as one coin in ``L``
    is uniform and was hidden when ``L`` was fixed (random-oracle view of SHA-256)."""
    if not len(clients) == len(commitments) == len(coins):
        raise ConfigError("clients, commitments and coins must have the same length")
    dep = deployment.encode()
    h = hashlib.sha256(_SEED_DOMAIN + struct.pack("<I", len(dep)) + dep + struct.pack("<qQ", round_id, len(clients)))
    for v, hv, rv in zip(clients, commitments, coins, strict=True):
        h.update(struct.pack("<q", v) + hv + rv)
    return h.digest()


def survivors_body(graph_seed: bytes, survivors: list[int] | tuple[int, ...]) -> bytes:
    """What a consistency signature covers besides the context: the graph seed the client derived and the
    sorted survivor ids as int64 (so a client signs one graph and one survivor set)."""
    return graph_seed + np.asarray(survivors, dtype="<i8").tobytes()


class _SignedServer(_MaskingServer):
    stages = SIGNED_STAGES

    def __init__(self, spec: RoundSpec, params: MaskingParams, unmask_workers: int, roster: Roster,
                 max_corrupt: int, on_graph: Any = None) -> None:
        # the graph is drawn when the coin stage closes; until then a placeholder that nothing reads
        placeholder = bytes(32)
        super().__init__(spec, params, CommunicationGraph.harary(spec.participants, params.neighbours, placeholder),
                         placeholder, unmask_workers)
        self.roster = roster
        self._needed = signatures_needed(spec, params, max_corrupt)
        self._on_graph = on_graph
        self._advertised: dict[int, Message] = {}
        self._coin_list: list[int] = []
        self._coin_commitments: dict[int, bytes] = {}
        self._key_sigs: dict[int, bytes] = {}
        self._survivors: tuple[int, ...] = ()
        self.graph_seed = b""
        """The round's graph seed once the coin stage has closed (empty before)."""

    def min_replies(self, stage: str) -> int:
        return self._needed if stage == CONSISTENCY else self.threshold

    def _schema(self, stage: str) -> MessageSchema:
        return _SIGNED_REPLIES[stage] if stage in _SIGNED_REPLIES else super()._schema(stage)

    def _open(self) -> Outbox:
        meta = {"vector_length": self.spec.vector_length, "ring_bits": self.spec.ring_bits,
                "threshold": self.params.threshold, "neighbours": self.params.neighbours}
        return {c: self._message(ADVERTISE, c, kind=_SIGNED_ADVERTISE_REQ.kind, meta=meta)
                for c in self.spec.participants}

    def _check_reply(self, stage: str, msg: Message) -> None:
        u, rid, dep = msg.sender, self.spec.round_id, self.roster.deployment
        if stage == ADVERTISE:
            super()._check_reply(stage, msg)
            h = msg.blob("coin_commitment")
            if len(h) != COIN_BYTES:
                raise MessageError(f"coin_commitment of client {u} must be {COIN_BYTES} bytes, got {len(h)}")
            body = keys_body(h, msg.blob("c_key"), msg.blob("s_key"))
            if not self.roster.verify(PURPOSE_KEYS, round_id=rid, client=u, body=body, signature=msg.blob("sig")):
                raise MessageError(f"client {u}'s signature on its round keys does not verify against the roster")
        elif stage == COIN:
            coin = msg.blob("coin")
            if len(coin) != COIN_BYTES or not hmac.compare_digest(
                    coin_commitment(coin, deployment=dep, round_id=rid, client=u), self._coin_commitments[u]):
                raise MessageError(f"client {u}'s coin does not open its commitment")
        elif stage == CONSISTENCY:
            if not self.roster.verify(PURPOSE_SURVIVORS, round_id=rid, client=u,
                                      body=survivors_body(self.graph_seed, self._survivors), signature=msg.blob("sig")):
                raise MessageError(f"client {u}'s signature on the survivor set does not verify")
        else:
            super()._check_reply(stage, msg)

    def _close(self, stage: str, replies: dict[int, Message]) -> Outbox | AggregateResult:
        if stage == ADVERTISE:
            self._advertised = dict(replies)
            self._coin_list = sorted(replies)
            self._coin_commitments = {u: replies[u].blob("coin_commitment") for u in self._coin_list}
            self._key_sigs = {u: replies[u].blob("sig") for u in self._coin_list}
            arrays = {"clients": np.array(self._coin_list, dtype=np.int64),
                      "commitments": _rows([self._coin_commitments[u] for u in self._coin_list], COIN_BYTES)}
            return {u: self._message(COIN, u, kind=_COIN_REQ.kind, arrays=arrays) for u in self._coin_list}
        if stage == COIN:
            return self._close_coin(replies)
        if stage == MASK:
            self._close_mask(replies)  # min_contributors, connectivity, the masked sum
            self._survivors = tuple(sorted(replies))
            survivors = np.array(self._survivors, dtype=np.int64)
            return {u: self._message(CONSISTENCY, u, kind=_CONSISTENCY_REQ.kind, arrays={"survivors": survivors})
                    for u in self._survivors}
        if stage == CONSISTENCY:
            signers = sorted(replies)
            arrays = {"survivors": np.array(self._survivors, dtype=np.int64),
                      "signers": np.array(signers, dtype=np.int64),
                      "sigs": _rows([replies[s].blob("sig") for s in signers], SIGNATURE_BYTES)}
            return {u: self._message(UNMASK, u, kind=_SIGNED_UNMASK_REQ.kind, arrays=arrays) for u in signers}
        return super()._close(stage, replies)

    def _close_coin(self, replies: dict[int, Message]) -> Outbox:
        """Every client of the commitment list must have revealed: the seed is a function of all the coins,
        so that nobody (the server, a colluding client) can pick among seeds by dropping a revealer."""
        missing = sorted(set(self._coin_list) - set(replies))
        if missing:
            raise self._abort(COIN, f"clients {missing} committed to a coin but did not reveal it: the graph seed "
                                    "needs every committed coin (else dropping a revealer would choose among "
                                    "graphs); restart the round with fresh coins")
        coins = [replies[u].blob("coin") for u in self._coin_list]
        self.graph_seed = graph_seed_from_coins(
            deployment=self.roster.deployment, round_id=self.spec.round_id, clients=self._coin_list,
            commitments=[self._coin_commitments[u] for u in self._coin_list], coins=coins)
        self.graph = CommunicationGraph.harary(self.spec.participants, self.params.neighbours, self.graph_seed)
        self._graph_seed = self.graph_seed
        if self._on_graph is not None:
            self._on_graph(self.spec, self.graph)
        plain = self._close_advertise(self._advertised)
        coin_rows = _rows(coins, COIN_BYTES)
        out: Outbox = {}
        for u, payload in plain.items():
            msg = wire.decode(payload)
            nbrs = _ids(msg.arrays["neighbours"])
            arrays = {**msg.arrays, "sigs": _rows([self._key_sigs[v] for v in nbrs], SIGNATURE_BYTES),
                      "coins": coin_rows}
            out[u] = self._message(SHARE, u, kind=_SIGNED_SHARE_REQ.kind, arrays=arrays)
        return out


class _SignedClient(_MaskingClient):
    stages = SIGNED_STAGES

    def __init__(self, spec: RoundSpec, client_id: int, ring_input: np.ndarray, params: MaskingParams,
                 rng: SecureRNG, identity: Identity, roster: Roster, max_corrupt: int) -> None:
        super().__init__(spec, client_id, ring_input, params, rng)
        self.identity, self.roster = identity, roster
        self._needed = signatures_needed(spec, params, max_corrupt)
        self._drawn: tuple[X25519PrivateKey, X25519PrivateKey, bytes] | None = None  # c_sk, s_sk, b_seed
        self._coin = b""
        self._coin_commitment = b""
        self._coin_list: list[int] = []
        self._coin_commitments: list[bytes] = []
        self.graph_seed = b""
        """The graph seed this client derived from the coins (empty before the share stage)."""
        self._signed_survivors: tuple[int, ...] | None = None

    @property
    def graph(self) -> CommunicationGraph | None:
        """The communication graph this client derived (``None`` before the share stage)."""
        return None if self._keys is None else self._keys.graph

    def _sign(self, purpose: str, body: bytes) -> np.ndarray:
        sig = self.identity.sign(purpose, deployment=self.roster.deployment, round_id=self.spec.round_id, body=body)
        return np.frombuffer(sig, dtype=np.uint8)

    def _respond(self, stage: str, msg: Message) -> bytes:
        if stage == ADVERTISE:
            return self._signed_advertise(msg)
        if stage == COIN:
            return self._reveal_coin(msg)
        if stage == SHARE:
            return self._signed_share(msg)
        if stage == CONSISTENCY:
            return self._consistency(msg)
        if stage == UNMASK:
            return self._signed_unmask(msg)
        return super()._respond(stage, msg)

    def _signed_advertise(self, msg: Message) -> bytes:
        _SIGNED_ADVERTISE_REQ.validate(msg)
        self._check_params(msg)
        rng, rid, me = self._rng, self.spec.round_id, self.client_id
        c_sk, s_sk, b_seed, coin = generate_private_key(rng), generate_private_key(rng), rng.bytes(KEY_BYTES), \
            rng.bytes(COIN_BYTES)
        h = coin_commitment(coin, deployment=self.roster.deployment, round_id=rid, client=me)
        c_pk, s_pk = public_bytes(c_sk), public_bytes(s_sk)
        self._drawn, self._coin, self._coin_commitment = (c_sk, s_sk, b_seed), coin, h
        return self._reply(kind=_SIGNED_KEYS.kind, arrays={
            "c_key": np.frombuffer(c_pk, dtype=np.uint8),
            "s_key": np.frombuffer(s_pk, dtype=np.uint8),
            "commitment": np.frombuffer(commit_seed(b_seed, round_id=rid, client=me), dtype=np.uint8),
            "coin_commitment": np.frombuffer(h, dtype=np.uint8),
            "sig": self._sign(PURPOSE_KEYS, keys_body(h, c_pk, s_pk)),
        })

    def _reveal_coin(self, msg: Message) -> bytes:
        """Reveal ``r_u`` once the list of commitments is fixed (in this client's view)."""
        _COIN_REQ.validate(msg)
        clients = _ids(msg.arrays["clients"])
        _check_increasing(clients, "clients")
        commitments = msg.arrays["commitments"]
        if commitments.shape != (len(clients), COIN_BYTES):
            raise MessageError(f"commitments must have shape ({len(clients)}, {COIN_BYTES}), got {commitments.shape}")
        foreign = set(clients) - set(self.spec.participants)
        if foreign:
            raise self._violation(msg, f"clients {sorted(foreign)} in the commitment list are not participants")
        me = self.client_id
        if me not in clients or commitments[clients.index(me)].tobytes() != self._coin_commitment:
            raise self._violation(msg, "my coin commitment is missing from the list or altered")
        if len(clients) < self._needed:
            raise self._violation(msg, f"only {len(clients)} clients committed; the consistency round needs "
                                       f"{self._needed} signatures: the round cannot complete")
        self._coin_list, self._coin_commitments = clients, [row.tobytes() for row in commitments]
        return self._reply(kind=_COIN.kind, arrays={"coin": np.frombuffer(self._coin, dtype=np.uint8)})

    def _signed_share(self, msg: Message) -> bytes:
        _SIGNED_SHARE_REQ.validate(msg)
        if self._drawn is None:  # the stage machine runs advertise first
            raise self._violation(msg, "no keys: the advertise stage has not run")
        rid, dep, me = self.spec.round_id, self.roster.deployment, self.client_id
        coins = msg.arrays["coins"]
        if coins.shape != (len(self._coin_list), COIN_BYTES):
            raise MessageError(f"coins must have shape ({len(self._coin_list)}, {COIN_BYTES}), got {coins.shape}")
        revealed = [row.tobytes() for row in coins]
        for v, hv, rv in zip(self._coin_list, self._coin_commitments, revealed, strict=True):
            if not hmac.compare_digest(coin_commitment(rv, deployment=dep, round_id=rid, client=v), hv):
                raise self._violation(msg, f"the coin relayed for client {v} does not open its commitment: "
                                           "round refused")
        seed = graph_seed_from_coins(deployment=dep, round_id=rid, clients=self._coin_list,
                                     commitments=self._coin_commitments, coins=revealed)
        graph = CommunicationGraph.harary(self.spec.participants, self.params.neighbours, seed)
        nbrs = _ids(msg.arrays["neighbours"])
        _check_increasing(nbrs, "neighbours")
        expected = sorted(graph.neighbours(me) & set(self._coin_list))
        if nbrs != expected:
            raise self._violation(msg, f"neighbours {nbrs} differ from my neighbours {expected} in the graph drawn "
                                       "from the coins")
        sigs, c_keys, s_keys = msg.arrays["sigs"], msg.arrays["c_keys"], msg.arrays["s_keys"]
        if sigs.shape != (len(nbrs), SIGNATURE_BYTES) or c_keys.shape[0] != len(nbrs) or s_keys.shape[0] != len(nbrs):
            raise MessageError(f"sigs must have shape ({len(nbrs)}, {SIGNATURE_BYTES}), got {sigs.shape}")
        position = {v: i for i, v in enumerate(self._coin_list)}
        for i, v in enumerate(nbrs):
            if v not in self.roster.keys:
                raise self._violation(msg, f"client {v} is not on the roster (a Sybil)")
            body = keys_body(self._coin_commitments[position[v]], c_keys[i].tobytes(), s_keys[i].tobytes())
            if not self.roster.verify(PURPOSE_KEYS, round_id=rid, client=v, body=body, signature=sigs[i].tobytes()):
                raise self._violation(msg, f"the keys relayed for client {v} are not signed by client {v} for this "
                                           f"round and coin commitment: substituted or replayed; round refused")
        c_sk, s_sk, b_seed = self._drawn
        self._keys, self.graph_seed = _ClientKeys(graph, c_sk, s_sk, b_seed), seed
        plain = Message(kind=_SHARE_REQ.kind, round=msg.round, stage=msg.stage, sender=msg.sender,
                        recipient=msg.recipient, meta=msg.meta,
                        arrays={k: v for k, v in msg.arrays.items() if k not in ("sigs", "coins")})
        try:
            return self._share(plain)
        except BaseException:
            self._keys, self.graph_seed = None, b""  # a refused message changes nothing
            raise

    def _consistency(self, msg: Message) -> bytes:
        _CONSISTENCY_REQ.validate(msg)
        survivors = _ids(msg.arrays["survivors"])
        self._check_survivors(msg, survivors)
        self._signed_survivors = tuple(survivors)
        return self._reply(kind=_CONSISTENCY.kind, arrays={
            "sig": self._sign(PURPOSE_SURVIVORS, survivors_body(self.graph_seed, survivors))})

    def _signed_unmask(self, msg: Message) -> bytes:
        _SIGNED_UNMASK_REQ.validate(msg)
        survivors = _ids(msg.arrays["survivors"])
        if self._signed_survivors is None or tuple(survivors) != self._signed_survivors:
            raise self._violation(msg, f"the survivor set {survivors} differs from the one I signed "
                                       f"{list(self._signed_survivors or ())}: equivocation, nothing revealed")
        signers = _ids(msg.arrays["signers"])
        _check_increasing(signers, "signers")
        sigs = msg.arrays["sigs"]
        if sigs.shape != (len(signers), SIGNATURE_BYTES):
            raise MessageError(f"sigs must have shape ({len(signers)}, {SIGNATURE_BYTES}), got {sigs.shape}")
        body, rid = survivors_body(self.graph_seed, survivors), self.spec.round_id
        needed = self._needed
        outside = set(signers) - set(survivors)
        if outside:
            raise self._violation(msg, f"signers {sorted(outside)} are not survivors")
        valid, bad = 0, []
        for i, signer in enumerate(signers):  # stop as soon as enough verify (the cost is ~needed checks)
            if self.roster.verify(PURPOSE_SURVIVORS, round_id=rid, client=signer, body=body,
                                  signature=sigs[i].tobytes()):
                valid += 1
                if valid >= needed:
                    break
            else:
                bad.append(signer)
        if valid < needed:
            raise self._violation(msg, f"only {valid} valid signatures on the survivor set and graph; {needed} "
                                       f"are needed (signatures of {bad} do not verify): nothing revealed")
        return self._reveal(set(survivors))


class SignedMaskingAggregator(MaskingAggregator):
    """:class:`MaskingAggregator` against an active server (see the module docstring); ``aggregator:
    masking-signed`` in a config, with :class:`~fedguard.secagg.masking.options.SignedMaskingOptions`.

    Args:
        options: :class:`SignedMaskingOptions` (the masking options plus ``roster_file``,
            ``identity_files``, ``max_corrupt``), a mapping of them, or ``None``; keyword arguments named
            like its fields override it.
        roster: every participant's public identity, known to every client out of band (default: loaded
            from ``roster_file``; one of the two is required).
        identities: the signing identities of the clients this process plays (an in-process simulation
            holds all of them; a client's process would hold only its own). Default: loaded on first use
            from ``identity_files``.
        rng: not used for the graph (the clients' coins draw it); accepted for the interface.
    """

    name: ClassVar[str] = "masking-signed"
    stages: ClassVar[tuple[str, ...]] = SIGNED_STAGES
    options_class: ClassVar[type[MaskingOptions]] = SignedMaskingOptions

    def __init__(self, options: SignedMaskingOptions | Mapping[str, Any] | None = None, *,
                 roster: Roster | None = None, identities: Mapping[int, Identity] | None = None,
                 rng: SecureRNG | None = None, **fields: Any) -> None:
        super().__init__(options, rng=rng, **fields)
        opts = self.options
        if not isinstance(opts, SignedMaskingOptions):  # options_class guarantees it
            raise ConfigError(f"options must be SignedMaskingOptions, got {type(opts).__name__}")
        self.max_corrupt = opts.max_corrupt
        if roster is None:
            if opts.roster_file is None:
                raise ConfigError("aggregator 'masking-signed' needs the clients' roster: set "
                                  "aggregator_options.roster_file (made with `fedguard roster add`)")
            roster = Roster.load(opts.roster_file)
        if not isinstance(roster, Roster):
            raise ConfigError(f"roster must be a Roster, got {type(roster).__name__}")
        self.roster = roster
        self._identity_files = opts.identity_files
        self.identities: dict[int, Identity] = {}
        for cid, ident in dict(identities or {}).items():
            self._check_identity(cid, ident)
            self.identities[cid] = ident
        self._graphs: OrderedDict[tuple[int, tuple[int, ...]], CommunicationGraph] = OrderedDict()

    def __repr__(self) -> str:
        return (f"SignedMaskingAggregator(neighbours={self.neighbours!r}, threshold={self._threshold!r}, "
                f"deployment={self.roster.deployment!r}, max_corrupt={self.max_corrupt})")

    def _check_identity(self, cid: int, ident: Identity) -> None:
        if cid not in self.roster.keys or self.roster.keys[cid] != ident.public_key or ident.client_id != cid:
            raise ConfigError(f"the identity given for client {cid} is not the one on the roster of deployment "
                              f"{self.roster.deployment!r}")

    def identity(self, client: int) -> Identity:
        """Client ``client``'s signing identity (loaded from ``identity_files`` on first use);
        :class:`ConfigError` naming the client when this process has none."""
        if client in self.identities:
            return self.identities[client]
        if self._identity_files is not None:
            ident = self.identities[client] = load_client_identity(self._identity_files, client, self.roster)
            return ident
        raise ConfigError(f"no signing identity for client {client} in this process")

    def _check_roster(self, spec: RoundSpec) -> None:
        missing = sorted(set(spec.participants) - set(self.roster.keys))
        if missing:
            raise ConfigError(f"participants {missing} are not on the roster of deployment {self.roster.deployment!r}")

    def check_clients(self, n_clients: int) -> None:
        """The masking rules, and a roster with at least ``n_clients`` clients."""
        super().check_clients(n_clients)
        if len(self.roster.keys) < n_clients:
            raise ConfigError(f"the roster of deployment {self.roster.deployment!r} lists {len(self.roster.keys)} "
                              f"clients; a round of {n_clients} needs each of them on it (`fedguard roster add`)")

    def check_round(self, spec: RoundSpec) -> None:
        """The masking rules, every participant on the roster and, when ``identity_files`` is set (a
        process that plays the clients), an identity for each: a missing one is named."""
        super().check_round(spec)
        self._check_roster(spec)
        if self._identity_files is not None:
            problems = []
            for c in spec.participants:
                try:
                    self.identity(c)
                except ConfigError as err:
                    problems.append(str(err))
            if problems:
                raise ConfigError.collect(problems)

    def graph_seed(self, spec: RoundSpec) -> bytes:
        """Not known before the round: the clients' coin flip draws it (see the module docstring)."""
        raise ConfigError("the signed protocol's graph seed is drawn by the clients' coin flip during the round; "
                          "read it from the server side after the coin stage (server.graph_seed)")

    def _remember(self, spec: RoundSpec, graph: CommunicationGraph) -> None:
        key = (spec.round_id, spec.participants)
        self._graphs[key] = graph
        self._graphs.move_to_end(key)
        while len(self._graphs) > _KEPT_GRAPHS:
            self._graphs.popitem(last=False)

    def graph(self, spec: RoundSpec) -> CommunicationGraph:
        """The round's communication graph: for the complete graph (classic SecAgg) any seed gives it; for
        SecAgg+ it is the graph the coin flip of a round served by this aggregator drew (one of the last
        16), and :class:`ConfigError` before that round has passed its coin stage."""
        params = self.params(spec.n_clients)
        if params.neighbours == spec.n_clients - 1:
            return CommunicationGraph.harary(spec.participants, params.neighbours, bytes(32))
        graph = self._graphs.get((spec.round_id, spec.participants))
        if graph is None:
            raise ConfigError(f"the SecAgg+ graph of round {spec.round_id} is drawn by the clients' coin flip; it is "
                              "known only after a server of this aggregator has closed that round's coin stage")
        return graph

    def server(self, spec: RoundSpec, *, rng: SecureRNG | None = None) -> ServerSide:
        self._check_roster(spec)
        return _SignedServer(spec, self.params(spec.n_clients), self.unmask_workers, self.roster, self.max_corrupt,
                             on_graph=self._remember)

    def client(self, spec: RoundSpec, client_id: int, ring_input: np.ndarray, *, rng: SecureRNG | None = None
               ) -> ClientSide:
        return _SignedClient(spec, client_id, ring_input, self.params(spec.n_clients),
                             rng if rng is not None else SecureRNG(), self.identity(client_id), self.roster,
                             self.max_corrupt)

    def survives(self, spec: RoundSpec, alive_per_stage: list[set[int]]) -> bool:
        """Whether the round completes: every client that advertised reveals its coin, at least
        :func:`signatures_needed` of them survive to sign the survivor set, and the masking rules hold on
        the drawn graph (the unmask stage's responders being those that also signed). The graph-free rules
        are checked first; when they pass, a SecAgg+ graph must be known (:meth:`graph`)."""
        if len(alive_per_stage) != len(SIGNED_STAGES):
            raise ConfigError(f"alive_per_stage needs one set per stage {SIGNED_STAGES}, got {len(alive_per_stage)}")
        params = self.params(spec.n_clients)
        s0, s1, s2, s3, s4, s5 = (set(a) & set(spec.participants) for a in alive_per_stage)
        a0 = s0
        if len(a0) < params.threshold or not a0 <= s1:  # too few advertised, or a committed coin unrevealed
            return False
        if len(a0) < signatures_needed(spec, params, self.max_corrupt):  # clients refuse the coin list
            return False
        chain, previous = [], a0
        for alive in (s2, s3, s4, s5):
            previous = previous & alive
            chain.append(previous)
        a1, a2, consistent, a3 = chain
        if len(a2) < spec.min_contributors or any(len(a) < params.threshold for a in (a1, a2, a3)):
            return False
        if len(consistent) < signatures_needed(spec, params, self.max_corrupt):
            return False
        return super().survives(spec, [a0, a1, a2, a3])
