"""How fedguard payloads ride in Flower messages (both ends use this module).

One Flower round trip per protocol stage. The server's message to client ``k`` has message type
``query.fedguard`` and one :class:`~flwr.app.ConfigRecord` named ``"fedguard"``:

==================  =========  ==========================================================================
key                 type       meaning
==================  =========  ==========================================================================
``op``              str        ``"hello"`` (which fedguard client are you?) or ``"stage"``
``round``           int        the federated round ``r``
``stage``           str        the aggregator's stage the ``protocol`` message belongs to
``protocol``        bytes      the server's :mod:`fedguard.wire` message for this stage
``broadcast``       bytes      first stage only: ``θ_r`` as a wire ``global-adapter`` message
``participants``    list[int]  first stage only: the round's public :class:`RoundSpec` ...
``vector_length``   int        ... its ring vector length ``d + 1``,
``ring_bits``       int        ... the ring ``Z_{2^k}`` the sum lives in,
``min_contributors``int        ... the fewest contributors a reveal may hold,
``fixed_point``     bool       ... whether the inputs obey the trainer's fixed-point encoding
``dp_clip_norm``    float      first stage, ``dp:`` runs only: the round's clip norm ``C_r``
                               (:mod:`fedguard_train.flower.dp_split`)
==================  =========  ==========================================================================

The reply carries ``protocol`` (the client's wire reply), ``seconds`` (how long the worker spent on the
stage: where a round's time goes) and, after the first stage, ``loss`` (its mean local loss, which the
in-process round table also reports). Everything fedguard checks is inside the wire
bytes (:func:`fedguard.wire.decode` and the stage machines' guards); Flower's records are only the
envelope.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from flwr.app import ConfigRecord

RECORD: Final[str] = "fedguard"
ACTION: Final[str] = "fedguard"
MESSAGE_TYPE: Final[str] = f"query.{ACTION}"
WORKER_ERROR_CODE: Final[int] = 4521
"""Flower error code of a reply whose worker refused the request or could not be reached."""

_HEADER_KEYS: Final[dict[str, type]] = {"op": str, "round": int, "stage": str, "vector_length": int,
                                        "ring_bits": int, "min_contributors": int, "fixed_point": bool,
                                        "dp_clip_norm": float}
_BLOB_KEYS: Final[tuple[str, ...]] = ("protocol", "broadcast")


def to_record(header: Mapping[str, Any], blobs: Mapping[str, bytes]) -> ConfigRecord:
    """A request (see :func:`fedguard_train.flower.rounds.stage_request`) as the record Flower carries."""
    return ConfigRecord({**dict(header), **dict(blobs)})


def hello_record() -> ConfigRecord:
    return ConfigRecord({"op": "hello"})


def to_worker_request(record: ConfigRecord) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Split a received record into the worker's JSON header and binary blobs (unknown keys dropped,
    values of the wrong type refused by the worker's own checks)."""
    header: dict[str, Any] = {}
    blobs: dict[str, bytes] = {}
    for key, value in record.items():
        if key in _BLOB_KEYS and isinstance(value, bytes):
            blobs[key] = value
        elif key in _HEADER_KEYS and isinstance(value, _HEADER_KEYS[key]):
            header[key] = value
        elif key == "participants" and isinstance(value, list):
            header[key] = [int(v) for v in value if isinstance(v, int)]
    return header, blobs


def from_worker_reply(header: dict[str, Any], blobs: dict[str, bytes]) -> ConfigRecord:
    """The reply record from the worker's answer."""
    values: dict[str, Any] = {}
    if "protocol" in blobs:
        values["protocol"] = blobs["protocol"]
    for key in ("loss", "seconds"):
        if isinstance(header.get(key), float):
            values[key] = header[key]
    for key in ("client", "vector_length"):
        if isinstance(header.get(key), int):
            values[key] = header[key]
    return ConfigRecord(values)
