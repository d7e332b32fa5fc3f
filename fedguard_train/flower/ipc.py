"""The local link between a Flower ClientApp and the fedguard client worker on the same machine.

Flower's Deployment Engine runs a ClientApp in a fresh ``flwr-clientapp`` process for *every* message
(Flower 1.42, ``flwr.supernode.runtime.run_clientapp``): nothing it holds in memory survives to the next
stage of the protocol. A secure aggregator's client side, however, keeps secrets from stage to stage
(masking's key pairs and seeds), and the model should not be reloaded per message. So each client machine
runs one long-lived :mod:`fedguard_train.flower.worker` process that holds the model, the hooks and the
aggregator's :class:`~fedguard.federation.protocol.ClientSide`; the ClientApp forwards each Flower
message to it over a Unix-domain socket and returns its answer. Secrets never enter Flower's
``Context`` (which the SuperNode stores) nor leave the machine except as protocol messages.

One request and one reply per connection. A frame is::

    4 bytes   magic b"FGIP"
    4 bytes   H: header length (little-endian), H <= 64 KiB
    H bytes   UTF-8 JSON object; its "blobs" entry lists [name, length] of each binary part
    ...       the blobs' bytes, in the header's order (each <= MAX_BLOB_BYTES)

Everything read is bounded before it is allocated; a malformed frame raises
:class:`~fedguard.errors.MessageError`. This module imports neither torch nor flwr: the relay process
that uses it starts once per message and must start fast.

The socket lives in a directory of mode 0700 and is itself 0600: only the client machine's user (the
same account that runs the SuperNode) can talk to the worker.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from fedguard.errors import MessageError

MAGIC: Final[bytes] = b"FGIP"
MAX_HEADER_BYTES: Final[int] = 1 << 16
MAX_BLOB_BYTES: Final[int] = 1 << 34
MAX_BLOBS: Final[int] = 8
_PREFIX = struct.Struct("<4sI")


@contextmanager
def listen_private(path: Path, backlog: int) -> Iterator[socket.socket]:
    """A Unix-domain socket listening at ``path`` (a stale socket file there is replaced), created 0600
    (umask 0o177 around ``bind``, so it is never reachable by another user, not even briefly); closed and
    its file removed when the block ends, however it ends."""
    if path.exists():
        path.unlink()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        server.bind(str(path))
    finally:
        os.umask(old)
    server.listen(backlog)
    try:
        yield server
    finally:
        server.close()
        if path.exists():
            path.unlink()


def encode_frame(header: Mapping[str, Any], blobs: Mapping[str, bytes] | None = None) -> bytes:
    """One frame: ``header`` (JSON-plain values) and named binary ``blobs``."""
    blobs = dict(blobs or {})
    if len(blobs) > MAX_BLOBS:
        raise MessageError(f"a frame carries at most {MAX_BLOBS} blobs, got {len(blobs)}")
    head = dict(header)
    head["blobs"] = [[name, len(data)] for name, data in blobs.items()]
    raw = json.dumps(head, separators=(",", ":")).encode()
    if len(raw) > MAX_HEADER_BYTES:
        raise MessageError(f"frame header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    return _PREFIX.pack(MAGIC, len(raw)) + raw + b"".join(blobs.values())


def _read_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise MessageError(f"connection closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Read one frame; :class:`MessageError` for anything malformed (nothing unbounded is allocated)."""
    magic, size = _PREFIX.unpack(_read_exact(sock, _PREFIX.size))
    if magic != MAGIC:
        raise MessageError(f"not a fedguard IPC frame (magic {magic!r})")
    if size > MAX_HEADER_BYTES:
        raise MessageError(f"frame header of {size} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = json.loads(_read_exact(sock, size).decode())
    except (UnicodeDecodeError, ValueError) as err:
        raise MessageError(f"frame header is not UTF-8 JSON: {err}") from err
    if not isinstance(header, dict):
        raise MessageError("frame header must be a JSON object")
    listed = header.pop("blobs", [])
    if not isinstance(listed, list) or len(listed) > MAX_BLOBS:
        raise MessageError(f"frame must list at most {MAX_BLOBS} blobs")
    blobs: dict[str, bytes] = {}
    for entry in listed:
        if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str)
                or not isinstance(entry[1], int) or isinstance(entry[1], bool)
                or not 0 <= entry[1] <= MAX_BLOB_BYTES or entry[0] in blobs):
            raise MessageError(f"bad blob entry {entry!r}")
        blobs[entry[0]] = _read_exact(sock, entry[1])
    return header, blobs


def request(path: str, header: Mapping[str, Any], blobs: Mapping[str, bytes] | None = None, *,
            timeout: float) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Send one request to the worker listening on ``path`` and return its reply (``OSError`` when it
    cannot be reached within ``timeout`` seconds; :class:`MessageError` for a malformed reply)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(encode_frame(header, blobs))
        return read_frame(sock)
