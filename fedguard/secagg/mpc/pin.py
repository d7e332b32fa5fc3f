"""The compute parties' public keys as a client pins them: the party-keys file (a light module).

A client of ``aggregator: mpc`` encrypts its shares to the parties' X25519 public keys
(:func:`fedguard.secagg.mpc.sharing.seal`). Whoever gives the client those keys decides who can read its
shares: if the server could hand them out, it could name parties it runs itself and decrypt every share.
So a client that does not start the parties (a Flower worker, a client machine) takes the keys from a
**party-keys file** that whoever starts the parties writes and hands to the clients out of band, at set-up,
like a TLS root certificate (``aggregator_options.party_keys_file``): the client seals only to those keys
and refuses a round whose request names any others (their fingerprint, ``keys_fingerprint``, travels in the
request; :class:`fedguard.errors.ProtocolViolation`).

The file is JSON, public (it holds no secret)::

    {"format": "fedguard-mpc-party-keys/1", "n_parties": 3,
     "public_keys": ["<64 hex digits: party 0's raw X25519 key>", "...", "..."]}

Keys are in party order (rank 0 first). Parties whose keys can be pinned must keep them across restarts:
the party program's ``--key-file`` (``python -m fedguard.secagg.mpc.network party-keygen``), whereas the
``crypten`` and ``simulated`` backends draw fresh keys at every start. Only ``json`` and ``pathlib`` are
imported here, so :mod:`fedguard.secagg.mpc.options` can check a pin file before anything heavy loads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from fedguard.errors import ConfigError
from fedguard.files import atomic_write

__all__ = ["PIN_FORMAT", "party_keys_problem", "read_party_keys", "write_party_keys"]

PIN_FORMAT: Final[str] = "fedguard-mpc-party-keys/1"
PUBLIC_KEY_BYTES: Final[int] = 32
MAX_PIN_BYTES: Final[int] = 1 << 16


def _encode(keys: Sequence[bytes]) -> str:
    return json.dumps({"format": PIN_FORMAT, "n_parties": len(keys), "public_keys": [k.hex() for k in keys]},
                      indent=1) + "\n"


def write_party_keys(path: str | Path, keys: Sequence[bytes], *, overwrite: bool = False) -> Path:
    """Write the party-keys file for ``keys`` (raw 32-byte X25519 public keys, party order) atomically.

    An existing file with the same keys is left as it is; one with other keys is replaced only with
    ``overwrite=True`` (:class:`ConfigError` otherwise: clients may have pinned it)."""
    keys = tuple(keys)
    if not 2 <= len(keys) <= 16 or any(not isinstance(k, bytes) or len(k) != PUBLIC_KEY_BYTES for k in keys):
        raise ConfigError(f"a party-keys file holds 2 to 16 public keys of {PUBLIC_KEY_BYTES} bytes each")
    target = Path(path)
    if target.exists() and not overwrite:
        if read_party_keys(target) == keys:
            return target
        raise ConfigError(f"refusing to overwrite the party-keys file {target}: it pins other keys")
    return atomic_write(target, _encode(keys))


def read_party_keys(path: str | Path, n_parties: int | None = None) -> tuple[bytes, ...]:
    """The pinned public keys in ``path`` (party order); :class:`ConfigError` when the file is missing,
    malformed, or (with ``n_parties``) pins another number of parties."""
    target = Path(path)
    try:
        raw = target.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read the party-keys file {target}: {err}") from err
    if len(raw) > MAX_PIN_BYTES:
        raise ConfigError(f"the party-keys file {target} is too large ({len(raw)} bytes)")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"the party-keys file {target} is not JSON: {err}") from err
    if not isinstance(data, dict) or data.get("format") != PIN_FORMAT:
        raise ConfigError(f"the party-keys file {target} is not a {PIN_FORMAT!r} file")
    hexes = data.get("public_keys")
    if not isinstance(hexes, list) or not 2 <= len(hexes) <= 16 or data.get("n_parties") != len(hexes):
        raise ConfigError(f"the party-keys file {target} must list 2 to 16 public keys and their number as n_parties")
    keys = []
    for rank, text in enumerate(hexes):
        try:
            key = bytes.fromhex(text) if isinstance(text, str) else b""
        except ValueError:
            key = b""
        if len(key) != PUBLIC_KEY_BYTES:
            raise ConfigError(f"the party-keys file {target}: party {rank}'s key must be {2 * PUBLIC_KEY_BYTES} "
                              "hex digits")
        keys.append(key)
    if len(set(keys)) != len(keys):
        raise ConfigError(f"the party-keys file {target} names one key for two parties")
    if n_parties is not None and len(keys) != n_parties:
        raise ConfigError(f"the party-keys file {target} pins {len(keys)} parties, the configuration has "
                          f"n_parties={n_parties}")
    return tuple(keys)


def party_keys_problem(path: object, n_parties: int | None = None) -> str | None:
    """Why ``path`` is not a readable party-keys file for ``n_parties`` parties (``None`` if it is)."""
    if not isinstance(path, str) or not path:
        return f"party_keys_file must be a non-empty string or None, got {path!r}"
    try:
        read_party_keys(path, n_parties)
    except ConfigError as err:
        return str(err)
    return None
