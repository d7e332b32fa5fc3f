"""Packed Paillier secure aggregation: the server adds ciphertexts and never holds the private key.

Clients encrypt their ring vectors (:mod:`fedguard.encoding`) under the Paillier public key of a
*key holder*, a designated participant (by default the lowest client id of the round); the server
multiplies the ciphertexts (which adds the plaintexts, :mod:`fedguard.secagg.paillier.keys`), sends the
single summed ciphertext vector to the key holder, and receives the decrypted *sum* only. Many values share
one plaintext (:mod:`fedguard.secagg.paillier.packing`): with 8-bit quantisation, weights up to 1024 and 10
clients a 2048-bit ciphertext carries 93 values, about 5.5 bytes per value instead of phe's 512, and
encryption costs one ``r^n mod n^2`` per 93 values (BatchCrypt, Zhang et al., USENIX ATC 2020, reports
23–93x over per-value encryption). Obfuscators can be precomputed offline (:class:`ObfuscatorPool`); by
default (``obfuscator="djn"``) they come from a fixed-base table with a long exponent, ~3.6x cheaper than
``r^n`` and secure under DCR alone (:mod:`fedguard.secagg.paillier.keys` and docs/secagg-paillier.md give
the reduction and what must stay secret).

Stages (every surviving client receives one message and replies once per stage)::

    key      server -> all: who holds the key    key holder -> server: public key n (+ fingerprint);
                                                 others: an empty acknowledgement
    input    server -> all: n, fingerprint, slot layout
                                                 client -> server: its packed ciphertexts  (the input stage)
    decrypt  server -> key holder: the product of the contributors' ciphertexts and their ids;
             server -> others: the contributor list
                                                 key holder -> server: the ring sum; others: acknowledgement

The round completes iff at least ``threshold`` clients reply in the key and input stages and the key holder
replies in all three (:meth:`PaillierAggregator.survives`).

Threshold rule. The key holder is itself a contributor (it must reply in the input stage), and it knows its
own input: from a sum over itself and one other client it would learn that client's update by subtraction.
So a sum is decrypted only over at least ``min_clients >= 3`` contributors *and* at least two contributors
other than the key holder; ``min_clients`` below 3 is refused with :class:`~fedguard.errors.ConfigError`.

Threat model. The server is honest-but-curious (it follows the protocol and tries to learn individual
updates from what it sees): it sees only ciphertexts, which are semantically secure under DCR, and the sum.
The key holder is honest-but-curious and does not collude with the server: it sees only the summed
ciphertext, decrypts exactly once per round (its stage machine has one decrypt stage) and refuses a sum over
fewer than ``threshold`` contributors, over fewer than two contributors other than itself, or over more than
the slot headroom. In ring mode the key holder learns the sum modulo ``2^k`` only: the carries above ``k`` are
hidden by statistical masks (:mod:`fedguard.secagg.paillier.packing`). Not covered: a *malicious* server could
send the key holder one client's ciphertext (or a scaled copy) instead of the sum, or substitute its own
public key; pin the key holder's long-lived key (``public_key=``/``keypair=``, checked by fingerprint) to
close the second, and use pairwise masking (``aggregator: masking``) where the first matters. A colluding
key holder and server learn everything, as with any single-key-holder Paillier design.

Bad input (typed errors that name the problem, all :class:`~fedguard.errors.MessageError` subclasses, so the
message is refused and changes nothing the round computes): a ciphertext under another key
(:class:`~fedguard.secagg.paillier.errors.ForeignKeyError`, both fingerprints named), a different slot layout
(:class:`~fedguard.secagg.paillier.errors.SlotLayoutError`), a ciphertext of the wrong length, out of range or
not a unit of ``Z*_{n^2}`` (:class:`~fedguard.secagg.paillier.errors.CiphertextError`). With
``on_bad_input="abort"`` (the default) the server aborts the round when the input stage closes, before
anything is sent for decryption, if a client whose input was refused never delivered a valid one (a valid
input from the same client later in the stage — e.g. the real message after a forged one — replaces the
refusal, and the round goes on as if the refused message had never arrived); with ``"exclude"`` the offender
counts as dropped. More participants than
the slot headroom raise :class:`~fedguard.secagg.paillier.errors.SlotOverflowError` before anything is encrypted.

>>> from fedguard.federation import InProcessTransport, RoundSpec
>>> spec = RoundSpec(0, (0, 1, 2), vector_length=3, ring_bits=16)
>>> agg = PaillierAggregator(key_bits=512, allow_insecure_test_keys=True)
>>> inputs = {c: np.array([c, 2 * c, 65535], dtype=np.uint64) for c in spec.participants}
>>> server = agg.server(spec)
>>> clients = {c: agg.client(spec, c, inputs[c]) for c in spec.participants}
>>> InProcessTransport().run(server, clients).result.ring_sum.tolist()
[3, 6, 65533]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import gmpy2
import numpy as np

from fedguard.checks import is_int
from fedguard.encoding import ring_wire_dtype, to_wire
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
)
from fedguard.rng import SecureRNG
from fedguard.secagg.paillier.errors import (
    DecryptionError,
    ForeignKeyError,
    SlotLayoutError,
    SlotOverflowError,
)
from fedguard.secagg.paillier.keys import (
    ObfuscatorMethod,
    ObfuscatorPool,
    PaillierKeypair,
    PaillierPrivateKey,
    PaillierPublicKey,
    encrypt_many,
    generate_keypair,
)
from fedguard.secagg.paillier.options import (
    DEFAULT_OBFUSCATOR,
    MIN_OTHER_CONTRIBUTORS,
    BadInputPolicy,
    PaillierOptions,
)
from fedguard.secagg.paillier.packing import SlotLayout
from fedguard.wire import Message, MessageSchema, bytes_array

__all__ = ["PaillierAggregator", "decrypt_sum", "encrypt_vector", "sum_ciphertexts"]

_KEY, _INPUT, _DECRYPT = "key", "input", "decrypt"
_LAYOUT_META = SlotLayout.meta_schema()
_KEY_REQUEST = MessageSchema(kind="paillier/key-request", meta={"key_holder": int, "key_bits": int})
_KEY_REPLY = MessageSchema(
    kind="paillier/key-reply", meta={"fingerprint": str, "key_bits": int}, arrays={"n": ("|u1", 1)}
)
_INPUT_REQUEST = MessageSchema(
    kind="paillier/input-request", meta={"fingerprint": str, **_LAYOUT_META}, arrays={"n": ("|u1", 1)}
)
_INPUT_REPLY = MessageSchema(
    kind="paillier/ciphertexts", meta={"fingerprint": str, **_LAYOUT_META}, arrays={"c": ("|u1", 1)}
)
_DECRYPT_REQUEST = MessageSchema(
    kind="paillier/decrypt-request",
    meta={"fingerprint": str, "contributors": list, **_LAYOUT_META},
    arrays={"c": ("|u1", 1)},
)
_CLOSING = MessageSchema(kind="paillier/closing", meta={"contributors": list})
_DECRYPT_REPLY = MessageSchema(kind="paillier/decrypt-reply", meta={"fingerprint": str}, arrays={"x": ("<u8", 1)})
_REPLY_SCHEMAS = {_KEY: _KEY_REPLY, _INPUT: _INPUT_REPLY, _DECRYPT: _DECRYPT_REPLY}


# -- the three operations, usable without the stage machine (benchmarks, custom transports) ---------
def encrypt_vector(
    public_key: PaillierPublicKey,
    layout: SlotLayout,
    ring_vector: np.ndarray,
    *,
    rng: SecureRNG | None = None,
    workers: int = 1,
    obfuscators: ObfuscatorPool | None = None,
    method: ObfuscatorMethod = DEFAULT_OBFUSCATOR,
    private_key: PaillierPrivateKey | None = None,
) -> bytes:
    """Pack a client's ring vector and encrypt it: ``layout.n_ciphertexts`` fixed-width ciphertexts
    (obfuscators from the pool first, then fresh ones by ``method``, see :mod:`~fedguard.secagg.paillier.keys`;
    the key holder passes its ``private_key`` to make the same obfuscators by CRT, several times cheaper)."""
    if layout.modulus_bits != public_key.bits:
        raise SlotLayoutError(f"layout is for a {layout.modulus_bits}-bit modulus, the key has {public_key.bits} bits")
    rng = rng if rng is not None else SecureRNG()
    plaintexts = layout.pack(ring_vector, rng=rng)  # carry masks (if any) drawn from the same stream
    cts = encrypt_many(public_key, plaintexts, rng=rng, workers=workers,
                       obfuscators=obfuscators, method=method, private_key=private_key)
    return public_key.ciphertexts_to_bytes(cts)


def sum_ciphertexts(public_key: PaillierPublicKey, vectors: list[list[gmpy2.mpz]]) -> list[gmpy2.mpz]:
    """The server's work: the element-wise product modulo ``n^2`` of validated ciphertext vectors."""
    if not vectors:
        raise ConfigError("sum_ciphertexts needs at least one vector")
    n2 = public_key.n_squared
    acc = list(vectors[0])
    for vec in vectors[1:]:
        if len(vec) != len(acc):
            raise SlotLayoutError(f"ciphertext vectors differ in length: {len(vec)} vs {len(acc)}")
        acc = [gmpy2.f_mod(a * b, n2) for a, b in zip(acc, vec)]
    return acc


def decrypt_sum(
    private_key: PaillierPrivateKey, layout: SlotLayout, summed: list[gmpy2.mpz], contributors: int,
    *, workers: int = 1,
) -> np.ndarray:
    """The key holder's work: decrypt (CRT), unpack and reduce to the ring sum of ``contributors`` clients."""
    if contributors > layout.max_clients:  # refuse before decrypting anything
        raise SlotOverflowError(f"{contributors} contributors exceed the slot headroom of max_clients={layout.max_clients}")
    return layout.unpack(private_key.decrypt_many(summed, workers=workers), contributors)


# -- configuration shared by both sides --------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Config:
    key_bits: int
    key_holder: int | None
    pinned: PaillierPublicKey | None
    max_clients: int | None
    min_clients: int
    workers: int
    on_bad_input: BadInputPolicy
    obfuscator: ObfuscatorMethod

    def key_holder_for(self, spec: RoundSpec) -> int:
        if self.key_holder is None:
            return min(spec.participants)
        if self.key_holder not in spec.participants:
            raise ConfigError(f"key_holder {self.key_holder} is not a participant of round {spec.round_id}")
        return self.key_holder

    def threshold(self, n_clients: int) -> int:
        return min(self.min_clients, n_clients)

    def too_few(self, contributors: tuple[int, ...], key_holder: int, n_clients: int,
                min_contributors: int = 1) -> str | None:
        """Why a sum over ``contributors`` must not be decrypted, or ``None`` if it may be (the threshold rule
        of the module docstring: at least ``threshold`` contributors and two besides the key holder; and at
        least the round's ``RoundSpec.min_contributors``)."""
        threshold = self.threshold(n_clients)
        others = len(set(contributors) - {key_holder})
        if len(contributors) < min_contributors:
            return (f"only {len(contributors)} client(s) survive to the reveal; "
                    f"min_contributors={min_contributors} are needed")
        if len(contributors) < threshold:
            return f"a sum over {len(contributors)} contributors is below the threshold {threshold}"
        if others < MIN_OTHER_CONTRIBUTORS:
            return (f"a sum over {others} contributor(s) besides key holder {key_holder} would reveal "
                    f"{'that client' if others == 1 else 'its own input'} to the key holder; "
                    f"at least {MIN_OTHER_CONTRIBUTORS} are needed")
        return None

    def layout(self, spec: RoundSpec, modulus_bits: int) -> SlotLayout:
        return SlotLayout.derive(modulus_bits=modulus_bits, round_spec=spec, max_clients=self.max_clients)

    def check_public_key(self, key: PaillierPublicKey, what: str) -> None:
        if key.bits != self.key_bits:
            raise ForeignKeyError(f"{what} has a {key.bits}-bit modulus, this aggregator uses {self.key_bits}-bit keys")
        if self.pinned is not None:
            self.pinned.require_same(key.fingerprint, what)


def _contributor_list(value: Any, spec: RoundSpec, who: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(is_int(c) for c in value):
        raise MessageError(f"{who}: contributors must be a list of client ids, got {value!r}")
    ids = tuple(value)
    if len(set(ids)) != len(ids) or not set(ids) <= set(spec.participants):
        raise MessageError(f"{who}: contributors {list(ids)} are not distinct participants of round {spec.round_id}")
    return ids


# -- server ------------------------------------------------------------------------------------------
class _PaillierServer(ServerSide):
    stages = (_KEY, _INPUT, _DECRYPT)

    def __init__(self, spec: RoundSpec, cfg: _Config) -> None:
        super().__init__(spec, cfg.threshold(spec.n_clients))
        self._cfg = cfg
        self._key_holder = cfg.key_holder_for(spec)
        cfg.layout(spec, cfg.key_bits)  # headroom and ring checks before anything is sent
        self._public: PaillierPublicKey | None = None
        self._layout: SlotLayout | None = None
        self._parsed: dict[int, list[gmpy2.mpz]] = {}
        # inputs refused in the input stage, by sender; an entry is dropped as soon as that sender delivers a
        # valid input, so a refused message changes nothing the round computes (see the module docstring)
        self._refused: dict[int, MessageError] = {}
        self._contributors: tuple[int, ...] = ()

    @property
    def key_holder(self) -> int:
        return self._key_holder

    @property
    def public_key(self) -> PaillierPublicKey | None:
        """The round's public key once the key stage has closed (the server never has a private key)."""
        return self._public

    def min_replies(self, stage: str) -> int:
        return 1 if stage == _DECRYPT else self.threshold

    def _round_key(self) -> tuple[PaillierPublicKey, SlotLayout]:
        if self._public is None or self._layout is None:  # the stage machine opens input only after key
            raise ProtocolViolation(f"round {self.spec.round_id} has no public key yet", round_id=self.spec.round_id)
        return self._public, self._layout

    def _open(self) -> Outbox:
        meta = {"key_holder": self._key_holder, "key_bits": self._cfg.key_bits}
        return {c: self._message(_KEY, c, kind=_KEY_REQUEST.kind, meta=meta) for c in self.spec.participants}

    def _schema(self, stage: str) -> MessageSchema:
        if stage == _DECRYPT:  # the decrypted sum travels in the round's ring word (uint8 for an 8-bit ring)
            return ring_input_schema(_DECRYPT_REPLY.kind, extra_meta={"fingerprint": str},
                                     ring_bits=self.spec.ring_bits)
        return _REPLY_SCHEMAS[stage]

    def _check_reply(self, stage: str, msg: Message) -> None:
        sender = msg.sender
        if stage == _KEY:
            if sender == self._key_holder:
                key = PaillierPublicKey.from_bytes(msg.blob("n"), fingerprint=msg.meta["fingerprint"],
                                                   bits=self._cfg.key_bits)
                if msg.meta["key_bits"] != key.bits:
                    raise ForeignKeyError(f"key holder {sender} claims {msg.meta['key_bits']} bits for a {key.bits}-bit key")
                self._cfg.check_public_key(key, f"public key of key holder {sender}")
            elif msg.arrays["n"].size or msg.meta["fingerprint"] or msg.meta["key_bits"]:
                raise ForeignKeyError(f"client {sender} sent a public key but the key holder is {self._key_holder}")
        elif stage == _INPUT:
            public, layout = self._round_key()
            try:
                public.require_same(msg.meta["fingerprint"], f"input of client {sender}")
                layout.require_equal(msg.meta, f"input of client {sender}")
                cts = public.ciphertexts_from_bytes(msg.blob("c"), layout.n_ciphertexts, what=f"input of client {sender}")
            except MessageError as err:
                if self._cfg.on_bad_input == "abort":
                    self._refused.setdefault(sender, err)
                raise
            self._parsed[sender] = cts
            self._refused.pop(sender, None)  # a valid input replaces an earlier refused one
        elif sender == self._key_holder:
            check_ring_vector(msg.arrays["x"], self.spec, f"decrypted sum from key holder {sender}")
            self._round_key()[0].require_same(msg.meta["fingerprint"], f"decrypted sum from key holder {sender}")
        elif msg.arrays["x"].size:
            raise MessageError(f"client {sender} is not the key holder but sent a {msg.arrays['x'].size}-entry sum")

    def _close(self, stage: str, replies: dict[int, Message]) -> Outbox | AggregateResult:
        kh = self._key_holder
        if kh not in replies:
            # before the decrypt stage nothing was ever sent for decryption; in it, the key holder may have
            # decrypted (and refused what it found, e.g. an overfull slot): the server learned nothing
            aftermath = ("the key holder may have decrypted the sum, the server learned nothing" if stage == _DECRYPT
                         else "nothing was sent for decryption")
            raise ProtocolAbort(
                f"key holder {kh} did not reply in stage {stage!r}: round {self.spec.round_id} aborted; {aftermath}",
                round_id=self.spec.round_id, stage=stage, nothing_revealed=stage != _DECRYPT,
            )
        if stage == _KEY:
            msg = replies[kh]
            self._public = PaillierPublicKey.from_bytes(msg.blob("n"))
            self._layout = self._cfg.layout(self.spec, self._public.bits)
            meta = {"fingerprint": self._public.fingerprint, **self._layout.to_meta()}
            n = bytes_array(self._public.to_bytes())
            return {c: self._message(_INPUT, c, kind=_INPUT_REQUEST.kind, meta=meta, arrays={"n": n}) for c in replies}
        if stage == _INPUT:
            unresolved = sorted(set(self._refused) - set(replies))
            if unresolved:
                sender = unresolved[0]
                err = self._refused[sender]
                raise ProtocolAbort(
                    f"client {sender} sent unusable input ({err}); round {self.spec.round_id} aborted before "
                    "anything was decrypted",
                    round_id=self.spec.round_id, stage=stage, nothing_revealed=True,
                )
            public, layout = self._round_key()
            summands = tuple(sorted(replies))
            reason = self._cfg.too_few(summands, kh, self.spec.n_clients, self.spec.min_contributors)
            if reason is not None:  # refuse before anything is sent for decryption
                raise ProtocolAbort(f"{reason}: round {self.spec.round_id} aborted, nothing decrypted",
                                    round_id=self.spec.round_id, stage=stage, nothing_revealed=True)
            self._contributors = summands
            if len(self._contributors) > layout.max_clients:  # derive() already refused more participants
                raise SlotOverflowError(f"{len(self._contributors)} contributors exceed max_clients={layout.max_clients}")
            summed = sum_ciphertexts(public, [self._parsed[c] for c in self._contributors])
            self._parsed = {}
            contributors = list(self._contributors)
            outbox: Outbox = {}
            for c in self._contributors:
                if c == kh:
                    meta = {"fingerprint": public.fingerprint, "contributors": contributors, **layout.to_meta()}
                    arrays = {"c": bytes_array(public.ciphertexts_to_bytes(summed))}
                    outbox[c] = self._message(_DECRYPT, c, kind=_DECRYPT_REQUEST.kind, meta=meta, arrays=arrays)
                else:
                    outbox[c] = self._message(_DECRYPT, c, kind=_CLOSING.kind, meta={"contributors": contributors})
            return outbox
        total = np.array(replies[kh].arrays["x"], dtype=np.uint64)
        return self._result(total, set(self._contributors))


# -- client ------------------------------------------------------------------------------------------
class _PaillierClient(ClientSide):
    stages = (_KEY, _INPUT, _DECRYPT)

    def __init__(
        self,
        spec: RoundSpec,
        client_id: int,
        ring_input: np.ndarray,
        cfg: _Config,
        *,
        rng: SecureRNG | None,
        keypair: PaillierKeypair | None,
        obfuscators: ObfuscatorPool | None,
    ) -> None:
        super().__init__(spec, client_id)
        x = check_ring_vector(ring_input, spec, f"ring input of client {client_id}", error=InvalidUpdateError)
        cfg.layout(spec, cfg.key_bits).slot_values(x)  # range and headroom checks before anything is sent
        self._x = x.copy()
        self._cfg = cfg
        self._rng = rng if rng is not None else SecureRNG()
        self._key_holder = cfg.key_holder_for(spec)
        self._keypair = keypair if client_id == self._key_holder else None
        self._obfuscators = obfuscators

    @property
    def is_key_holder(self) -> bool:
        return self.client_id == self._key_holder

    def _respond(self, stage: str, msg: Message) -> bytes:
        if stage == _KEY:
            return self._respond_key(msg)
        if stage == _INPUT:
            return self._respond_input(msg)
        return self._respond_decrypt(msg)

    def _respond_key(self, msg: Message) -> bytes:
        _KEY_REQUEST.validate(msg)
        if msg.meta["key_holder"] != self._key_holder or msg.meta["key_bits"] != self._cfg.key_bits:
            raise ProtocolViolation(
                f"client {self.client_id} expects key holder {self._key_holder} with {self._cfg.key_bits}-bit keys, "
                f"the server announced {msg.meta['key_holder']} with {msg.meta['key_bits']} bits",
                sender=msg.sender, round_id=self.spec.round_id, stage=_KEY,
            )
        if not self.is_key_holder:
            return self._reply(kind=_KEY_REPLY.kind, meta={"fingerprint": "", "key_bits": 0},
                               arrays={"n": np.zeros(0, dtype=np.uint8)})
        keypair = self._keypair
        if keypair is None:  # a fresh key for this round, generated by the key holder itself
            keypair = generate_keypair(self._cfg.key_bits, allow_insecure_test_keys=True)
        self._cfg.check_public_key(keypair.public, f"key pair of key holder {self.client_id}")
        reply = self._reply(
            kind=_KEY_REPLY.kind,
            meta={"fingerprint": keypair.public.fingerprint, "key_bits": keypair.public.bits},
            arrays={"n": bytes_array(keypair.public.to_bytes())},
        )
        self._keypair = keypair
        return reply

    def _respond_input(self, msg: Message) -> bytes:
        _INPUT_REQUEST.validate(msg)
        key = PaillierPublicKey.from_bytes(msg.blob("n"), fingerprint=msg.meta["fingerprint"], bits=self._cfg.key_bits)
        self._cfg.check_public_key(key, f"public key announced to client {self.client_id}")
        if self._keypair is not None:
            self._keypair.public.require_same(key.fingerprint, f"public key announced to key holder {self.client_id}")
        layout = self._cfg.layout(self.spec, key.bits)
        layout.require_equal(msg.meta, "the server's input request")
        own = self._keypair.private if self._keypair is not None else None  # the key holder: CRT obfuscators
        data = encrypt_vector(key, layout, self._x, rng=self._rng, workers=self._cfg.workers,
                              obfuscators=self._obfuscators, method=self._cfg.obfuscator, private_key=own)
        return self._reply(kind=_INPUT_REPLY.kind, meta={"fingerprint": key.fingerprint, **layout.to_meta()},
                           arrays={"c": bytes_array(data)})

    def _respond_decrypt(self, msg: Message) -> bytes:
        if not self.is_key_holder:
            _CLOSING.validate(msg)
            _contributor_list(msg.meta["contributors"], self.spec, f"client {self.client_id}")
            return self._reply(kind=_DECRYPT_REPLY.kind, meta={"fingerprint": ""},
                               arrays={"x": np.zeros(0, dtype=ring_wire_dtype(self.spec.ring_bits))})
        _DECRYPT_REQUEST.validate(msg)
        keypair = self._keypair
        if keypair is None:  # set in the key stage, which the stage machine runs first
            raise ProtocolViolation(f"key holder {self.client_id} has no key pair", round_id=self.spec.round_id)
        who = f"decryption request to key holder {self.client_id}"
        keypair.public.require_same(msg.meta["fingerprint"], who)
        layout = self._cfg.layout(self.spec, keypair.public.bits)
        layout.require_equal(msg.meta, who)
        contributors = _contributor_list(msg.meta["contributors"], self.spec, who)
        reason = self._cfg.too_few(contributors, self.client_id, self.spec.n_clients, self.spec.min_contributors)
        if reason is not None:
            raise ProtocolAbort(f"{who}: {reason}; nothing decrypted", round_id=self.spec.round_id, stage=_DECRYPT,
                                nothing_revealed=True)
        if len(contributors) > layout.max_clients:
            raise SlotOverflowError(f"{who}: {len(contributors)} contributors exceed max_clients={layout.max_clients}")
        summed = keypair.public.ciphertexts_from_bytes(msg.blob("c"), layout.n_ciphertexts, what=who)
        try:
            total = decrypt_sum(keypair.private, layout, summed, len(contributors), workers=self._cfg.workers)
        except DecryptionError as err:
            # the sum *was* decrypted: say so. Which contributor overfilled a slot cannot be known from a sum
            raise DecryptionError(
                f"{who}: the sum over contributors {list(contributors)} was decrypted and refused ({err}); one of "
                "them encrypted a value outside its slot bound (or the server tampered with the sum); the key "
                "holder saw the refused sum, the server nothing",
            ) from err
        return self._reply(kind=_DECRYPT_REPLY.kind, meta={"fingerprint": keypair.public.fingerprint},
                           arrays={"x": to_wire(total, self.spec.ring_bits)})


# -- the aggregator ----------------------------------------------------------------------------------
class PaillierAggregator(Aggregator):
    """Packed Paillier aggregation (see the module docstring).

    Args:
        options: :class:`~fedguard.secagg.paillier.options.PaillierOptions` (``key_bits``, ``key_holder``,
            ``max_clients``, ``min_clients``, ``workers``, ``on_bad_input``, ``obfuscator``,
            ``allow_insecure_test_keys``), a mapping of them, or ``None``; keyword arguments named like its
            fields override it (``PaillierAggregator(key_bits=3072)``).
        keypair: the key holder's long-lived key pair (only the key holder's process should pass it; the
            server's process never does). ``None``: the key holder generates a fresh key every round.
        public_key: pin this public key: every party refuses any other (by fingerprint). Implied by ``keypair``.

    Slots are sized from the round's fixed-point encoding when the round has one (``RoundSpec.fixed_point``,
    set by :func:`~fedguard.federation.fedavg.aggregate_updates`: compact, e.g. 22 bits for 8-bit values),
    and for arbitrary ring elements otherwise.
    """

    name: ClassVar[str] = "paillier"
    stages: ClassVar[tuple[str, ...]] = (_KEY, _INPUT, _DECRYPT)
    input_stage: ClassVar[str] = _INPUT

    def __init__(
        self,
        options: PaillierOptions | Mapping[str, Any] | None = None,
        *,
        keypair: PaillierKeypair | None = None,
        public_key: PaillierPublicKey | None = None,
        **fields: Any,
    ) -> None:
        opts = PaillierOptions.build(options, fields)
        problems = []
        if keypair is not None and not isinstance(keypair, PaillierKeypair):
            problems.append(f"keypair must be a PaillierKeypair, got {type(keypair).__name__}")
        if public_key is not None and not isinstance(public_key, PaillierPublicKey):
            problems.append(f"public_key must be a PaillierPublicKey, got {type(public_key).__name__}")
        pinned = public_key
        if keypair is not None and isinstance(keypair, PaillierKeypair):
            if pinned is not None and pinned != keypair.public:
                problems.append(
                    f"public_key {pinned.fingerprint} differs from the key pair's {keypair.public.fingerprint}"
                )
            pinned = keypair.public
        if pinned is not None and isinstance(pinned, PaillierPublicKey) and pinned.bits != opts.key_bits:
            problems.append(f"the pinned key has {pinned.bits} bits, key_bits={opts.key_bits}")
        if problems:
            raise ConfigError.collect(problems)
        if opts.precompute and keypair is None:  # one long-lived key, so that obfuscators can be made offline
            keypair = generate_keypair(opts.key_bits, allow_insecure_test_keys=opts.allow_insecure_test_keys)
            pinned = keypair.public
        self.options: PaillierOptions = opts
        self._keypair = keypair
        self._pools: dict[int, ObfuscatorPool] = {}
        self._cfg = _Config(opts.key_bits, opts.key_holder, pinned, opts.max_clients, opts.min_clients, opts.workers,
                            opts.on_bad_input, opts.obfuscator)

    @property
    def label(self) -> str:
        if self._cfg.key_bits < 2048:
            return f"{self.name} (insecure {self._cfg.key_bits}-bit test keys)"
        return self.name

    def key_holder_for(self, spec: RoundSpec) -> int:
        """The client that holds the private key in the round ``spec``."""
        return self._cfg.key_holder_for(spec)

    def layout(self, spec: RoundSpec, modulus_bits: int | None = None) -> SlotLayout:
        """The slot layout of round ``spec`` (for a ``modulus_bits``-bit key, default ``key_bits``)."""
        return self._cfg.layout(spec, modulus_bits or self._cfg.key_bits)

    def threshold(self, n_clients: int) -> int:
        return self._cfg.threshold(n_clients)

    def check_clients(self, n_clients: int) -> None:
        """:class:`ConfigError` unless a round of ``n_clients`` can be decrypted: at least ``min_clients``
        (>= 3: the key holder plus two others) and at most the slot headroom ``max_clients``. (A designated
        ``key_holder`` must be a participant of every round; that is checked per round.)"""
        super().check_clients(n_clients)
        c = self._cfg
        if c.min_clients > n_clients:
            raise ConfigError(
                f"aggregator 'paillier' needs at least min_clients={c.min_clients} clients, got {n_clients} (a "
                f"decrypted sum must include the key holder and {MIN_OTHER_CONTRIBUTORS} others, so that the key "
                f"holder cannot subtract its own input): add clients, or use aggregator 'masking' or 'mpc'"
            )
        if c.max_clients is not None and n_clients > c.max_clients:
            raise ConfigError(f"aggregator 'paillier' was sized for max_clients={c.max_clients}, got {n_clients} "
                              f"clients: raise aggregator_options.max_clients")

    def survives(self, spec: RoundSpec, alive_per_stage: list[set[int]]) -> bool:
        key, inputs, decrypt = alive_per_stage
        kh, t = self.key_holder_for(spec), self.threshold(spec.n_clients)
        return (kh in key and kh in inputs and kh in decrypt and len(key) >= t and len(inputs) >= t
                and self._cfg.too_few(tuple(sorted(inputs)), kh, spec.n_clients, spec.min_contributors) is None)

    def check_round(self, spec: RoundSpec) -> None:
        """The client-count rules, the designated key holder and the slot packing of ``spec``'s round."""
        self.check_clients(spec.n_clients)
        self._cfg.key_holder_for(spec)
        self._cfg.layout(spec, self._cfg.key_bits)

    def precompute(self, spec: RoundSpec) -> int:
        """The offline half of encryption for a coming round (``precompute=True`` only; otherwise nothing):
        fill each participant's obfuscator pool for the long-lived key up to the round's ciphertext count
        ``⌈L/S⌉`` (:class:`~fedguard.secagg.paillier.packing.SlotLayout`); with ``precompute_background``
        the pools fill on low-priority processes while the clients train (this returns at once, a client's
        encryption waits for what is missing). Each pool stays with its client
        (in a deployment, in that client's memory; here, in this simulation's aggregator object) and hands
        every obfuscator out once. Returns the number of obfuscators made."""
        if not self.options.precompute or self._cfg.pinned is None:
            return 0
        need = self._cfg.layout(spec, self._cfg.key_bits).n_ciphertexts
        key_holder = self._cfg.key_holder_for(spec)
        made = 0
        for client in spec.participants:
            pool = self._pools.get(client)
            if pool is None:  # the key holder's pool makes the same obfuscators by CRT with its private key
                own = self._keypair.private if self._keypair is not None and client == key_holder else None
                pool = self._pools[client] = ObfuscatorPool(self._cfg.pinned, method=self._cfg.obfuscator,
                                                            private_key=own)
            if len(pool) < need:
                made += need - len(pool)
                pool.fill(need - len(pool), workers=self._cfg.workers, background=self.options.precompute_background)
        return made

    def close(self) -> None:
        """Forget every client's obfuscator pool and cancel background filling that has not started."""
        for pool in self._pools.values():
            pool.discard()
        self._pools.clear()

    def pooled(self, client: int) -> int:
        """Obfuscators ready in ``client``'s pool."""
        pool = self._pools.get(client)
        return 0 if pool is None else len(pool)

    def server(self, spec: RoundSpec, *, rng: SecureRNG | None = None) -> ServerSide:
        if self._cfg.min_clients > spec.n_clients:
            raise ConfigError(f"min_clients={self._cfg.min_clients} exceeds the {spec.n_clients} participants")
        return _PaillierServer(spec, self._cfg)

    def client(
        self,
        spec: RoundSpec,
        client_id: int,
        ring_input: np.ndarray,
        *,
        rng: SecureRNG | None = None,
        obfuscators: ObfuscatorPool | None = None,
    ) -> ClientSide:
        """One client's side. ``obfuscators``: this client's precomputed pool for the pinned key (optional)."""
        if self._cfg.min_clients > spec.n_clients:  # the key holder would decrypt a sum it can invert
            raise ConfigError(f"min_clients={self._cfg.min_clients} exceeds the {spec.n_clients} participants")
        if obfuscators is not None and not isinstance(obfuscators, ObfuscatorPool):
            raise ConfigError(f"obfuscators must be an ObfuscatorPool, got {type(obfuscators).__name__}")
        if obfuscators is None:  # the pool precompute() filled for this client, if any
            obfuscators = self._pools.get(client_id)
        return _PaillierClient(spec, client_id, ring_input, self._cfg, rng=rng, keypair=self._keypair,
                               obfuscators=obfuscators)

    def __repr__(self) -> str:
        c = self._cfg
        return (f"PaillierAggregator(key_bits={c.key_bits}, key_holder={c.key_holder}, "
                f"min_clients={c.min_clients}, workers={c.workers}, obfuscator={c.obfuscator!r})")
