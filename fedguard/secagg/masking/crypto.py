"""The cryptographic primitives of pairwise masking (all from the ``cryptography`` package).

* **Key agreement**: X25519 (RFC 7748). Two clients with key pairs ``(sk_u, pk_u)``, ``(sk_v, pk_v)``
  derive the same 32-byte key ``HKDF-SHA256(X25519(sk_u, pk_v), info = purpose ‖ round ‖ min(u,v) ‖
  max(u,v))`` (RFC 5869). The info binds the key to its use, the round and the pair.
* **Share encryption**: ChaCha20-Poly1305 (RFC 8439) under the agreed key, with a fresh random 96-bit
  nonce and associated data ``round ‖ sender ‖ recipient``: the server that routes the ciphertext can
  neither read nor alter it, nor re-address it to another client or round.
* **Mask expansion**: a 256-bit seed is expanded by ChaCha20 into uniform 64-bit words, exactly
  :func:`fedguard.rng.expand_seed` (same key, nonce and counter), but streamed in chunks straight into an
  accumulator, so ``n`` masks of length ``L`` cost ``n·L`` keystream words and no ``L``-sized temporaries.
  Masks are added modulo ``2^64``; reducing the sum modulo ``2^k`` afterwards gives the same result as
  adding masks drawn in ``Z_{2^k}`` because ``2^k`` divides ``2^64``.
* **Commitment** to a self-mask seed: ``SHA-256(domain ‖ round ‖ client ‖ seed)``. The seed is 256
  uniform bits, so the hash hides it (random-oracle model) and binds the client to it, which lets the server
  detect a reconstruction from tampered shares.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import struct
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Final, NamedTuple

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from fedguard.checks import check_int
from fedguard.errors import MessageError
from fedguard.rng import SecureRNG

KEY_BYTES: Final[int] = 32
NONCE_BYTES: Final[int] = 12
TAG_BYTES: Final[int] = 16

SELF_MASK_NONCE: Final[bytes] = b"fg-self-mask"
"""ChaCha20 nonce of self-mask expansion (12 bytes)."""
PAIR_MASK_NONCE: Final[bytes] = b"fg-pair-mask"
"""ChaCha20 nonce of pairwise-mask expansion (12 bytes)."""

PURPOSE_MASK: Final[bytes] = b"fedguard/secagg/pairwise-mask-seed/v1"
PURPOSE_SHARE: Final[bytes] = b"fedguard/secagg/share-encryption-key/v1"

_CHUNK_WORDS: Final[int] = 1 << 17  # 1 MiB of keystream per step: stays in cache
_ZEROS: Final[bytes] = bytes(8 * _CHUNK_WORDS)


class ShareDecryptionError(MessageError):
    """An encrypted share failed authentication: tampered with, re-addressed, or from another round."""


# -- keys --------------------------------------------------------------------------------------------
def generate_private_key(rng: SecureRNG) -> X25519PrivateKey:
    """An X25519 private key from 32 bytes of ``rng`` (clamped by X25519 itself)."""
    return X25519PrivateKey.from_private_bytes(rng.bytes(KEY_BYTES))


def load_private(data: bytes) -> X25519PrivateKey:
    """An X25519 private key from its 32 raw bytes (e.g. reconstructed from Shamir shares)."""
    if len(data) != KEY_BYTES:
        raise MessageError(f"a private key must be {KEY_BYTES} bytes, got {len(data)}")
    return X25519PrivateKey.from_private_bytes(bytes(data))


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def load_public(data: bytes, what: str) -> X25519PublicKey:
    if len(data) != KEY_BYTES:
        raise MessageError(f"{what} must be {KEY_BYTES} bytes, got {len(data)}")
    return X25519PublicKey.from_public_bytes(bytes(data))


def agree(
    private: X25519PrivateKey, peer_public: bytes, *, purpose: bytes, round_id: int, a: int, b: int
) -> bytes:
    """The 32-byte key shared by clients ``a`` and ``b`` for ``purpose`` in round ``round_id``.

    Raises :class:`MessageError` for a malformed or low-order peer key (all-zero shared secret)."""
    try:
        secret = private.exchange(load_public(peer_public, f"public key of client {b}"))
    except ValueError as err:
        raise MessageError(f"key agreement with client {b} failed: {err}") from err
    lo, hi = min(a, b), max(a, b)
    info = purpose + struct.pack("<Qqq", round_id, lo, hi)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


# -- authenticated share encryption ------------------------------------------------------------------
def _associated_data(round_id: int, sender: int, recipient: int) -> bytes:
    return b"fedguard/secagg/shares/v1" + struct.pack("<Qqq", round_id, sender, recipient)


def seal(key: bytes, plaintext: bytes, *, round_id: int, sender: int, recipient: int, rng: SecureRNG) -> bytes:
    """``nonce ‖ ChaCha20-Poly1305(key, nonce, plaintext, ad = round ‖ sender ‖ recipient)``."""
    nonce = rng.bytes(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, _associated_data(round_id, sender, recipient))


def open_sealed(key: bytes, blob: bytes, *, round_id: int, sender: int, recipient: int) -> bytes:
    """Inverse of :func:`seal`; :class:`ShareDecryptionError` if authentication fails."""
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise ShareDecryptionError(f"ciphertext from client {sender} is truncated ({len(blob)} bytes)")
    try:
        return ChaCha20Poly1305(key).decrypt(
            blob[:NONCE_BYTES], blob[NONCE_BYTES:], _associated_data(round_id, sender, recipient)
        )
    except InvalidTag as err:
        raise ShareDecryptionError(
            f"shares from client {sender} to client {recipient} in round {round_id} failed authentication"
        ) from err


def sealed_size(plaintext_bytes: int) -> int:
    return NONCE_BYTES + plaintext_bytes + TAG_BYTES


# -- commitments ---------------------------------------------------------------------------------------
def commit_seed(seed: bytes, *, round_id: int, client: int) -> bytes:
    """``SHA-256(domain ‖ round ‖ client ‖ seed)``: a hiding, binding commitment to a 256-bit seed."""
    return hashlib.sha256(b"fedguard/secagg/self-mask-commitment/v1" + struct.pack("<Qq", round_id, client) + seed).digest()


# -- masks ---------------------------------------------------------------------------------------------
class Mask(NamedTuple):
    """One mask to add: ``sign · expand_seed(seed, L, 64, nonce=nonce)``, ``sign`` in ``{+1, -1}``."""

    seed: bytes
    sign: int
    nonce: bytes


def apply_masks(acc: np.ndarray, masks: Sequence[Mask], *, workers: int = 1) -> None:
    """In place: ``acc += Σ sign · expand_seed(seed, len(acc), 64, nonce=nonce)  (mod 2^64)``.

    The keystream of every mask is produced chunk by chunk (one ChaCha20 context per mask, all advanced
    together), so the accumulator is traversed once and stays in cache; the result equals
    :func:`fedguard.rng.expand_seed` word for word.

    ``workers > 1`` splits the vector into that many contiguous slices and expands the masks of all but the
    first in spawned worker processes (ChaCha20 seeks to a slice by its block counter), for a server that
    regenerates thousands of masks; the seeds travel to the workers over a local pipe. Vectors shorter than
    ``workers`` chunks of 1 MiB are done in this process.
    """
    if acc.dtype != np.uint64 or acc.ndim != 1 or not acc.flags.c_contiguous:
        raise ValueError("apply_masks needs a contiguous 1-D uint64 accumulator")
    check_int("workers", workers, low=1)
    for m in masks:
        if len(m.seed) != KEY_BYTES or m.sign not in (1, -1) or len(m.nonce) != 12:
            raise ValueError("each mask is (32-byte seed, sign in {+1, -1}, 12-byte nonce)")
    if not masks:
        return
    n = acc.size
    if workers == 1 or n < workers * _CHUNK_WORDS:
        _accumulate(acc, masks, first_block=0)
        return
    # slice bounds on 64-byte ChaCha20 blocks (8 words)
    step = -(-n // workers // 8) * 8
    bounds = [(a, min(n, a + step)) for a in range(0, n, step)]
    plain = [Mask(bytes(m.seed), int(m.sign), bytes(m.nonce)) for m in masks]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(bounds) - 1, mp_context=ctx) as pool:
        futures = [(a, b, pool.submit(_mask_slice, plain, a, b)) for a, b in bounds[1:]]
        a0, b0 = bounds[0]
        _accumulate(acc[a0:b0], plain, first_block=0)
        for a, b, fut in futures:
            acc[a:b] += fut.result()


def _mask_slice(masks: Sequence[Mask], start: int, stop: int) -> np.ndarray:
    """``Σ sign · mask[start:stop]`` (``start`` a multiple of 8 words): a worker process's share."""
    out = np.zeros(stop - start, dtype=np.uint64)
    _accumulate(out, masks, first_block=start // 8)
    return out


def _accumulate(acc: np.ndarray, masks: Sequence[Mask], *, first_block: int) -> None:
    """``acc += Σ sign · keystream`` where the keystream starts at ChaCha20 block ``first_block``."""
    # cryptography's ChaCha20 "nonce" is the 4-byte little-endian block counter followed by the 12-byte nonce
    counter = first_block.to_bytes(4, "little")
    streams = [(Cipher(algorithms.ChaCha20(m.seed, counter + m.nonce), mode=None).encryptor(), m.sign == 1)
               for m in masks]
    buf = np.empty(_CHUNK_WORDS + 8, dtype="<u8")  # update_into may want slack beyond the data length
    raw = buf.data.cast("B")
    n = acc.size
    for start in range(0, n, _CHUNK_WORDS):
        stop = min(n, start + _CHUNK_WORDS)
        width = stop - start
        seg = acc[start:stop]
        zeros = _ZEROS[: 8 * width]
        words = buf[:width]
        for enc, plus in streams:
            enc.update_into(zeros, raw)
            if plus:
                seg += words
            else:
                seg -= words
