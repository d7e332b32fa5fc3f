"""Safe serialisation of every fedguard message: no pickle, exact byte counts, typed failures.

Layout of one message (all integers little-endian)::

    offset  size  field
    0       4     magic  b"FGWM"
    4       2     format version (1)
    6       2     flags (must be 0)
    8       4     H: header length in bytes
    12      8     P: payload length in bytes
    20      H     header: UTF-8 JSON {"kind", "round", "stage", "sender", "recipient", "meta", "arrays"}
    20+H    P     the arrays' raw little-endian bytes, concatenated in header order
    20+H+P  16    BLAKE2b-128 digest of every preceding byte

``arrays`` in the header lists ``[name, dtype, shape]`` per array; dtypes come from a fixed whitelist of
little-endian numeric types (never ``object``). :func:`decode` checks the magic, version, flags, lengths,
digest, JSON, dtypes, shapes and (optionally) a :class:`MessageSchema`, and raises :class:`MessageError`
for anything wrong: a truncated, oversized, wrong-version, wrong-dtype or bit-flipped payload never
escapes as another exception. Every header field is bounded before it is used (the same bounds apply when
encoding, so nothing encodable is refused): ids in the int64 range, meta integers within
:data:`MAX_META_INT` and nesting within 8 levels, names within :data:`MAX_NAME_CHARS` characters, at most
:data:`MAX_ARRAYS` arrays of at most :data:`MAX_NDIM` dimensions and :data:`MAX_ELEMENTS` elements (a zero
dimension counted as 1); the header itself is at most :data:`MAX_HEADER_BYTES`. ``tests/test_wire_fuzz.py``
sends 100,000 random, mutated and structure-aware payloads through :func:`decode` on every test run. The digest is an integrity check against corruption, not authentication:
protocols that need authenticity (secure aggregation's client-to-client shares) encrypt with AEAD on top.

>>> msg = Message(kind="demo", round=3, stage="input", sender=1, recipient=SERVER,
...               arrays={"x": np.arange(4, dtype=np.uint64)})
>>> data = encode(msg)
>>> len(data) == encoded_size(msg)
True
>>> decode(data).arrays["x"].tolist()
[0, 1, 2, 3]
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from fedguard.checks import int_problem, is_int
from fedguard.errors import MessageError

MAGIC: Final[bytes] = b"FGWM"
VERSION: Final[int] = 1
SERVER: Final[int] = -1
"""The party id of the server (clients have ids >= 0)."""
BROADCAST: Final[int] = -2
"""Recipient id of a message meant for every client."""

_PREFIX = struct.Struct("<4sHHIQ")
_DIGEST_BYTES: Final[int] = 16
MAX_HEADER_BYTES: Final[int] = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES: Final[int] = 1 << 32
_MAX_META_DEPTH: Final[int] = 8
MAX_ID: Final[int] = 2**63 - 1
"""Bound on ``|round|``, ``|sender|`` and ``|recipient|`` (int64)."""
MAX_META_INT: Final[int] = 2**8192
"""Bound on ``|v|`` for every integer in ``meta``: room for Paillier slot bounds of any supported key size
(a few hundred bits), well below Python's 4,300-digit parsing limit, so a huge integer is refused here."""
MAX_NAME_CHARS: Final[int] = 256
"""Longest ``kind``, ``stage`` or array name."""
MAX_ARRAYS: Final[int] = 256
"""Most arrays in one message."""
MAX_NDIM: Final[int] = 16
"""Most dimensions of one array."""
MAX_ELEMENTS: Final[int] = 2**40
"""Bound on the product of an array's dimensions, counting a zero dimension as 1 (so that a shape such as
``(0, 10**30)`` is refused before numpy sees it)."""

ALLOWED_DTYPES: Final[frozenset[str]] = frozenset(
    {"|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8", "|b1"}
)

JSONValue = Any  # str | int | float | bool | None | list[JSONValue] | dict[str, JSONValue]


def _canonical_dtype(dtype: np.dtype) -> str:
    return np.dtype(dtype).newbyteorder("<").str if np.dtype(dtype).itemsize > 1 else np.dtype(dtype).str


def _check_meta(value: JSONValue, path: str, depth: int = 0) -> None:
    if depth > _MAX_META_DEPTH:
        raise MessageError(f"meta nests deeper than {_MAX_META_DEPTH} at {path}")
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if not -MAX_META_INT <= value <= MAX_META_INT:
            raise MessageError(f"meta integer {path} is outside [-2^8192, 2^8192] ({value.bit_length()} bits)")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MessageError(f"meta value {path} must be finite, got {value}")
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_meta(v, f"{path}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise MessageError(f"meta keys must be strings, got {k!r} at {path}")
            _check_meta(v, f"{path}.{k}", depth + 1)
        return
    raise MessageError(f"meta value {path} has unsupported type {type(value).__name__}")


def _check_routing(kind: object, stage: object, ids: Mapping[str, object]) -> None:
    """The bounds every header's routing fields obey, on encoding and on decoding alike."""
    for fname, text in (("kind", kind), ("stage", stage)):
        if not isinstance(text, str):
            raise MessageError(f"header {fname} must be a string, got {type(text).__name__}")
        if len(text) > MAX_NAME_CHARS:
            raise MessageError(f"header {fname} is {len(text)} characters, the limit is {MAX_NAME_CHARS}")
    for fname, value in ids.items():
        if not is_int(value):
            raise MessageError(f"header {fname} must be an int, got {type(value).__name__}")
        if not -MAX_ID <= int(value) <= MAX_ID:  # type: ignore[call-overload]
            raise MessageError(f"header {fname} is outside the int64 range")


def _check_shape(name: str, shape: object) -> list[int]:
    """A shape as a list of ints, or :class:`MessageError`: at most :data:`MAX_NDIM` dims, each >= 0, and
    at most :data:`MAX_ELEMENTS` elements even when a dimension is 0."""
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise MessageError(f"array {name!r} has an invalid shape (a list of ints >= 0 is needed)")
    if len(shape) > MAX_NDIM:
        raise MessageError(f"array {name!r} has {len(shape)} dimensions, the limit is {MAX_NDIM}")
    bound = 1
    for d in shape:
        bound *= max(int(d), 1)
        if bound > MAX_ELEMENTS:
            raise MessageError(f"array {name!r} declares more than {MAX_ELEMENTS} elements")
    return [int(d) for d in shape]


@dataclass(frozen=True, slots=True)
class Message:
    """One protocol message: routing fields, JSON metadata and named numeric arrays.

    ``sender``/``recipient`` are party ids: clients are ``>= 0``, :data:`SERVER` is -1 and
    :data:`BROADCAST` (-2) addresses every client. Arrays decoded from bytes are read-only views.
    """

    kind: str
    round: int
    stage: str
    sender: int
    recipient: int
    meta: Mapping[str, JSONValue] = field(default_factory=dict)
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)

    def blob(self, name: str) -> bytes:
        """Array ``name`` (a uint8 array) as bytes: how keys and ciphertexts travel."""
        return self.array(name, "|u1").tobytes()

    def array(self, name: str, dtype: str | None = None) -> np.ndarray:
        """Array ``name``, checked to exist (and to have ``dtype``): :class:`MessageError` otherwise."""
        if name not in self.arrays:
            raise MessageError(f"{self.kind} message has no array {name!r} (has {sorted(self.arrays)})")
        arr = self.arrays[name]
        if dtype is not None and _canonical_dtype(arr.dtype) != dtype:
            raise MessageError(f"array {name!r} of a {self.kind} message must be {dtype}, got {arr.dtype.str}")
        return arr


def bytes_array(data: bytes) -> np.ndarray:
    """Wrap raw bytes (a key, a ciphertext) as a uint8 array for :class:`Message.arrays`."""
    return np.frombuffer(bytes(data), dtype=np.uint8)


def _header(msg: Message, *, materialize: bool = True) -> tuple[bytes, list[np.ndarray], int]:
    """Header bytes, the arrays to send (little-endian, C order) and the payload length.

    With ``materialize=False`` no array is converted or copied: only dtypes and shapes are read, so the
    size of a message over a huge (e.g. broadcast, zero-stride) array can be computed exactly.
    """
    if not isinstance(msg.kind, str) or not msg.kind or not isinstance(msg.stage, str):
        raise MessageError(f"kind and stage must be non-empty strings, got {msg.kind!r}, {msg.stage!r}")
    for fname in ("round", "sender", "recipient"):
        problem = int_problem(fname, getattr(msg, fname))
        if problem:
            raise MessageError(problem)
    _check_routing(msg.kind, msg.stage, {f: getattr(msg, f) for f in ("round", "sender", "recipient")})
    _check_meta(dict(msg.meta), "meta")
    if len(msg.arrays) > MAX_ARRAYS:
        raise MessageError(f"a message carries at most {MAX_ARRAYS} arrays, got {len(msg.arrays)}")
    specs, arrays, payload = [], [], 0
    for name, arr in msg.arrays.items():
        if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
            raise MessageError(f"array names must be strings of at most {MAX_NAME_CHARS} characters")
        dtype = getattr(arr, "dtype", None)
        if dtype is None:
            arr = np.asarray(arr)
            dtype = arr.dtype
        dt = _canonical_dtype(dtype)
        if dt not in ALLOWED_DTYPES:
            raise MessageError(f"array {name!r} has dtype {dtype}, allowed: {sorted(ALLOWED_DTYPES)}")
        shape = _check_shape(name, [int(d) for d in np.shape(arr)])
        specs.append([str(name), dt, shape])
        payload += math.prod(shape) * np.dtype(dt).itemsize
        if materialize:
            arrays.append(np.asarray(arr, dtype=np.dtype(dt), order="C"))  # keeps 0-d arrays 0-d
    header = {
        "kind": msg.kind,
        "round": int(msg.round),
        "stage": msg.stage,
        "sender": int(msg.sender),
        "recipient": int(msg.recipient),
        "meta": dict(msg.meta),
        "arrays": specs,
    }
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False, sort_keys=True).encode()
    if len(raw) > MAX_HEADER_BYTES:
        raise MessageError(f"header is {len(raw)} bytes, the limit is {MAX_HEADER_BYTES}")
    return raw, arrays, payload


def encoded_size(msg: Message) -> int:
    """The exact length of ``encode(msg)``, computed from dtypes and shapes alone (nothing is copied)."""
    raw, _, payload = _header(msg, materialize=False)
    return _PREFIX.size + len(raw) + payload + _DIGEST_BYTES


def encode(msg: Message) -> bytes:
    """Serialise ``msg`` (see the module docstring for the format)."""
    raw, arrays, payload_len = _header(msg)
    digest = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    parts = [_PREFIX.pack(MAGIC, VERSION, 0, len(raw), payload_len), raw]
    parts.extend(a.tobytes() for a in arrays)
    for p in parts:
        digest.update(p)
    parts.append(digest.digest())
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class MessageSchema:
    """What a receiving stage accepts: the message kind, required meta keys with their types, and
    required arrays with their dtype and number of dimensions. Extra meta keys or arrays are refused."""

    kind: str
    meta: Mapping[str, type | tuple[type, ...]] = field(default_factory=dict)
    arrays: Mapping[str, tuple[str, int]] = field(default_factory=dict)

    def validate(self, msg: Message) -> None:
        if msg.kind != self.kind:
            raise MessageError(f"expected a {self.kind!r} message, got {msg.kind!r}")
        if set(msg.meta) != set(self.meta):
            raise MessageError(
                f"{self.kind} message meta keys must be {sorted(self.meta)}, got {sorted(msg.meta)}"
            )
        for key, typ in self.meta.items():
            v = msg.meta[key]
            if isinstance(v, bool) and typ is not bool and (not isinstance(typ, tuple) or bool not in typ):
                raise MessageError(f"{self.kind} meta {key!r} must be {typ}, got bool")
            if not isinstance(v, typ):
                raise MessageError(f"{self.kind} meta {key!r} must be {typ}, got {type(v).__name__}")
        if set(msg.arrays) != set(self.arrays):
            raise MessageError(
                f"{self.kind} message arrays must be {sorted(self.arrays)}, got {sorted(msg.arrays)}"
            )
        for name, (dtype, ndim) in self.arrays.items():
            arr = msg.array(name, dtype)
            if arr.ndim != ndim:
                raise MessageError(f"array {name!r} of a {self.kind} message must have {ndim} dims, got {arr.ndim}")


def _reject_constant(name: str) -> Any:
    raise MessageError(f"header contains the non-finite number {name}")


def decode(
    data: bytes | bytearray | memoryview,
    *,
    schema: MessageSchema | None = None,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> Message:
    """Parse and verify one message; every failure is a :class:`MessageError`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"a message must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise MessageError(f"message is {len(data)} bytes, the limit is {max_bytes}")
    if len(data) < _PREFIX.size + _DIGEST_BYTES:
        raise MessageError(f"message is truncated: {len(data)} bytes is shorter than the fixed framing")
    magic, version, flags, header_len, payload_len = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise MessageError(f"not a fedguard message (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise MessageError(f"unsupported message format version {version} (this fedguard reads {VERSION})")
    if flags != 0:
        raise MessageError(f"unknown flags {flags:#06x}")
    if header_len > MAX_HEADER_BYTES:
        raise MessageError(f"header length {header_len} exceeds the limit {MAX_HEADER_BYTES}")
    expected = _PREFIX.size + header_len + payload_len + _DIGEST_BYTES
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise MessageError(f"message {what}: {len(data)} bytes, the framing declares {expected}")
    body_end = len(data) - _DIGEST_BYTES
    if hashlib.blake2b(data[:body_end], digest_size=_DIGEST_BYTES).digest() != data[body_end:]:
        raise MessageError("message digest mismatch: the bytes were corrupted in transit")
    try:
        header = json.loads(
            data[_PREFIX.size : _PREFIX.size + header_len].decode("utf-8"), parse_constant=_reject_constant
        )
    except (ValueError, RecursionError) as err:  # bad UTF-8/JSON, or an integer beyond Python's digit limit
        raise MessageError(f"header is not valid UTF-8 JSON: {str(err)[:200]}") from err
    try:
        msg = _from_header(header, data, _PREFIX.size + header_len, payload_len)
    except MessageError:
        raise
    except (ValueError, TypeError, OverflowError, MemoryError, RecursionError) as err:
        # unreachable by design (every field is bounded above); kept so that decode never lets another
        # exception type escape, whatever a future header field allows
        raise MessageError(f"header refused: {type(err).__name__}: {str(err)[:200]}") from err
    if schema is not None:
        schema.validate(msg)
    return msg


def _from_header(header: Any, data: bytes, start: int, payload_len: int) -> Message:
    if not isinstance(header, dict) or set(header) != {
        "kind", "round", "stage", "sender", "recipient", "meta", "arrays"
    }:
        raise MessageError("header must be an object with exactly kind, round, stage, sender, recipient, meta, arrays")
    _check_routing(header["kind"], header["stage"], {k: header[k] for k in ("round", "sender", "recipient")})
    if not isinstance(header["meta"], dict) or not isinstance(header["arrays"], list):
        raise MessageError("header meta must be an object and arrays a list")
    _check_meta(header["meta"], "meta")
    if len(header["arrays"]) > MAX_ARRAYS:
        raise MessageError(f"a message carries at most {MAX_ARRAYS} arrays, got {len(header['arrays'])}")
    arrays: dict[str, np.ndarray] = {}
    offset = start
    for spec in header["arrays"]:
        if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str) and isinstance(spec[1], str)):
            raise MessageError("array spec must be [name, dtype, shape]")
        name, dt, raw_shape = spec
        if len(name) > MAX_NAME_CHARS:
            raise MessageError(f"array names must be at most {MAX_NAME_CHARS} characters, got {len(name)}")
        if dt not in ALLOWED_DTYPES:
            raise MessageError(f"array {name!r} has dtype {dt[:32]!r}, allowed: {sorted(ALLOWED_DTYPES)}")
        shape = _check_shape(name, raw_shape)
        if name in arrays:
            raise MessageError(f"array {name!r} appears twice")
        dtype = np.dtype(dt)
        nbytes = math.prod(shape) * dtype.itemsize
        if offset + nbytes > start + payload_len:
            raise MessageError(f"array {name!r} runs past the payload ({nbytes} bytes declared)")
        arrays[name] = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
        offset += nbytes
    if offset != start + payload_len:
        raise MessageError(f"payload has {start + payload_len - offset} bytes no array claims")
    return Message(
        kind=header["kind"],
        round=header["round"],
        stage=header["stage"],
        sender=header["sender"],
        recipient=header["recipient"],
        meta=header["meta"],
        arrays=arrays,
    )
