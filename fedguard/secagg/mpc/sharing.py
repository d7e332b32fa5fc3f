"""Additive secret sharing over Z_{2^64} and the per-party encrypted channel of the MPC aggregator.

**Sharing.** A client splits its input vector ``x`` (uint64, an element of Z_{2^64}^L) among ``K``
compute parties as

    s_k = PRG(seed_k)  for k = 1..K-1,        s_0 = x - Σ_{k>=1} s_k   (mod 2^64),

with fresh 256-bit seeds (from the caller's :class:`~fedguard.rng.SecureRNG`) and AES-256 in counter mode
as the PRG (:func:`expand`: the keystream of ``AES-256-CTR(seed, IV = 0)`` read as little-endian 64-bit
words; each seed keys exactly one stream, so the fixed IV never repeats under a key — AES-NI makes this
several times faster than the general-purpose stream of ``SecureRNG``). Any ``K-1`` shares
are jointly uniform and independent of ``x``; all ``K`` add up to ``x``. Party ``k >= 1`` receives only its
32-byte seed (the usual seed-compression of additive sharing), party 0 the full vector ``s_0``. Z_{2^64}
is the ring CrypTen computes in (int64 with wrap-around), so a sum over shares equals the sum over inputs
exactly; a smaller ring Z_{2^k} embeds because ``2^k`` divides ``2^64`` (reduce the revealed sum mod 2^k).

**Channel.** Shares travel through the (honest-but-curious) server, so each is encrypted to its party:
the client draws one ephemeral X25519 key per round, derives per party
``key_k = HKDF-SHA256(X25519(e, P_k), salt = E || P_k, info = context_k)`` and seals the share with
AES-256-GCM under a random 96-bit nonce, with ``context_k`` (protocol, round, client, party, K, L) as
associated data. The server, which knows neither ``e`` nor any party's private key, sees only ciphertexts;
a ciphertext replayed into another round, client slot or party fails authentication. Party keys are public
configuration (pinned by the clients; see :class:`fedguard.secagg.mpc.MpcAggregator`).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedguard.errors import ConfigError
from fedguard.rng import SEED_BYTES, SecureRNG

PROTOCOL_LABEL = b"fedguard/mpc-shares/v1"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_PARTIES = 16


def public_key_bytes(private: X25519PrivateKey) -> bytes:
    """The raw 32-byte X25519 public key of ``private``."""
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def keys_fingerprint(public_keys: tuple[bytes, ...]) -> str:
    """SHA-256 over the parties' public keys, in party order (hex): what clients and server compare."""
    digest = hashlib.sha256(PROTOCOL_LABEL)
    for key in public_keys:
        digest.update(key)
    return digest.hexdigest()


def new_party_key(rng: SecureRNG | None = None) -> X25519PrivateKey:
    """A party's X25519 key (from ``rng``'s stream, the OS by default)."""
    return X25519PrivateKey.from_private_bytes((rng or SecureRNG()).bytes(KEY_BYTES))


def _context(round_id: int, client_id: int, party: int, n_parties: int, length: int) -> bytes:
    return PROTOCOL_LABEL + struct.pack("<qqiiq", round_id, client_id, party, n_parties, length)


def _channel_key(shared: bytes, ephemeral: bytes, party_key: bytes, context: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + party_key, info=context).derive(shared)


def expand(seed: bytes, n: int) -> np.ndarray:
    """``n`` uniform elements of Z_{2^64} from a 32-byte seed: the AES-256-CTR keystream (IV 0).

    >>> expand(bytes(32), 2).tolist() == expand(bytes(32), 3)[:2].tolist()
    True
    """
    if len(seed) != SEED_BYTES:
        raise ConfigError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * n)), dtype="<u8").astype(np.uint64, copy=False)


PURPOSE_SHARE_SIGNATURE = "mpc/share"
"""Signature purpose of a client's share for one party (:func:`share_signature_body`)."""


@dataclass(frozen=True, slots=True)
class SealedShares:
    """One client's shares for one round: its ephemeral public key and one ciphertext per party, and, in a
    deployment with a roster, one Ed25519 signature per party (:func:`share_signature_body`; empty
    otherwise)."""

    ephemeral_key: bytes
    ciphertexts: tuple[bytes, ...]
    signatures: tuple[bytes, ...] = ()


def share_signature_body(party: int, ephemeral_key: bytes, ciphertext: bytes) -> bytes:
    """What a client signs for party ``party`` (besides the context binding deployment, round and client,
    :func:`fedguard.identity.signed_context`): the party index, its ephemeral key and that party's
    ciphertext. Each party can check its own signature from what it receives."""
    return struct.pack("<H", party) + ephemeral_key + ciphertext


def split(x: np.ndarray, n_parties: int, rng: SecureRNG) -> tuple[np.ndarray, tuple[bytes, ...]]:
    """Additive sharing of ``x`` over Z_{2^64}: party 0's vector and the seeds of parties 1..K-1."""
    if not 2 <= n_parties <= MAX_PARTIES:
        raise ConfigError(f"n_parties must be in [2, {MAX_PARTIES}], got {n_parties}")
    seeds = tuple(rng.bytes(SEED_BYTES) for _ in range(n_parties - 1))
    share0 = np.array(x, dtype=np.uint64, copy=True)
    for seed in seeds:
        share0 -= expand(seed, share0.size)
    return share0, seeds


def seal(
    x: np.ndarray,
    party_keys: tuple[bytes, ...],
    *,
    round_id: int,
    client_id: int,
    rng: SecureRNG,
) -> SealedShares:
    """Share ``x`` among the parties whose public keys are ``party_keys`` and encrypt each share."""
    n = len(party_keys)
    share0, seeds = split(x, n, rng)
    ephemeral = X25519PrivateKey.from_private_bytes(rng.bytes(KEY_BYTES))
    epk = public_key_bytes(ephemeral)
    plaintexts = [share0.astype("<u8").tobytes()] + list(seeds)
    cts = []
    for k, (pk, plain) in enumerate(zip(party_keys, plaintexts)):
        ctx = _context(round_id, client_id, k, n, x.size)
        key = _channel_key(ephemeral.exchange(X25519PublicKey.from_public_bytes(pk)), epk, pk, ctx)
        nonce = rng.bytes(NONCE_BYTES)
        cts.append(nonce + AESGCM(key).encrypt(nonce, plain, ctx))
    return SealedShares(epk, tuple(cts))


def open_share(
    sealed: SealedShares,
    party: int,
    private: X25519PrivateKey,
    *,
    round_id: int,
    client_id: int,
    length: int,
) -> np.ndarray | None:
    """Party ``party``'s share of one client's input (uint64, ``length``), or ``None`` when the ciphertext
    is not authentic, not for this round/client/party, or has the wrong size (the client is then excluded)."""
    n = len(sealed.ciphertexts)
    if not 0 <= party < n or len(sealed.ephemeral_key) != KEY_BYTES:
        return None
    ct = sealed.ciphertexts[party]
    ctx = _context(round_id, client_id, party, n, length)
    pk = public_key_bytes(private)
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(sealed.ephemeral_key))
        key = _channel_key(shared, sealed.ephemeral_key, pk, ctx)
        plain = AESGCM(key).decrypt(ct[:NONCE_BYTES], ct[NONCE_BYTES:], ctx)
    except (InvalidTag, ValueError):
        return None
    if party == 0:
        if len(plain) != 8 * length:
            return None
        return np.frombuffer(plain, dtype="<u8").astype(np.uint64)
    if len(plain) != SEED_BYTES:
        return None
    return expand(plain, length)
