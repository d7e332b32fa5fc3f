"""Fuzzing :func:`fedguard.wire.decode` and a live round with random, mutated and structure-aware payloads.

Three families of payloads, drawn from a seeded ``random.Random`` (test inputs, not protocol randomness):

* **random**: random bytes of random length, half of them starting with the magic and a plausible prefix;
* **mutated**: a valid message with bit flips, truncation, insertion, byte overwrites or spliced
  messages, half of them *re-digested* so that the mutation reaches the header parser;
* **structure-aware**: a well-framed message (correct lengths and digest) whose JSON header has one
  field replaced by a hostile value: 5,000-digit integers, ``(0, 10**30)`` shapes, negative or boolean
  dimensions, 100-dimensional shapes, unknown dtypes, deep nesting, NaN, wrong types, duplicate arrays,
  thousands of arrays, over-long names, payload lengths that disagree with the shapes.

``decode`` must raise :class:`MessageError` and nothing else; a live round (plaintext and masking
aggregators) fed the same payloads at every stage, on the server side and on the client side, must refuse
each one with :class:`MessageError`/:class:`ProtocolViolation`, change nothing, and still finish with the
exact sum. The default run decodes :data:`FAST_N` (100,000, about 3 s) payloads and sends 5,000 through
each live round; the ``slow`` test sends 130,000 through live rounds.

A fuzzed payload may be *accepted*: the framing's digest is an integrity check, not authentication, so a
re-digested message that is well formed (a re-encoding of the same JSON with other whitespace, or changed
array bytes: a server-chosen graph seed, a client's masked vector) is indistinguishable from a real one.
Those are counted (``accepted``/``answered``) and the party is rebuilt to its state before it; what an
active server can do with such messages is the business of the signed protocol, not of the wire.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from fedguard import wire
from fedguard.encoding import ring_sum
from fedguard.errors import MessageError, ProtocolViolation
from fedguard.federation.plaintext import PlaintextAggregator
from fedguard.federation.protocol import AggregateResult, Aggregator, RoundSpec
from fedguard.federation.transport import InProcessTransport
from fedguard.rng import SecureRNG
from fedguard.secagg.masking import MaskingAggregator
from fedguard.secagg.mpc import MpcAggregator, SimulatedParties
from fedguard.secagg.paillier import PaillierAggregator
from tests.secagg.paillier.keys import small_keypair

_PAILLIER_KEY = small_keypair()

FAST_N = int(os.environ.get("FEDGUARD_FUZZ_N", "100000"))
"""Payloads through ``decode`` in the default run (a twentieth of it through each live round)."""
_PREFIX = struct.Struct("<4sHHIQ")

HOSTILE: list[Any] = [
    10**4000,  # a 4,001-digit integer: parses, must be bounded
    -(2**70), 2**64 + 1, 2**63, -(2**63) - 1, True, False, None, 1.5, float("1e308"), "x" * 300, "", [], {},
    [0, 10**30], [10**30, 0], [-1], [True], [2**40, 2**40], [0] * 100, [1] * 17, [3.0], "<u8", "|O", "<c16",
    [["a", "<u8", [1]], ["a", "<u8", [1]]], [["a", "<u8", [0, 10**30]]], [["a", "|u1", [-5]]],
    [["a", "<u8"]], [["a" * 1000, "|u1", [0]]], [[1, "|u1", [0]]], [["a", "|V8", [1]]],
    [[f"n{i}", "|u1", [0]] for i in range(300)],
]
RAW_HOSTILE = [b"9" * 5000, b"-" + b"9" * 4400, b"NaN", b"Infinity", b"-Infinity", b"1e999", b"[" * 5000 + b"]" * 5000,
               b'{"a":' * 2000 + b"1" + b"}" * 2000, b'"\\ud800"', b"\xff\xfe", b"0x10", b"01"]
FIELDS = ["kind", "round", "stage", "sender", "recipient", "meta", "arrays"]


def frame(header: bytes, payload: bytes, *, header_len: int | None = None, payload_len: int | None = None,
          version: int = 1, flags: int = 0) -> bytes:
    """A message with the given raw header and payload and a *correct* digest (so the parser runs)."""
    body = _PREFIX.pack(wire.MAGIC, version, flags, len(header) if header_len is None else header_len,
                        len(payload) if payload_len is None else payload_len) + header + payload
    return body + hashlib.blake2b(body, digest_size=16).digest()


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    _, _, _, h, p = _PREFIX.unpack_from(data, 0)
    header = json.loads(data[_PREFIX.size:_PREFIX.size + h])
    return header, data[_PREFIX.size + h:_PREFIX.size + h + p]


def _random(rng: random.Random, seeds: list[bytes]) -> bytes:
    n = rng.choice([0, 1, 7, 19, 20, 36, 37, 64, 200, 1000])
    data = rng.randbytes(n)
    if rng.random() < 0.5:
        data = _PREFIX.pack(wire.MAGIC, 1, 0, rng.randrange(0, 256), rng.randrange(0, 256)) + data
    return data


def _mutated(rng: random.Random, seeds: list[bytes]) -> bytes:
    raw = bytearray(rng.choice(seeds))
    op = rng.randrange(5)
    if op == 0:
        for _ in range(rng.randint(1, 4)):
            bit = rng.randrange(len(raw) * 8)
            raw[bit // 8] ^= 1 << (bit % 8)
    elif op == 1:
        raw = raw[: rng.randrange(len(raw))]
    elif op == 2:
        at = rng.randrange(len(raw))
        raw[at:at] = rng.randbytes(rng.randint(1, 16))
    elif op == 3:
        at = rng.randrange(len(raw))
        raw[at] = rng.choice(b'{}[]",:0-9e \x00\xff')
    else:
        other = rng.choice(seeds)
        raw = raw[: rng.randrange(len(raw))] + other[rng.randrange(len(other)):]
    if rng.random() < 0.5 and len(raw) >= _PREFIX.size + 16:  # re-digest: the mutation reaches the parser
        body = bytes(raw[:-16])
        raw = bytearray(body + hashlib.blake2b(body, digest_size=16).digest())
    return bytes(raw)


def _structured(rng: random.Random, seeds: list[bytes]) -> bytes:
    header, payload = split(rng.choice(seeds))
    op = rng.randrange(6)
    if op == 0:  # one field replaced by a hostile JSON value
        header[rng.choice(FIELDS)] = rng.choice(HOSTILE)
        raw = json.dumps(header).encode()
    elif op == 1:  # one field replaced by hostile raw JSON text (beyond what json.dumps writes)
        key = rng.choice(FIELDS)
        header[key] = "@@HOLE@@"
        raw = json.dumps(header).encode().replace(b'"@@HOLE@@"', rng.choice(RAW_HOSTILE))
    elif op == 2 and header["arrays"]:  # one array spec's shape or dtype changed
        spec = rng.choice(header["arrays"])
        if rng.random() < 0.5:
            spec[2] = rng.choice(HOSTILE) if rng.random() < 0.5 else [rng.choice([0, 1, 2, 10**30, -1]) for _ in spec[2] or [0]]
        else:
            spec[1] = rng.choice(["<u8", "|u1", "<f8", "|b1", "<i4", "|O", ">u8", "<u16"])
        raw = json.dumps(header).encode()
    elif op == 3:  # meta filled with a hostile value under a known or new key
        meta = header["meta"] if isinstance(header["meta"], dict) else {}
        meta[rng.choice([*meta, "extra"]) if meta else "extra"] = rng.choice(HOSTILE)
        header["meta"] = meta
        raw = json.dumps(header).encode()
    elif op == 4:  # declared lengths that disagree with the bytes
        raw = json.dumps(header).encode()
        return frame(raw, payload, header_len=rng.choice([0, len(raw) - 1, len(raw) + 1, 2**32 - 1]),
                     payload_len=rng.choice([len(payload), 0, len(payload) + 8, 2**63]),
                     version=rng.choice([1, 1, 2]), flags=rng.choice([0, 0, 1]))
    else:  # a header whose JSON is not an object, or lacks/adds a field
        choice = rng.randrange(3)
        if choice == 0:
            raw = json.dumps(rng.choice(HOSTILE[:12])).encode()
        elif choice == 1:
            header.pop(rng.choice(FIELDS))
            raw = json.dumps(header).encode()
        else:
            header["extra"] = 1
            raw = json.dumps(header).encode()
    if rng.random() < 0.2:
        payload = payload[: rng.randrange(len(payload) + 1)]
    return frame(raw, payload)


FAMILIES: dict[str, Callable[[random.Random, list[bytes]], bytes]] = {
    "random": _random, "mutated": _mutated, "structure-aware": _structured}


def payloads(n: int, seeds: list[bytes], seed: int) -> Iterator[tuple[str, bytes]]:
    rng = random.Random(seed)
    names = list(FAMILIES)
    for i in range(n):
        family = names[i % len(names)]
        yield family, FAMILIES[family](rng, seeds)


def _seed_messages() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(8):
        arrays = {"x": rng.integers(0, 2**63, size=5 + i, dtype=np.uint64),
                  "ids": np.arange(i, dtype=np.int64), "blob": rng.integers(0, 255, size=(2, 3), dtype=np.uint8)}
        out.append(wire.encode(wire.Message(kind=f"k{i}", round=i, stage="input", sender=i, recipient=wire.SERVER,
                                            meta={"a": i, "b": [1, 2, {"c": "d"}], "f": 0.5}, arrays=arrays)))
    return out


def fuzz_decode(n: int, seed: int) -> Counter[str]:
    """Decode ``n`` fuzzed payloads; count them by family and outcome. Any exception other than
    :class:`MessageError` propagates (and fails the test)."""
    counts: Counter[str] = Counter()
    for family, data in payloads(n, _seed_messages(), seed):
        try:
            wire.decode(data)
            counts[f"{family}/accepted"] += 1
        except MessageError:
            counts[f"{family}/refused"] += 1
    return counts


def test_hostile_headers_named_in_the_issue_raise_message_error() -> None:
    header, payload = split(_seed_messages()[0])
    for field, value in (("round", 10**4000), ("sender", 2**63), ("meta", {"a": 10**3000})):
        with pytest.raises(MessageError):
            wire.decode(frame(json.dumps({**header, field: value}).encode(), payload))
    digits = json.dumps(header).encode().replace(b'"round": 0', b'"round": ' + b"9" * 5000)
    with pytest.raises(MessageError, match="JSON"):
        wire.decode(frame(digits, payload))
    for shape in ([0, 10**30], [10**30, 0], [0] * 100, [0, 2**40, 2**40]):
        bad = {**header, "arrays": [["x", "<u8", shape]]}
        with pytest.raises(MessageError, match="dimensions|elements"):
            wire.decode(frame(json.dumps(bad).encode(), b""))
    with pytest.raises(MessageError, match="outside"):
        wire.encode(wire.Message(kind="k", round=0, stage="s", sender=0, recipient=-1, meta={"v": 2**8193}))
    with pytest.raises(MessageError, match="int64"):
        wire.encode(wire.Message(kind="k", round=2**63, stage="s", sender=0, recipient=-1))


def _check_counts(counts: Counter[str], n: int) -> None:
    assert sum(counts.values()) == n
    for family in FAMILIES:  # every family was exercised, and reached refusals
        assert counts[f"{family}/refused"] > 0, counts


def test_fuzzed_payloads_raise_only_message_error() -> None:
    counts = fuzz_decode(FAST_N, seed=1)
    _check_counts(counts, FAST_N)


# -- a live round -------------------------------------------------------------------------------------
class _LiveRound:
    """One round of an aggregator over 4 clients whose every party can be rebuilt to its current state
    (seeded per party, then replaying the real messages), so that a fuzzed payload that *is* accepted
    (a re-digested mutation of array bytes, indistinguishable on an unauthenticated channel from a real
    message: see the counts) does not spoil the round."""

    def __init__(self, agg: Aggregator, seed: int) -> None:
        self.agg, self.seed = agg, seed
        self.spec = RoundSpec(3, (10, 11, 12, 13), 9, 64)
        rng = SecureRNG.for_testing(f"fuzz-live/{seed}/inputs")
        self.inputs = {c: rng.ring_elements(self.spec.vector_length, 64) for c in self.spec.participants}
        self.to_client: dict[int, list[bytes]] = {c: [] for c in self.spec.participants}
        self.stage_replies: list[dict[int, bytes]] = []
        self.server = self.new_server()
        self.clients = {c: self.new_client(c) for c in self.spec.participants}

    def new_client(self, cid: int) -> Any:
        client = self.agg.client(self.spec, cid, self.inputs[cid],
                                 rng=SecureRNG.for_testing(f"fuzz-live/{self.seed}/client/{cid}"))
        for msg in self.to_client[cid]:
            client.handle(msg)
        return client

    def new_server(self) -> Any:
        server = self.agg.server(self.spec, rng=SecureRNG.for_testing(f"fuzz-live/{self.seed}/server"))
        self.first_outbox = server.open()
        for replies in self.stage_replies:
            for cid, reply in replies.items():
                server.accept(cid, reply)
            server.close_stage()
        return server


def _live_round(agg: Aggregator, budget: int, seed: int) -> Counter[str]:
    """At every stage, before the real replies, feed fuzzed payloads (made from this round's real
    messages) to the server's accept (as each client) and to each client's handle. Every refusal must be a
    :class:`MessageError`/:class:`ProtocolViolation` that changes nothing; the round then finishes with the
    exact sum over all clients."""
    live = _LiveRound(agg, seed)
    counts: Counter[str] = Counter()
    outbox = live.first_outbox
    per_stage = budget // len(agg.stages)
    while True:
        ids = sorted(outbox)
        # clients first: fuzzed server messages for this stage, then the real one
        for i, (family, data) in enumerate(payloads(per_stage // 4, list(outbox.values()), seed + 7 * len(counts))):
            cid = ids[i % len(ids)]
            try:
                live.clients[cid].handle(data)
                counts[f"{family}/client-answered"] += 1
                live.clients[cid] = live.new_client(cid)  # back to the state before the fuzzed message
            except (MessageError, ProtocolViolation):
                counts[f"{family}/client-refused"] += 1
        replies = {c: live.clients[c].handle(outbox[c]) for c in ids}
        for c in ids:
            live.to_client[c].append(outbox[c])
        seeds = list(outbox.values()) + list(replies.values())
        for i, (family, data) in enumerate(payloads(per_stage, seeds, seed + len(counts))):
            cid = ids[i % len(ids)]
            before = live.server.received
            try:
                live.server.accept(cid, data)
                counts[f"{family}/server-accepted"] += 1
                live.server = live.new_server()
            except (MessageError, ProtocolViolation):
                counts[f"{family}/server-refused"] += 1
                assert live.server.received == before
        for cid, reply in replies.items():
            live.server.accept(cid, reply)
        live.stage_replies.append(replies)
        step = live.server.close_stage()
        if isinstance(step, AggregateResult):
            expected = ring_sum([live.inputs[c] for c in live.spec.participants], 64)
            np.testing.assert_array_equal(step.ring_sum, expected)
            return counts
        outbox = step


def _aggregator(name: str) -> Aggregator:
    if name == "plaintext":
        return PlaintextAggregator()
    if name == "masking":
        return MaskingAggregator(rng=SecureRNG.for_testing("fuzz-graph"))
    if name == "masking-signed":  # SecAgg+ over the 4 clients: the coin-flipped graph is in play
        from fedguard.identity import Identity, Roster
        from fedguard.secagg.masking.signed import SignedMaskingAggregator

        identities = {c: Identity.generate(c) for c in (10, 11, 12, 13)}
        return SignedMaskingAggregator(roster=Roster.of(identities, "fuzz"), identities=identities, neighbours=2)
    if name == "mpc":
        return MpcAggregator(parties=SimulatedParties(3), min_clients=2)
    return PaillierAggregator(key_bits=512, keypair=_PAILLIER_KEY, min_clients=3, allow_insecure_test_keys=True)


@pytest.mark.parametrize("name", ["plaintext", "masking", "masking-signed", "mpc", "paillier"])
def test_live_round_refuses_fuzzed_payloads_and_stays_exact(name: str) -> None:
    agg = _aggregator(name)
    budget = max(FAST_N // 20, 400) if name in ("plaintext", "masking", "masking-signed") else max(FAST_N // 100, 300)
    counts = _live_round(agg, budget, seed=3)
    assert sum(counts.values()) >= budget
    for family in FAMILIES:
        assert counts[f"{family}/server-refused"] > 0, counts


@pytest.mark.slow
def test_live_round_refuses_100k_fuzzed_payloads() -> None:
    total: Counter[str] = Counter()
    total += _live_round(PlaintextAggregator(), 40_000, seed=5)
    total += _live_round(MaskingAggregator(rng=SecureRNG.for_testing("fuzz-graph")), 64_000, seed=6)
    assert sum(total.values()) >= 100_000
    print(f"live-round fuzz: {sum(total.values())} payloads, {dict(total)}")


@pytest.mark.parametrize("name", ["plaintext", "masking", "masking-signed", "mpc", "paillier"])
def test_a_crafted_reply_drops_only_its_sender_and_the_log_names_it(name: str, caplog: pytest.LogCaptureFixture
                                                                   ) -> None:
    """A client whose reply is a hostile frame (a 5,000-digit round number, well framed) counts as dropped
    at that stage; the round completes for the others, exactly, and the log names the client."""
    agg = _aggregator(name)
    live = _LiveRound(agg, 21)
    victim = 13

    def craft(stage: str, cid: int, reply: bytes) -> bytes:
        if cid != victim or stage != agg.input_stage:
            return reply
        header, payload = split(reply)
        raw = json.dumps({**header, "round": 0}).encode().replace(b'"round": 0', b'"round": ' + b"9" * 5000)
        return frame(raw, payload)

    server = agg.server(live.spec, rng=SecureRNG.for_testing("crafted/server"))
    clients = {c: live.new_client(c) for c in live.spec.participants}
    with caplog.at_level(logging.WARNING, logger="fedguard.federation.transport"):
        outcome = InProcessTransport().run(server, clients, tamper=craft)
    assert [(c, s) for c, s, _ in outcome.rejected] == [(victim, agg.input_stage)]
    assert isinstance(outcome.rejected[0][2], MessageError)
    honest = [c for c in live.spec.participants if c != victim]
    assert outcome.result.contributors == tuple(honest)
    np.testing.assert_array_equal(outcome.result.ring_sum, ring_sum([live.inputs[c] for c in honest], 64))
    assert f"client {victim} dropped at stage {agg.input_stage!r}" in caplog.text
