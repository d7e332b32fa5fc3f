"""Additive secret sharing over Z_{2^k} and the per-party encrypted channel of the MPC aggregator.

**Sharing.** A client splits its input vector ``x`` (an element of Z_{2^k}^L, held as uint64) among ``K``
compute parties as

    s_j = PRG(seed_j) mod 2^k  for j = 1..K-1,        s_0 = x - Σ_{j>=1} s_j   (mod 2^k),

with fresh 256-bit seeds (from the caller's :class:`~fedguard.rng.SecureRNG`) and AES-256 in counter mode
as the PRG (:func:`expand`: the keystream of ``AES-256-CTR(seed, IV = 0)`` read as little-endian words of
the ring's wire width, :func:`fedguard.encoding.ring_wire_dtype`, reduced mod 2^k; each seed keys exactly
one stream, so the fixed IV never repeats under a key — AES-NI makes this several times faster than the
general-purpose stream of ``SecureRNG``). Any ``K-1`` shares are jointly uniform on Z_{2^k} and independent
of ``x`` (the missing ``s_j`` is uniform mod 2^k, so ``s_0`` is a one-time pad of ``x``); all ``K`` add up
to ``x`` mod 2^k. Party ``j >= 1`` receives only its 32-byte seed (the usual seed-compression of additive
sharing), party 0 the full vector ``s_0`` **in the ring's word**: ``k/8`` bytes per value for k = 8, 16,
32, so that an MPC upload is as large as a plaintext one in the same ring (a 32-bit ring: 4 B/value, fp32's
size). The parties add shares in Z_{2^64} (CrypTen's int64 with wrap-around) and reduce the revealed sum
mod 2^k; because ``2^k`` divides ``2^64`` that is exactly ``Σ_i x_i mod 2^k``, the plaintext sum. The norm
check (:mod:`fedguard.secagg.mpc.norm`) squares values under MPC and needs the full Z_{2^64}: its inputs are
shared with ``k = 64``.

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

from fedguard.encoding import ring_wire_dtype, to_wire
from fedguard.errors import ConfigError, InvalidUpdateError
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


def expand(seed: bytes, n: int, ring_bits: int = 64) -> np.ndarray:
    """``n`` uniform elements of Z_{2^ring_bits} (as uint64) from a 32-byte seed: the AES-256-CTR keystream
    (IV 0) read as little-endian words of :func:`~fedguard.encoding.ring_wire_dtype` and reduced mod
    2^ring_bits (the low bits of a uniform word are uniform).

    >>> expand(bytes(32), 2).tolist() == expand(bytes(32), 3)[:2].tolist()
    True
    >>> int(expand(bytes(32), 1000, 12).max()) < 2**12
    True
    """
    if len(seed) != SEED_BYTES:
        raise ConfigError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
    word = ring_wire_dtype(ring_bits)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    stream = np.frombuffer(encryptor.update(bytes(word.itemsize * n)), dtype=word).astype(np.uint64)
    return stream & _mask(ring_bits) if ring_bits < 8 * word.itemsize else stream


def _mask(ring_bits: int) -> np.uint64:
    return np.uint64((1 << ring_bits) - 1) if ring_bits < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)


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


def split(x: np.ndarray, n_parties: int, rng: SecureRNG, ring_bits: int = 64
          ) -> tuple[np.ndarray, tuple[bytes, ...]]:
    """Additive sharing of ``x`` over Z_{2^ring_bits}: party 0's vector and the seeds of parties 1..K-1.

    Raises :class:`InvalidUpdateError` when an element of ``x`` is outside Z_{2^ring_bits}."""
    if not 2 <= n_parties <= MAX_PARTIES:
        raise ConfigError(f"n_parties must be in [2, {MAX_PARTIES}], got {n_parties}")
    ring_wire_dtype(ring_bits)  # ConfigError for a width outside [2, 64]
    share0 = np.array(x, dtype=np.uint64, copy=True)
    if ring_bits < 64 and share0.size and int(share0.max()) >> ring_bits:
        raise InvalidUpdateError(f"the input has an element outside Z_2^{ring_bits}")
    seeds = tuple(rng.bytes(SEED_BYTES) for _ in range(n_parties - 1))
    for seed in seeds:
        share0 -= expand(seed, share0.size, ring_bits)
    return share0 & _mask(ring_bits), seeds


def seal(
    x: np.ndarray,
    party_keys: tuple[bytes, ...],
    *,
    round_id: int,
    client_id: int,
    rng: SecureRNG,
    ring_bits: int = 64,
) -> SealedShares:
    """Share ``x`` (elements of Z_{2^ring_bits}) among the parties whose public keys are ``party_keys`` and
    encrypt each share; party 0's travels in the ring's wire word (:func:`~fedguard.encoding.to_wire`)."""
    n = len(party_keys)
    share0, seeds = split(x, n, rng, ring_bits)
    ephemeral = X25519PrivateKey.from_private_bytes(rng.bytes(KEY_BYTES))
    epk = public_key_bytes(ephemeral)
    plaintexts = [to_wire(share0, ring_bits).tobytes()] + list(seeds)
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
    ring_bits: int = 64,
) -> np.ndarray | None:
    """Party ``party``'s share of one client's input (uint64 elements of Z_{2^ring_bits}, ``length``), or
    ``None`` when the ciphertext is not authentic, not for this round/client/party, or has the wrong size
    (the client is then excluded; a share sealed for another ring width has another size)."""
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
        word = ring_wire_dtype(ring_bits)
        if len(plain) != word.itemsize * length:
            return None
        share = np.frombuffer(plain, dtype=word).astype(np.uint64)
        if ring_bits < 64 and share.size and int(share.max()) >> ring_bits:
            return None  # not an element of the ring: not a share a client following the protocol sends
        return share
    if len(plain) != SEED_BYTES:
        return None
    return expand(plain, length, ring_bits)
