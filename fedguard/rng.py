"""Cryptographically secure randomness, with explicitly seeded streams for tests.

Every fedguard function that draws randomness takes an ``rng`` argument: a :class:`SecureRNG`. It is a
ChaCha20 keystream generator (RFC 8439, through the ``cryptography`` package) keyed by a 256-bit seed:

* ``SecureRNG()`` draws its seed from the operating system (``os.urandom``): the default everywhere;
* ``SecureRNG.from_seed(seed)`` replays a stream from a 32-byte seed: used to expand secret-aggregation
  masks from exchanged seeds (both ends derive the same mask) and to regenerate watermark projections;
* ``SecureRNG.for_testing(label)`` is a reproducible stream for tests and simulations, derived from a
  public label. It is as unpredictable as a public label allows, i.e. not at all: never use it for keys.

Why not numpy's generators: they are not cryptographic. A mask expanded with PCG64 or MT19937 from a
32-bit seed (a real flaw in a peer library) can be brute-forced from one masked vector. Non-security
draws (data shuffling, dropout) may use :meth:`SecureRNG.numpy_generator`, which seeds PCG64 with 256
bits of this stream.

Distributions: ``uniform01`` takes the top 53 bits of each 64-bit word (the standard
``k * 2**-53`` construction), ``normal`` uses the Box–Muller transform on two such uniforms, and
``integers_below`` is unbiased (rejection sampling), so no modulo bias enters a secret share.

>>> a = SecureRNG.from_seed(bytes(32)).bytes(8).hex()
>>> a  # RFC 8439 A.1 test vector #1: ChaCha20 keystream for the all-zero key and nonce
'76b8e0ada0f13d90'
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Final

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedguard.errors import ConfigError

SEED_BYTES: Final[int] = 32
"""Seed length: a 256-bit ChaCha20 key."""

_ZEROS_CHUNK: Final[int] = 1 << 22
_ZEROS: Final[memoryview] = memoryview(bytes(_ZEROS_CHUNK))


def random_seed() -> bytes:
    """A fresh 256-bit seed from the operating system's CSPRNG."""
    return os.urandom(SEED_BYTES)


class SecureRNG:
    """A ChaCha20 keystream as a source of random bytes, integers and floats.

    Args:
        seed: 32 bytes; ``None`` (the default) draws a fresh seed from ``os.urandom``.
        nonce: 12 bytes selecting an independent stream for the same seed (default all-zero).
    """

    __slots__ = ("_seed", "_nonce", "_encryptor")

    def __init__(self, seed: bytes | None = None, *, nonce: bytes = bytes(12)) -> None:
        if seed is None:
            seed = random_seed()
        if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
            got = f"{len(seed)} bytes" if isinstance(seed, (bytes, bytearray)) else type(seed).__name__
            raise ConfigError(f"seed must be {SEED_BYTES} bytes, got {got}")
        if not isinstance(nonce, (bytes, bytearray)) or len(nonce) != 12:
            raise ConfigError(f"nonce must be 12 bytes, got {nonce!r}")
        self._seed = bytes(seed)
        self._nonce = bytes(nonce)
        # cryptography's ChaCha20 takes a 16-byte "nonce": 4-byte little-endian block counter + 12-byte nonce.
        cipher = Cipher(algorithms.ChaCha20(self._seed, bytes(4) + self._nonce), mode=None)
        self._encryptor = cipher.encryptor()

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_seed(cls, seed: bytes, *, nonce: bytes = bytes(12)) -> SecureRNG:
        """The deterministic stream of a 32-byte secret seed."""
        return cls(seed, nonce=nonce)

    @classmethod
    def for_testing(cls, label: int | str) -> SecureRNG:
        """A reproducible stream derived from a *public* label: for tests and simulations only."""
        digest = hashlib.sha256(b"fedguard/for-testing/" + str(label).encode()).digest()
        return cls(digest)

    def spawn(self, label: str | bytes) -> SecureRNG:
        """An independent child stream: seed' = HMAC-SHA256(seed, label).

        Children depend only on the parent's seed and the label, not on how much the parent has drawn,
        so per-client streams of a simulation are reproducible whatever the order of draws.
        """
        raw = label.encode() if isinstance(label, str) else bytes(label)
        return SecureRNG(hmac.new(self._seed, b"fedguard/spawn/" + raw, hashlib.sha256).digest())

    # -- raw draws ---------------------------------------------------------------------------------
    def _fill(self, n: int) -> memoryview:
        """``n`` keystream bytes written straight into a fresh buffer (no intermediate copies)."""
        if n < 0:
            raise ConfigError(f"n must be >= 0, got {n}")
        out = bytearray(n + 64)  # update_into wants room for one extra block
        view = memoryview(out)
        offset = 0
        while offset < n:
            take = min(n - offset, _ZEROS_CHUNK)
            self._encryptor.update_into(_ZEROS[:take], view[offset : offset + take + 64])
            offset += take
        return view[:n]

    def bytes(self, n: int) -> bytes:
        """``n`` keystream bytes."""
        return self._fill(n).tobytes()

    def uint64(self, n: int) -> np.ndarray:
        """``n`` independent uniform 64-bit words (little-endian keystream)."""
        return np.frombuffer(self._fill(8 * n), dtype="<u8").astype(np.uint64, copy=False)

    def ring_elements(self, n: int, ring_bits: int) -> np.ndarray:
        """``n`` uniform elements of Z_{2^ring_bits} as uint64 (``1 <= ring_bits <= 64``)."""
        if not 1 <= ring_bits <= 64:
            raise ConfigError(f"ring_bits must be in [1, 64], got {ring_bits}")
        words = self.uint64(n)
        if ring_bits < 64:
            words &= np.uint64((1 << ring_bits) - 1)
        return words

    def integers_below(self, n: int, bound: int) -> np.ndarray:
        """``n`` uniform integers in ``[0, bound)`` without modulo bias (``1 <= bound <= 2**64``)."""
        if not 1 <= bound <= 1 << 64:
            raise ConfigError(f"bound must be in [1, 2**64], got {bound}")
        if bound == 1 << 64:
            return self.uint64(n)
        bits = max(1, (bound - 1).bit_length())
        out = np.empty(n, dtype=np.uint64)
        filled = 0
        while filled < n:
            need = n - filled
            cand = self.ring_elements(need + need // 2 + 8, bits)
            cand = cand[cand < np.uint64(bound)][:need]
            out[filled : filled + cand.size] = cand
            filled += cand.size
        return out

    def randbelow(self, bound: int) -> int:
        """One uniform Python integer in ``[0, bound)``; any positive ``bound`` (e.g. a 2048-bit modulus)."""
        if bound < 1:
            raise ConfigError(f"bound must be >= 1, got {bound}")
        nbytes = (bound.bit_length() + 7) // 8 + 8  # 64 extra bits: rejection is rare
        top = 1 << (8 * nbytes)
        limit = top - top % bound
        while True:
            value = int.from_bytes(self.bytes(nbytes), "little")
            if value < limit:
                return value % bound

    # -- floats ------------------------------------------------------------------------------------
    def uniform01(self, n: int) -> np.ndarray:
        """``n`` float64 uniforms on [0, 1) with 53 random bits each."""
        return (self.uint64(n) >> np.uint64(11)).astype(np.float64) * (2.0**-53)

    def normal(self, n: int, *, std: float = 1.0) -> np.ndarray:
        """``n`` float64 draws from N(0, std^2) by the Box–Muller transform."""
        if not std >= 0:
            raise ConfigError(f"std must be >= 0, got {std}")
        half = (n + 1) // 2
        u1 = 1.0 - self.uniform01(half)  # (0, 1]: log is finite
        u2 = self.uniform01(half)
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = 2.0 * np.pi * u2
        z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
        return z * std

    # -- adapters for non-security draws -------------------------------------------------------------
    def numpy_generator(self) -> np.random.Generator:
        """A numpy PCG64 generator seeded with 256 bits of this stream (shuffling, not secrets)."""
        return np.random.Generator(np.random.PCG64(int.from_bytes(self.bytes(32), "little")))

    def torch_seed(self) -> int:
        """A 63-bit seed for ``torch.Generator().manual_seed`` (dropout, initialisation; not secrets)."""
        return int.from_bytes(self.bytes(8), "little") >> 1

    def __repr__(self) -> str:  # never print the seed
        return "SecureRNG(<secret seed>)"


def expand_seed(seed: bytes, n: int, ring_bits: int, *, nonce: bytes = bytes(12)) -> np.ndarray:
    """Expand a 256-bit seed into ``n`` uniform ring elements (the PRG of pairwise masking)."""
    return SecureRNG.from_seed(seed, nonce=nonce).ring_elements(n, ring_bits)
