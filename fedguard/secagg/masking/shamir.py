"""Shamir secret sharing over a prime field (pure functions; Shamir, "How to share a secret", CACM 1979).

A secret ``s`` in GF(p) is shared with threshold ``t`` among holders with distinct nonzero evaluation
points ``x_1, ..., x_m`` (``m >= t``): draw ``a_1, ..., a_{t-1}`` uniformly from GF(p), let

    f(X) = s + a_1 X + ... + a_{t-1} X^{t-1}   (mod p),

and give holder ``j`` the share ``(x_j, f(x_j))``. Any ``t`` shares determine ``f`` by Lagrange
interpolation and hence ``s = f(0) = Σ_j λ_j f(x_j)`` with ``λ_j = Π_{i≠j} x_i / (x_i - x_j)``.
Any ``t - 1`` shares are *perfectly* hiding: for every candidate secret ``s'`` exactly one polynomial of
degree ``< t`` passes through ``(0, s')`` and the ``t - 1`` shares, so with uniform coefficients every
secret is equally likely given the shares (:func:`evaluate_polynomial` lets tests enumerate this).

The default field is GF(p) with ``p = 2^256 + 297``, the smallest prime above ``2^256``, so that any
32-byte string (an X25519 private key, a 256-bit mask seed) is one field element; a share's value then
needs :data:`SHARE_BYTES` = 33 bytes. Coefficients are drawn with :meth:`SecureRNG.randbelow` (rejection
sampling, no modulo bias).

Tampering: Shamir sharing alone cannot tell a wrong share among exactly ``t``. With *more* than ``t``
shares, :func:`reconstruct` checks that every extra share lies on the interpolated polynomial and raises
:class:`InconsistentSharesError` naming the first one that does not. Protocols add authenticity on top
(secure aggregation encrypts shares with AEAD in transit and checks the reconstructed secret against a
commitment).

>>> from fedguard.rng import SecureRNG
>>> shares = split(123456789, 3, [1, 2, 3, 4, 5], rng=SecureRNG.for_testing("doctest"))
>>> reconstruct([shares[4], shares[0], shares[2]], 3)
123456789
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from fedguard.checks import check_int, is_int
from fedguard.errors import ConfigError, MessageError
from fedguard.rng import SecureRNG

PRIME: Final[int] = (1 << 256) + 297
"""The default field modulus: the smallest prime above ``2^256`` (so every 32-byte secret fits)."""

SHARE_BYTES: Final[int] = 33
"""Bytes of one share value in GF(:data:`PRIME`), big-endian (``PRIME < 2^264``)."""

SECRET_BYTES: Final[int] = 32
"""Bytes of a secret shared with :func:`split_bytes` (one element of GF(:data:`PRIME`))."""


class InconsistentSharesError(MessageError):
    """Shares do not lie on one polynomial of degree ``< t``: at least one was tampered with or corrupted."""


@dataclass(frozen=True, slots=True)
class Share:
    """One holder's share: the point ``(x, f(x))`` of the sharing polynomial ``f`` (both in GF(p))."""

    x: int
    y: int


def _check_prime(prime: int) -> None:
    check_int("prime", prime, low=3)


def _check_points(xs: Sequence[int], prime: int, what: str) -> None:
    seen: set[int] = set()
    for x in xs:
        if not is_int(x) or not 1 <= x < prime:
            raise ConfigError(f"{what} evaluation point must be an int in [1, p-1], got {x!r}")
        if x in seen:
            raise ConfigError(f"{what} evaluation points must be distinct, {x} appears twice")
        seen.add(x)


def evaluate_polynomial(coefficients: Sequence[int], x: int, prime: int = PRIME) -> int:
    """``Σ_i c_i x^i mod p`` by Horner's rule (``coefficients[0]`` is the constant term)."""
    acc = 0
    for c in reversed(coefficients):
        acc = (acc * x + c) % prime
    return acc


def split(
    secret: int, threshold: int, xs: Sequence[int], *, rng: SecureRNG, prime: int = PRIME
) -> list[Share]:
    """Share ``secret`` with ``threshold`` ``t``: one :class:`Share` per evaluation point in ``xs``.

    Raises :class:`ConfigError` if ``secret`` is not in ``[0, p)``, ``t`` is not in ``[1, len(xs)]`` or the
    points are not distinct elements of ``[1, p-1]``.
    """
    _check_prime(prime)
    problems = []
    if not is_int(secret) or not 0 <= secret < prime:
        problems.append(f"secret must be an int in [0, p) for p={prime}, got {secret!r}")
    if not is_int(threshold) or not 1 <= threshold <= len(xs):
        problems.append(f"threshold must be an int in [1, {len(xs)}] for {len(xs)} holders, got {threshold!r}")
    if problems:
        raise ConfigError.collect(problems)
    _check_points(xs, prime, "share")
    coefficients = [secret] + [rng.randbelow(prime) for _ in range(threshold - 1)]
    return [Share(x, evaluate_polynomial(coefficients, x, prime)) for x in xs]


@lru_cache(maxsize=256)
def lagrange_coefficients(xs: tuple[int, ...], at: int = 0, prime: int = PRIME) -> tuple[int, ...]:
    """``λ_j = Π_{i≠j} (at - x_i) / (x_j - x_i) mod p``: ``f(at) = Σ_j λ_j f(x_j)`` for every ``f`` of
    degree ``< len(xs)``. Cached: a protocol reconstructs many secrets from the same holders."""
    _check_prime(prime)
    if len(set(xs)) != len(xs):
        raise ConfigError(f"interpolation points must be distinct, got {xs}")
    out = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for i, xi in enumerate(xs):
            if i != j:
                num = num * (at - xi) % prime
                den = den * (xj - xi) % prime
        out.append(num * pow(den, -1, prime) % prime)
    return tuple(out)


def interpolate_at(points: Iterable[tuple[int, int]], at: int, prime: int = PRIME) -> int:
    """The value at ``at`` of the unique polynomial of degree ``< len(points)`` through ``points``."""
    pts = list(points)
    if not pts:
        raise ConfigError("interpolation needs at least one point")
    lam = lagrange_coefficients(tuple(x % prime for x, _ in pts), at % prime, prime)
    return sum(c * (y % prime) for c, (_, y) in zip(lam, pts, strict=True)) % prime


def reconstruct(shares: Sequence[Share], threshold: int, *, prime: int = PRIME) -> int:
    """The secret ``f(0)`` from at least ``threshold`` shares.

    The first ``threshold`` shares are interpolated; every further share is checked to lie on the same
    polynomial (:class:`InconsistentSharesError` otherwise, naming its point).
    """
    _check_prime(prime)
    check_int("threshold", threshold, low=1)
    if len(shares) < threshold:
        raise ConfigError(f"reconstruction needs {threshold} shares, got {len(shares)}")
    _check_points([s.x for s in shares], prime, "share")
    for s in shares:
        if not is_int(s.y) or not 0 <= s.y < prime:
            raise MessageError(f"share value at x={s.x} is not an element of GF(p)")
    base = [(s.x, s.y) for s in shares[:threshold]]
    for extra in shares[threshold:]:
        if interpolate_at(base, extra.x, prime) != extra.y:
            raise InconsistentSharesError(
                f"share at x={extra.x} does not lie on the polynomial of the first {threshold} shares "
                f"(x={[x for x, _ in base]}): a share was tampered with or corrupted"
            )
    return interpolate_at(base, 0, prime)


# -- byte encodings ----------------------------------------------------------------------------------
def encode_value(y: int, prime: int = PRIME) -> bytes:
    """A field element as :data:`SHARE_BYTES` big-endian bytes (for the default prime)."""
    if not 0 <= y < prime:
        raise ConfigError(f"value must be in [0, p), got {y}")
    return y.to_bytes((prime.bit_length() + 7) // 8, "big")


def decode_value(data: bytes, prime: int = PRIME) -> int:
    """Inverse of :func:`encode_value`; :class:`MessageError` for a wrong length or a value ``>= p``."""
    size = (prime.bit_length() + 7) // 8
    if len(data) != size:
        raise MessageError(f"a share value is {size} bytes, got {len(data)}")
    y = int.from_bytes(data, "big")
    if y >= prime:
        raise MessageError("share value is not an element of GF(p) (>= p)")
    return y


def split_bytes(secret: bytes, threshold: int, xs: Sequence[int], *, rng: SecureRNG) -> list[Share]:
    """Share a 32-byte secret (read as a big-endian integer < 2^256 < :data:`PRIME`)."""
    if not isinstance(secret, (bytes, bytearray)) or len(secret) != SECRET_BYTES:
        got = f"{len(secret)} bytes" if isinstance(secret, (bytes, bytearray)) else type(secret).__name__
        raise ConfigError(f"secret must be {SECRET_BYTES} bytes, got {got}")
    return split(int.from_bytes(secret, "big"), threshold, xs, rng=rng)


def reconstruct_bytes(shares: Sequence[Share], threshold: int) -> bytes:
    """Inverse of :func:`split_bytes`; :class:`InconsistentSharesError` if the result is not 32 bytes."""
    value = reconstruct(shares, threshold)
    if value >> (8 * SECRET_BYTES):
        raise InconsistentSharesError(
            f"shares at x={[s.x for s in shares]} reconstruct a value above 2^256: not a 32-byte secret"
        )
    return value.to_bytes(SECRET_BYTES, "big")
