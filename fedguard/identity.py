"""Long-term client identities (Ed25519) and the roster that every client receives out of band.

Secure aggregation against an *active* server (Bonawitz et al., CCS 2017, §4 "active adversary"; the
FATE-LLM paper's threat model, /work/shared/paper/fate-llm.md, leaves it open) needs a public-key
infrastructure the server does not control: each client ``u`` holds a signing key ``sk_u`` and every
client knows every ``pk_u`` from a **roster** distributed out of band. A client signs what it sends
through the server (its round keys, the survivor set it was told about); a receiver accepts a relayed
item only when ``Verify(pk_u, context ‖ item, σ)`` holds, so a server that substitutes keys or lies
about the survivors is caught.

* :class:`Identity`: one client's Ed25519 key pair; :meth:`Identity.save` writes the raw 32-byte seed
  into a new file with mode 0600 (never over an existing one), :meth:`Identity.load` refuses a file
  readable by others.
* :class:`Roster`: ``{client id: public key}`` with SHA-256 fingerprints; the JSON file carries each
  fingerprint next to its key and :meth:`Roster.load` refuses a file whose fingerprints do not match
  (a typo or a swapped key when the roster was assembled by hand).
* :func:`signed_context`: the domain-separated byte string every signature covers:
  ``b"fedguard/v1/" ‖ purpose ‖ len-prefixed(deployment) ‖ round ‖ client ‖ body``. Binding the
  deployment, round and signer makes a signature useless in another deployment, round or for another
  client (replay across rounds is refused).

Ed25519 signatures are deterministic (RFC 8032), so signing needs no randomness.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from fedguard.checks import int_problem
from fedguard.errors import ConfigError, MessageError
from fedguard.files import atomic_write

if TYPE_CHECKING:
    from fedguard.cli import Commands

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
ROSTER_FORMAT = "fedguard-roster/v1"
_MAGIC = b"fedguard-identity/v1\n"


def fingerprint(public_key: bytes) -> str:
    """``SHA-256(pk)`` in hex, grouped by 4 for reading aloud: how people compare keys out of band."""
    digest = hashlib.sha256(b"fedguard/identity/" + public_key).hexdigest()
    return ":".join(digest[i:i + 4] for i in range(0, 32, 4))


def signed_context(purpose: str, *, deployment: str, round_id: int, client: int, body: bytes) -> bytes:
    """The exact bytes a signature covers (see the module docstring)."""
    dep = deployment.encode()
    head = b"fedguard/v1/" + purpose.encode() + b"\x00"
    return head + struct.pack("<I", len(dep)) + dep + struct.pack("<qq", round_id, client) + body


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``message`` under ``public_key``."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """One client's long-term Ed25519 key pair."""

    client_id: int
    _key: Ed25519PrivateKey

    @classmethod
    def generate(cls, client_id: int) -> Identity:
        """A fresh identity from OS entropy."""
        problem = int_problem("client_id", client_id, low=0)
        if problem:
            raise ConfigError(problem)
        return cls(client_id, Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> bytes:
        return self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def sign(self, purpose: str, *, deployment: str, round_id: int, body: bytes) -> bytes:
        """``Sign(sk, signed_context(purpose, deployment, round, self.client_id, body))``."""
        return self._key.sign(signed_context(purpose, deployment=deployment, round_id=round_id,
                                             client=self.client_id, body=body))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the identity into a new file with mode 0600; an existing file is never overwritten."""
        seed = self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return atomic_write(path, _MAGIC + struct.pack("<q", self.client_id) + seed, mode=0o600, overwrite=False)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read an identity written by :meth:`save`; refuses a file others can read or a foreign format."""
        p = Path(path)
        try:
            st = p.stat()
            data = p.read_bytes()
        except OSError as err:
            raise ConfigError(f"cannot read identity file {p}: {err}") from err
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"identity file {p} is readable by others (mode {stat.S_IMODE(st.st_mode):o}); "
                              "chmod 600 it")
        if len(data) != len(_MAGIC) + 8 + 32 or not data.startswith(_MAGIC):
            raise ConfigError(f"{p} is not a fedguard identity file")
        (client_id,) = struct.unpack_from("<q", data, len(_MAGIC))
        return cls(client_id, Ed25519PrivateKey.from_private_bytes(data[len(_MAGIC) + 8:]))


@dataclass(frozen=True)
class Roster:
    """``{client id: Ed25519 public key}``: who may take part, as every client knows it out of band."""

    keys: Mapping[int, bytes]
    deployment: str

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.deployment, str) or not self.deployment:
            problems.append("deployment must be a non-empty string")
        for cid, key in self.keys.items():
            problem = int_problem("roster client id", cid, low=0)
            if problem:
                problems.append(problem)
            if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_BYTES:
                problems.append(f"public key of client {cid} must be {PUBLIC_KEY_BYTES} bytes")
        if problems:
            raise ConfigError.collect(problems)
        object.__setattr__(self, "_parsed", {})  # client -> Ed25519PublicKey, parsed once (a round verifies many)

    def __reduce__(self) -> tuple[type[Roster], tuple[dict[int, bytes], str]]:
        """Pickled (e.g. to an MPC party process) as its keys and deployment, without the parsed-key cache."""
        return (Roster, (dict(self.keys), self.deployment))

    @classmethod
    def of(cls, identities: Mapping[int, Identity] | list[Identity], deployment: str) -> Roster:
        items = identities.values() if isinstance(identities, Mapping) else identities
        return cls({i.client_id: i.public_key for i in items}, deployment)

    def key(self, client: int) -> bytes:
        """Client ``client``'s public key; :class:`MessageError` for a client not on the roster (a Sybil)."""
        try:
            return self.keys[client]
        except KeyError:
            raise MessageError(f"client {client} is not on the roster of deployment {self.deployment!r}") from None

    def verify(self, purpose: str, *, round_id: int, client: int, body: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is ``client``'s signature of ``body`` for ``purpose`` in this deployment
        and round (``False`` for a client not on the roster)."""
        if client not in self.keys or len(signature) != SIGNATURE_BYTES:
            return False
        parsed: dict[int, Ed25519PublicKey] = self._parsed  # type: ignore[attr-defined]
        key = parsed.get(client)
        if key is None:
            try:
                key = parsed[client] = Ed25519PublicKey.from_public_bytes(self.keys[client])
            except ValueError:
                return False
        try:
            key.verify(signature, signed_context(purpose, deployment=self.deployment, round_id=round_id,
                                                 client=client, body=body))
        except InvalidSignature:
            return False
        return True

    def to_json(self) -> str:
        clients = {str(c): {"public_key": k.hex(), "fingerprint": fingerprint(k)} for c, k in sorted(self.keys.items())}
        return json.dumps({"format": ROSTER_FORMAT, "deployment": self.deployment, "clients": clients}, indent=2)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        return atomic_write(path, self.to_json() + "\n", overwrite=overwrite)

    @classmethod
    def from_json(cls, text: str, *, what: str = "roster") -> Roster:
        try:
            raw: Any = json.loads(text)
        except ValueError as err:
            raise ConfigError(f"{what} is not JSON: {err}") from err
        if not isinstance(raw, dict) or raw.get("format") != ROSTER_FORMAT or not isinstance(raw.get("clients"), dict):
            raise ConfigError(f"{what} is not a {ROSTER_FORMAT} file")
        keys: dict[int, bytes] = {}
        problems = []
        for cid, entry in raw["clients"].items():
            try:
                key = bytes.fromhex(entry["public_key"])
                client = int(cid)
            except (KeyError, TypeError, ValueError):
                problems.append(f"client {cid!r}: needs a hex public_key")
                continue
            if entry.get("fingerprint") != fingerprint(key):
                problems.append(f"client {cid}: fingerprint {entry.get('fingerprint')!r} does not match its key "
                                f"({fingerprint(key)})")
            keys[client] = key
        if problems:
            raise ConfigError.collect([f"{what}: {p}" for p in problems])
        return cls(keys, str(raw.get("deployment", "")))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Roster:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"cannot read roster {path}: {err}") from err
        return cls.from_json(text, what=f"roster {path}")


# -- command line --------------------------------------------------------------------------------------
def register_cli(commands: Commands) -> None:
    """``fedguard keygen identity`` and ``fedguard roster add|show``."""
    p = commands.subcommand("keygen", "identity", help="generate a client's long-term Ed25519 identity (0600 file)")
    p.add_argument("--client", type=int, required=True, help="the client id")
    p.add_argument("--out", required=True, help="identity file to create (never overwritten)")
    p.set_defaults(handler=_keygen)
    r = commands.subcommand("roster", "add", help="add a client's public identity to a roster file",
                            group_help="roster of client identities")
    r.add_argument("--roster", required=True)
    r.add_argument("--identity", required=True, help="the client's identity file (only its public key is copied)")
    r.add_argument("--deployment", help="deployment name (required when the roster is created)")
    r.set_defaults(handler=_roster_add)
    s = commands.subcommand("roster", "show", help="print a roster's client ids and fingerprints")
    s.add_argument("--roster", required=True)
    s.set_defaults(handler=_roster_show)


def _keygen(args: argparse.Namespace) -> int:
    ident = Identity.generate(args.client)
    path = ident.save(args.out)
    print(f"client {ident.client_id}: identity written to {path} (mode 0600), fingerprint {ident.fingerprint}")
    return 0


def _roster_add(args: argparse.Namespace) -> int:
    ident = Identity.load(args.identity)
    path = Path(args.roster)
    if path.exists():
        roster = Roster.load(path)
        if args.deployment and args.deployment != roster.deployment:
            raise ConfigError(f"roster {path} is for deployment {roster.deployment!r}, not {args.deployment!r}")
        if ident.client_id in roster.keys and roster.keys[ident.client_id] != ident.public_key:
            raise ConfigError(f"roster {path} already has another key for client {ident.client_id}: "
                              "remove it by hand if the client really changed keys")
    elif not args.deployment:
        raise ConfigError("--deployment is needed to create a new roster")
    else:
        roster = Roster({}, args.deployment)
    updated = Roster({**roster.keys, ident.client_id: ident.public_key}, roster.deployment)
    updated.save(path, overwrite=True)
    print(f"client {ident.client_id} ({ident.fingerprint}) is on roster {path}")
    return 0


def _roster_show(args: argparse.Namespace) -> int:
    roster = Roster.load(args.roster)
    print(f"deployment {roster.deployment}: {len(roster.keys)} clients")
    for cid, key in sorted(roster.keys.items()):
        print(f"  {cid:>6}  {fingerprint(key)}")
    return 0
