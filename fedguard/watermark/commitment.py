"""Key commitments: a public hash of a key, recorded before training, that a later claim must match.

Why. Verification only tells whether *some* key matches a model. Without a commitment a thief holding a
released model can try seeds until one verifies by chance (at significance α about 1/α tries: 10^6 at
the default 1e-6, seconds on a laptop) or build a key around the model. A claim is only convincing if the
key was fixed *before* the model existed.

What. ``c = SHA-256("fedguard/watermark/commitment/v1" ‖ canonical JSON of the key's payload)``. The
payload holds the 256-bit secret seed and every parameter (targets, bits, offsets, scales, mode, γ0, α,
owner), so ``c`` binds all of them (SHA-256 collision resistance) and hides the seed (2^256 seeds; the
seed is uniformly random). The trainer writes ``client-<k>.commitment.json`` beside each key at round 0
and records the commitments in every checkpoint's state; a client may publish its commitment or have it
timestamped (RFC 3161) — the audit reports whether a claimant's key matches a commitment and whether that
commitment predates the model (by the commitment's recorded time, by the model files' modification
time, and by whether the model's own run state lists it).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from fedguard.errors import ConfigError
from fedguard.files import atomic_write
from fedguard.watermark.keys import CorruptKeyError, WatermarkKey

COMMITMENT_FORMAT: Final[str] = "fedguard-watermark-commitment"
COMMITMENT_VERSION: Final[int] = 1
_DOMAIN: Final[bytes] = b"fedguard/watermark/commitment/v1\x00"


def commit(key: WatermarkKey) -> str:
    """The hex commitment of ``key`` (binds the seed and all parameters; hides the seed)."""
    canonical = json.dumps(key.payload(), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(_DOMAIN + canonical).hexdigest()


@dataclass(frozen=True, slots=True)
class Commitment:
    """A published commitment: the hash, the public key id and owner label, when it was made (UTC, as
    recorded by its maker; a trusted timestamp is what makes it evidence) and free-form context."""

    commitment: str
    key_id: str
    owner: str
    created_at: str
    context: str = ""

    @property
    def created(self) -> datetime:
        return datetime.fromisoformat(self.created_at)

    def to_json(self) -> dict[str, Any]:
        return {"format": COMMITMENT_FORMAT, "version": COMMITMENT_VERSION, "commitment": self.commitment,
                "key_id": self.key_id, "owner": self.owner, "created_at": self.created_at,
                "context": self.context}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], *, source: str = "<commitment>") -> Commitment:
        if doc.get("format") != COMMITMENT_FORMAT or doc.get("version") != COMMITMENT_VERSION:
            raise CorruptKeyError(f"{source} is not a {COMMITMENT_FORMAT} v{COMMITMENT_VERSION} document")
        try:
            out = cls(str(doc["commitment"]), str(doc["key_id"]), str(doc.get("owner", "")),
                      str(doc["created_at"]), str(doc.get("context", "")))
            out.created  # noqa: B018 - validates the timestamp
        except (KeyError, ValueError) as err:
            raise CorruptKeyError(f"{source} has a missing or malformed field: {err!r}") from err
        if len(out.commitment) != 64 or any(c not in "0123456789abcdef" for c in out.commitment):
            raise CorruptKeyError(f"{source}: commitment must be 64 lowercase hex digits")
        return out

    def matches(self, key: WatermarkKey) -> bool:
        return self.commitment == commit(key)


def make_commitment(key: WatermarkKey, *, context: str = "", now: datetime | None = None) -> Commitment:
    when = (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")
    return Commitment(commit(key), key.key_id, key.owner, when, context)


def save_commitment(commitment: Commitment, path: str | os.PathLike[str]) -> Path:
    """Write a commitment file (public; mode 0644); an existing file is never replaced."""
    target = Path(path)
    if target.exists() or target.is_symlink():
        raise ConfigError(f"refusing to overwrite commitment {target}: commitments are never replaced")
    if not target.parent.is_dir():
        raise ConfigError(f"cannot write commitment {target}: directory {target.parent} does not exist")
    return atomic_write(target, json.dumps(commitment.to_json(), indent=1) + "\n", mode=0o644,
                        overwrite=False)


def load_commitment(path: str | os.PathLike[str]) -> Commitment:
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"commitment file {p} does not exist") from err
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptKeyError(f"commitment file {p} is not valid JSON: {err}") from err
    if not isinstance(doc, dict):
        raise CorruptKeyError(f"commitment file {p} is not a JSON object")
    return Commitment.from_json(doc, source=str(p))
