"""SecAgg / SecAgg+ against an *active* server: signed round keys and a consistency-check round.

Bonawitz et al. (CCS 2017, §4 and Fig. 4, "active adversary") make pairwise masking hold against a server
that deviates from the protocol by giving every client a long-term signing key whose public half every
other client knows out of band (:class:`~fedguard.identity.Roster`), and by adding one round. This module
is :class:`SignedMaskingAggregator`: the protocol of :mod:`fedguard.secagg.masking.aggregator` with

1. **signed round keys** (``advertise``): client ``u`` sends ``σ_u = Sign(sk_u, ctx("masking/keys") ‖
   graph_seed ‖ c_pk_u ‖ s_pk_u)`` with its keys, where ``ctx`` binds the deployment, the round and
   ``u`` (:func:`fedguard.identity.signed_context`). The server relays ``σ_v`` with each neighbour's keys;
   a client refuses the share request when any relayed signature fails (``share``): a substituted key, a
   key replayed from another round or deployment, a key of a client not on the roster (a Sybil), or a
   graph seed that differs between clients (graph equivocation) - every one changes the signed bytes.
2. a **consistency-check round** (``consistency``, between ``mask`` and ``unmask``): the server announces
   the survivor set ``A2``; each client checks it (as the unsigned protocol does before unmasking) and
   answers ``Sign(sk_u, ctx("masking/survivors") ‖ A2)``. The unmask request carries the set and the
   signatures the server collected; a client reveals shares only if the set is the one *it* signed and
   at least ``max(t, ⌊(n + c)/2⌋ + 1)`` distinct rostered survivors signed it too, for ``c`` tolerated
   corrupt clients (:func:`signatures_needed`; SecAgg+'s ``t`` counts only a neighbourhood). A server that tells different clients
   different survivor sets (to collect ``t`` shares of both ``b_u`` and ``s_u`` of one client ``u``, which
   unmasks ``x_u``) gets no share from an honest client shown a set it did not sign, and cannot gather
   a majority of signatures on each of two sets from honest clients who sign only one.

What it protects (after Bonawitz et al., Thm. A.2/A.3): against a malicious server colluding with fewer
than ``t`` clients, and at most ``max_corrupt`` corrupt clients (a corrupt client can sign two sets; the
signature count :func:`signatures_needed` exceeds ``(n + max_corrupt)/2``, so two sets are never both
accepted),
the server learns nothing beyond sums over at least ``t`` inputs (and at least
``RoundSpec.min_contributors``). A round therefore needs more than ``(n + c)/2`` of its participants to
survive to the consistency round. With SecAgg+'s sparse graph the condition is per neighbourhood and holds
only with the probability Bell et al. bound; ``docs/secagg-masking.md`` gives the numbers. The server
still chooses *which* honest clients it drops: selective dropping is within its power and the threshold
bounds how small a sum it can obtain.

Ed25519 signing is deterministic; all other randomness is the base protocol's (OS entropy by default).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from fedguard import wire
from fedguard.checks import int_problem
from fedguard.errors import ConfigError, MessageError
from fedguard.federation.protocol import AggregateResult, ClientSide, Outbox, RoundSpec, ServerSide
from fedguard.identity import SIGNATURE_BYTES, Identity, Roster
from fedguard.rng import SecureRNG
from fedguard.secagg.masking.aggregator import (
    _ADVERTISE_REQ,
    _KEYS,
    _REPLY_SCHEMAS,
    _SHARE_REQ,
    ADVERTISE,
    MASK,
    SHARE,
    UNMASK,
    MaskingAggregator,
    MaskingParams,
    _check_increasing,
    _ids,
    _MaskingClient,
    _MaskingServer,
    _rows,
)
from fedguard.secagg.masking.graph import CommunicationGraph
from fedguard.secagg.masking.options import MaskingOptions
from fedguard.wire import Message, MessageSchema

CONSISTENCY = "consistency"
SIGNED_STAGES: tuple[str, ...] = (ADVERTISE, SHARE, MASK, CONSISTENCY, UNMASK)
PURPOSE_KEYS = "masking/keys"
PURPOSE_SURVIVORS = "masking/survivors"

_SIGNED_KEYS = MessageSchema(kind="masking/signed-keys",
                             arrays={**_KEYS.arrays, "sig": ("|u1", 1)})
_SIGNED_SHARE_REQ = MessageSchema(kind="masking/signed-share-request",
                                  arrays={**_SHARE_REQ.arrays, "sigs": ("|u1", 2)})
_CONSISTENCY_REQ = MessageSchema(kind="masking/consistency-request", arrays={"survivors": ("<i8", 1)})
_CONSISTENCY = MessageSchema(kind="masking/survivors-signature", arrays={"sig": ("|u1", 1)})
_SIGNED_UNMASK_REQ = MessageSchema(kind="masking/signed-unmask-request",
                                   arrays={"survivors": ("<i8", 1), "signers": ("<i8", 1), "sigs": ("|u1", 2)})
_SIGNED_REPLIES = {**_REPLY_SCHEMAS, ADVERTISE: _SIGNED_KEYS, CONSISTENCY: _CONSISTENCY}


def signatures_needed(spec: RoundSpec, params: MaskingParams, max_corrupt: int = 0) -> int:
    """Valid signatures on one survivor set before a client reveals: ``max(t, ⌊(n + c)/2⌋ + 1)`` for ``n``
    participants and at most ``c = max_corrupt`` corrupt clients. Honest clients sign one set each, corrupt
    ones may sign both; two different sets both reach ``s`` signatures only if ``2s <= n + c``, so with
    ``s > (n + c)/2`` at most one set is ever accepted (Bonawitz et al.'s ``t > (n + c)/2`` condition).
    ``t`` alone would not do for SecAgg+, whose ``t`` counts a neighbourhood, not the round. The price is
    liveness: more than ``(n + c)/2`` clients must survive to the consistency round."""
    return max(params.threshold, (spec.n_clients + max_corrupt) // 2 + 1)


def keys_body(graph_seed: bytes, c_key: bytes, s_key: bytes) -> bytes:
    """What a client's key signature covers besides the context: the graph seed it was told and its keys."""
    return graph_seed + c_key + s_key


def survivors_body(survivors: list[int] | tuple[int, ...]) -> bytes:
    """What a consistency signature covers besides the context: the sorted survivor ids as int64."""
    return np.asarray(survivors, dtype="<i8").tobytes()


class _SignedServer(_MaskingServer):
    stages = SIGNED_STAGES

    def __init__(self, spec: RoundSpec, params: MaskingParams, graph: CommunicationGraph, graph_seed: bytes,
                 unmask_workers: int, roster: Roster, max_corrupt: int) -> None:
        super().__init__(spec, params, graph, graph_seed, unmask_workers)
        self.roster = roster
        self._needed = signatures_needed(spec, params, max_corrupt)
        self._key_sigs: dict[int, bytes] = {}
        self._survivors: tuple[int, ...] = ()

    def min_replies(self, stage: str) -> int:
        return self._needed if stage == CONSISTENCY else self.threshold

    def _schema(self, stage: str) -> MessageSchema:
        return _SIGNED_REPLIES[stage]

    def _check_reply(self, stage: str, msg: Message) -> None:
        u, rid = msg.sender, self.spec.round_id
        if stage == ADVERTISE:
            super()._check_reply(stage, msg)
            body = keys_body(self._graph_seed, msg.blob("c_key"), msg.blob("s_key"))
            if not self.roster.verify(PURPOSE_KEYS, round_id=rid, client=u, body=body, signature=msg.blob("sig")):
                raise MessageError(f"client {u}'s signature on its round keys does not verify against the roster")
        elif stage == CONSISTENCY:
            if not self.roster.verify(PURPOSE_SURVIVORS, round_id=rid, client=u, body=survivors_body(self._survivors),
                                      signature=msg.blob("sig")):
                raise MessageError(f"client {u}'s signature on the survivor set does not verify")
        else:
            super()._check_reply(stage, msg)

    def _close(self, stage: str, replies: dict[int, Message]) -> Outbox | AggregateResult:
        if stage == ADVERTISE:
            return self._close_signed_advertise(replies)
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

    def _close_signed_advertise(self, replies: dict[int, Message]) -> Outbox:
        plain = super()._close_advertise(replies)
        self._key_sigs = {u: replies[u].blob("sig") for u in replies}
        out: Outbox = {}
        for u, payload in plain.items():
            msg = wire.decode(payload)
            nbrs = _ids(msg.arrays["neighbours"])
            arrays = {**msg.arrays, "sigs": _rows([self._key_sigs[v] for v in nbrs], SIGNATURE_BYTES)}
            out[u] = self._message(SHARE, u, kind=_SIGNED_SHARE_REQ.kind, arrays=arrays)
        return out


class _SignedClient(_MaskingClient):
    stages = SIGNED_STAGES

    def __init__(self, spec: RoundSpec, client_id: int, ring_input: np.ndarray, params: MaskingParams,
                 rng: SecureRNG, identity: Identity, roster: Roster, max_corrupt: int) -> None:
        super().__init__(spec, client_id, ring_input, params, rng)
        self.identity, self.roster = identity, roster
        self._needed = signatures_needed(spec, params, max_corrupt)
        self._graph_seed = b""
        self._signed_survivors: tuple[int, ...] | None = None

    def _sign(self, purpose: str, body: bytes) -> np.ndarray:
        sig = self.identity.sign(purpose, deployment=self.roster.deployment, round_id=self.spec.round_id, body=body)
        return np.frombuffer(sig, dtype=np.uint8)

    def _respond(self, stage: str, msg: Message) -> bytes:
        if stage == ADVERTISE:
            return self._signed_advertise(msg)
        if stage == SHARE:
            return self._signed_share(msg)
        if stage == CONSISTENCY:
            return self._consistency(msg)
        if stage == UNMASK:
            return self._signed_unmask(msg)
        return super()._respond(stage, msg)

    def _signed_advertise(self, msg: Message) -> bytes:
        _ADVERTISE_REQ.validate(msg)
        mine = wire.decode(self._advertise(msg))
        self._graph_seed = msg.blob("graph_seed")
        body = keys_body(self._graph_seed, mine.blob("c_key"), mine.blob("s_key"))
        return self._reply(kind=_SIGNED_KEYS.kind, arrays={**mine.arrays, "sig": self._sign(PURPOSE_KEYS, body)})

    def _signed_share(self, msg: Message) -> bytes:
        _SIGNED_SHARE_REQ.validate(msg)
        nbrs = _ids(msg.arrays["neighbours"])
        sigs, c_keys, s_keys = msg.arrays["sigs"], msg.arrays["c_keys"], msg.arrays["s_keys"]
        if sigs.shape != (len(nbrs), SIGNATURE_BYTES) or c_keys.shape[0] != len(nbrs) or s_keys.shape[0] != len(nbrs):
            raise MessageError(f"sigs must have shape ({len(nbrs)}, {SIGNATURE_BYTES}), got {sigs.shape}")
        rid = self.spec.round_id
        for i, v in enumerate(nbrs):
            if v not in self.roster.keys:
                raise self._violation(msg, f"client {v} is not on the roster (a Sybil)")
            body = keys_body(self._graph_seed, c_keys[i].tobytes(), s_keys[i].tobytes())
            if not self.roster.verify(PURPOSE_KEYS, round_id=rid, client=v, body=body, signature=sigs[i].tobytes()):
                raise self._violation(msg, f"the keys relayed for client {v} are not signed by client {v} for this "
                                           f"round and graph: substituted, replayed or equivocated; round refused")
        plain = Message(kind=_SHARE_REQ.kind, round=msg.round, stage=msg.stage, sender=msg.sender,
                        recipient=msg.recipient, meta=msg.meta,
                        arrays={k: v for k, v in msg.arrays.items() if k != "sigs"})
        return self._share(plain)

    def _consistency(self, msg: Message) -> bytes:
        _CONSISTENCY_REQ.validate(msg)
        survivors = _ids(msg.arrays["survivors"])
        self._check_survivors(msg, survivors)
        self._signed_survivors = tuple(survivors)
        return self._reply(kind=_CONSISTENCY.kind, arrays={"sig": self._sign(PURPOSE_SURVIVORS,
                                                                             survivors_body(survivors))})

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
        body, rid = survivors_body(survivors), self.spec.round_id
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
            raise self._violation(msg, f"only {valid} valid signatures on the survivor set; {needed} are needed "
                                       f"(signatures of {bad} do not verify): nothing revealed")
        return self._reveal(set(survivors))


class SignedMaskingAggregator(MaskingAggregator):
    """:class:`MaskingAggregator` against an active server (see the module docstring).

    Args:
        roster: every participant's public identity, known to every client out of band.
        max_corrupt: ``c``, how many corrupt (colluding) clients the consistency round must withstand:
            a client reveals only with ``max(t, ⌊(n + c)/2⌋ + 1)`` signatures on its survivor set
            (:func:`signatures_needed`). Default 0.
        identities: the signing identities of the clients this process plays (an in-process simulation
            holds all of them; a client's process would hold only its own).
        options, rng, fields: as for :class:`MaskingAggregator`.
    """

    name: ClassVar[str] = "masking-signed"
    stages: ClassVar[tuple[str, ...]] = SIGNED_STAGES

    def __init__(self, options: MaskingOptions | Mapping[str, Any] | None = None, *, roster: Roster,
                 identities: Mapping[int, Identity] | None = None, max_corrupt: int = 0,
                 rng: SecureRNG | None = None, **fields: Any) -> None:
        super().__init__(options, rng=rng, **fields)
        problem = int_problem("max_corrupt", max_corrupt, low=0)
        if problem:
            raise ConfigError(problem)
        self.max_corrupt = max_corrupt
        if not isinstance(roster, Roster):
            raise ConfigError(f"roster must be a Roster, got {type(roster).__name__}")
        self.roster = roster
        self.identities = dict(identities or {})
        for cid, ident in self.identities.items():
            if cid not in roster.keys or roster.keys[cid] != ident.public_key or ident.client_id != cid:
                raise ConfigError(f"the identity given for client {cid} is not the one on the roster")

    def _check_roster(self, spec: RoundSpec) -> None:
        missing = sorted(set(spec.participants) - set(self.roster.keys))
        if missing:
            raise ConfigError(f"participants {missing} are not on the roster of deployment {self.roster.deployment!r}")

    def check_round(self, spec: RoundSpec) -> None:
        super().check_round(spec)
        self._check_roster(spec)

    def server(self, spec: RoundSpec, *, rng: SecureRNG | None = None) -> ServerSide:
        self._check_roster(spec)
        seed = self.graph_seed(spec)
        params = self.params(spec.n_clients)
        graph = CommunicationGraph.harary(spec.participants, params.neighbours, seed)
        return _SignedServer(spec, params, graph, seed, self.unmask_workers, self.roster, self.max_corrupt)

    def client(self, spec: RoundSpec, client_id: int, ring_input: np.ndarray, *, rng: SecureRNG | None = None
               ) -> ClientSide:
        if client_id not in self.identities:
            raise ConfigError(f"no signing identity for client {client_id} in this process")
        return _SignedClient(spec, client_id, ring_input, self.params(spec.n_clients),
                             rng if rng is not None else SecureRNG(), self.identities[client_id], self.roster,
                             self.max_corrupt)

    def survives(self, spec: RoundSpec, alive_per_stage: list[set[int]]) -> bool:
        """The base rules, with the unmask stage's responders being those that also signed the survivor
        set; at least ``t`` must sign it."""
        if len(alive_per_stage) != len(SIGNED_STAGES):
            raise ConfigError(f"alive_per_stage needs one set per stage {SIGNED_STAGES}, got {len(alive_per_stage)}")
        s0, s1, s2, s3, s4 = (set(a) for a in alive_per_stage)
        consistent = s0 & s1 & s2 & s3
        if len(consistent) < signatures_needed(spec, self.params(spec.n_clients), self.max_corrupt):
            return False
        return super().survives(spec, [s0, s1, s2, s3 & s4])
