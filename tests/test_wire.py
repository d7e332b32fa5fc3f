"""fedguard.wire: exact round trips, and every malformed payload raises MessageError and nothing else."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedguard import wire
from fedguard.errors import MessageError
from fedguard.wire import Message, MessageSchema, bytes_array, decode, encode, encoded_size

DTYPES = ["|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8", "|b1"]

json_scalars = st.none() | st.booleans() | st.integers(-(2**62), 2**62) | st.text(max_size=20) | st.floats(
    allow_nan=False, allow_infinity=False
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    arrays = {}
    for name in draw(st.lists(st.text(min_size=1, max_size=8), max_size=4, unique=True)):
        dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        arrays[name] = draw(hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, max_side=6)))
    return Message(
        kind=draw(st.text(min_size=1, max_size=16)),
        round=draw(st.integers(0, 2**40)),
        stage=draw(st.text(max_size=16)),
        sender=draw(st.integers(-2, 10**6)),
        recipient=draw(st.integers(-2, 10**6)),
        meta=draw(st.dictionaries(st.text(max_size=8), json_values, max_size=4)),
        arrays=arrays,
    )


def _same(a: Message, b: Message) -> None:
    assert (a.kind, a.round, a.stage, a.sender, a.recipient) == (b.kind, b.round, b.stage, b.sender, b.recipient)
    assert dict(a.meta) == dict(b.meta)
    assert list(a.arrays) == list(b.arrays)
    for name, arr in a.arrays.items():
        got = b.arrays[name]
        assert got.dtype == arr.dtype.newbyteorder("<") or got.dtype == arr.dtype
        assert got.shape == arr.shape
        assert got.tobytes() == np.asarray(arr, order="C").tobytes()  # bit-exact, NaNs included


@given(messages())
def test_round_trip_is_exact_and_size_is_exact(msg: Message) -> None:
    data = encode(msg)
    assert len(data) == encoded_size(msg)
    _same(msg, decode(data))


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_message_error(data: bytes) -> None:
    with pytest.raises(MessageError):
        decode(data)


@settings(max_examples=200)
@given(msg=messages(), data=st.data())
def test_bit_flips_are_detected(msg: Message, data: st.DataObject) -> None:
    raw = bytearray(encode(msg))
    flips = data.draw(st.lists(st.integers(0, len(raw) * 8 - 1), min_size=1, max_size=4, unique=True))
    for bit in flips:
        raw[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(MessageError):
        decode(bytes(raw))


@given(msg=messages(), data=st.data())
def test_truncated_or_extended_payloads_are_refused(msg: Message, data: st.DataObject) -> None:
    raw = encode(msg)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(MessageError, match="truncated|shorter"):
        decode(raw[:cut])
    with pytest.raises(MessageError, match="trailing"):
        decode(raw + data.draw(st.binary(min_size=1, max_size=8)))


def _reframe(header: dict | bytes, payload: bytes = b"", *, version: int = 1, flags: int = 0) -> bytes:
    import hashlib
    import json

    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    body = struct.pack("<4sHHIQ", b"FGWM", version, flags, len(raw), len(payload)) + raw + payload
    return body + hashlib.blake2b(body, digest_size=16).digest()


GOOD_HEADER = {"kind": "k", "round": 0, "stage": "s", "sender": 0, "recipient": -1, "meta": {}, "arrays": []}


@pytest.mark.parametrize(
    ("framed", "message"),
    [
        (_reframe(GOOD_HEADER, version=2), "unsupported message format version 2"),
        (_reframe(GOOD_HEADER, flags=1), "unknown flags"),
        (_reframe({**GOOD_HEADER, "arrays": [["x", "|O", [1]]]}, b"12345678"), "dtype '|O'"),
        (_reframe({**GOOD_HEADER, "arrays": [["x", ">f4", [1]]]}, b"1234"), "dtype '>f4'"),
        (_reframe({**GOOD_HEADER, "arrays": [["x", "<f4", [3]]]}, b"1234"), "runs past the payload"),
        (_reframe({**GOOD_HEADER, "arrays": [["x", "<f4", [1]]]}, b"12345678"), "no array claims"),
        (_reframe({**GOOD_HEADER, "arrays": [["x", "<f4", [-1]]]}, b""), "invalid shape"),
        (_reframe({**GOOD_HEADER, "arrays": [["x", "<u8", [2**40, 2**40]]]}, b""), "declares more than"),
        (_reframe({**GOOD_HEADER, "round": "0"}), "round must be an int"),
        (_reframe({**GOOD_HEADER, "round": True}), "round must be an int"),
        (_reframe({**GOOD_HEADER, "extra": 1}), "exactly kind"),
        (_reframe(b'{"kind": NaN}'), "non-finite"),
        (_reframe(b"\xff\xfe"), "not valid UTF-8 JSON"),
        (_reframe(b"[1, 2]"), "exactly kind"),
        (b"XXXX" + encode(Message("k", 0, "s", 0, -1))[4:], "not a fedguard message"),
    ],
)
def test_malformed_frames_name_the_problem(framed: bytes, message: str) -> None:
    with pytest.raises(MessageError, match=message.replace("[", r"\[").replace("|", r"\|")):
        decode(framed)


def test_oversized_message_is_refused_before_parsing() -> None:
    data = encode(Message("k", 0, "s", 0, -1, arrays={"x": np.zeros(1000, np.uint64)}))
    with pytest.raises(MessageError, match="the limit is 100"):
        decode(data, max_bytes=100)


def test_encoding_refuses_what_it_cannot_carry() -> None:
    with pytest.raises(MessageError, match="dtype object"):
        encode(Message("k", 0, "s", 0, -1, arrays={"x": np.array([object()])}))
    with pytest.raises(MessageError, match="must be finite"):
        encode(Message("k", 0, "s", 0, -1, meta={"x": float("nan")}))
    with pytest.raises(MessageError, match="unsupported type"):
        encode(Message("k", 0, "s", 0, -1, meta={"x": b"bytes"}))


def test_big_endian_arrays_are_sent_little_endian() -> None:
    arr = np.arange(5, dtype=">i4")
    got = decode(encode(Message("k", 0, "s", 0, -1, arrays={"x": arr}))).arrays["x"]
    assert got.dtype == np.dtype("<i4") and got.tolist() == arr.tolist()


def test_schema_validation() -> None:
    schema = MessageSchema(kind="kx", meta={"n": int}, arrays={"key": ("|u1", 1)})
    ok = Message("kx", 0, "s", 0, wire.SERVER, meta={"n": 3}, arrays={"key": bytes_array(b"abc")})
    assert decode(encode(ok), schema=schema).blob("key") == b"abc"
    bad_cases = [
        (Message("ky", 0, "s", 0, -1, meta={"n": 3}, arrays={"key": bytes_array(b"a")}), "expected a 'kx'"),
        (Message("kx", 0, "s", 0, -1, meta={"n": True}, arrays={"key": bytes_array(b"a")}), "got bool"),
        (Message("kx", 0, "s", 0, -1, meta={"n": "3"}, arrays={"key": bytes_array(b"a")}), "got str"),
        (Message("kx", 0, "s", 0, -1, meta={}, arrays={"key": bytes_array(b"a")}), "meta keys"),
        (Message("kx", 0, "s", 0, -1, meta={"n": 3}, arrays={"key": np.zeros(1, "<u8")}), "must be |u1"),
        (Message("kx", 0, "s", 0, -1, meta={"n": 3}, arrays={"key": np.zeros((1, 1), "|u1")}), "1 dims"),
        (Message("kx", 0, "s", 0, -1, meta={"n": 3}, arrays={}), "arrays must be"),
    ]
    for msg, text in bad_cases:
        with pytest.raises(MessageError, match=text.replace("|", r"\|")):
            decode(encode(msg), schema=schema)
