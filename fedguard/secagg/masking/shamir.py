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


def _solve_mod(rows: list[list[int]], rhs: list[int], n_vars: int, prime: int) -> list[int] | None:
    """One solution of ``rows · v = rhs`` over GF(p) (free variables set to 0), or ``None`` if none exists."""
    m = [row[:] + [b] for row, b in zip(rows, rhs, strict=True)]
    pivots: list[int] = []
    r = 0
    for c in range(n_vars):
        pivot = next((i for i in range(r, len(m)) if m[i][c] % prime), None)
        if pivot is None:
            continue
        m[r], m[pivot] = m[pivot], m[r]
        inv = pow(m[r][c], -1, prime)
        m[r] = [v * inv % prime for v in m[r]]
        for i in range(len(m)):
            if i != r and m[i][c]:
                f = m[i][c]
                m[i] = [(a - f * b) % prime for a, b in zip(m[i], m[r], strict=True)]
        pivots.append(c)
        r += 1
    if any(row[-1] % prime for row in m[r:]):
        return None
    out = [0] * n_vars
    for i, c in enumerate(pivots):
        out[c] = m[i][-1]
    return out


def _poly_divmod(num: list[int], den: list[int], prime: int) -> tuple[list[int], list[int]]:
    """``num = q·den + r`` over GF(p); coefficient lists, constant term first; ``den`` monic-able."""
    num = num[:]
    while len(den) > 1 and den[-1] % prime == 0:
        den = den[:-1]
    inv = pow(den[-1], -1, prime)
    q = [0] * max(len(num) - len(den) + 1, 1)
    for i in range(len(num) - len(den), -1, -1):
        coef = num[i + len(den) - 1] * inv % prime
        q[i] = coef
        for j, d in enumerate(den):
            num[i + j] = (num[i + j] - coef * d) % prime
    return q, num[: len(den) - 1]


def robust_reconstruct(shares: Sequence[Share], threshold: int, *, prime: int = PRIME) -> tuple[int, tuple[int, ...]]:
    """The secret ``f(0)`` and the points of the bad shares, correcting up to ``e = ⌊(m - t)/2⌋`` bad
    shares among ``m``: Reed–Solomon decoding by Berlekamp–Welch.

    Shamir shares of a degree ``< t`` polynomial are a Reed–Solomon codeword. Berlekamp–Welch finds a monic
    error locator ``E`` of degree ``e`` and ``Q`` of degree ``< t + e`` with ``Q(x_i) = y_i·E(x_i)`` for every
    share (a linear system over GF(p)); when at most ``e`` shares are wrong, ``f = Q / E`` exactly and the
    bad shares are those with ``f(x_i) ≠ y_i``. The fast path (every share consistent) costs one
    interpolation check per extra share, as :func:`reconstruct`.

    Raises :class:`InconsistentSharesError` when the errors exceed what ``m`` shares can correct (they are
    then detected, not corrected), and :class:`ConfigError` for fewer than ``t`` shares.
    """
    try:
        return reconstruct(shares, threshold, prime=prime), ()
    except InconsistentSharesError:
        pass
    m, t = len(shares), threshold
    e = (m - t) // 2
    if e < 1:
        raise InconsistentSharesError(
            f"{m} shares with threshold {t} are inconsistent and too few to correct any (t + 2 are needed "
            "to correct one bad share)")
    rows, rhs = [], []
    for s in shares:
        powers = [pow(s.x, j, prime) for j in range(t + e + 1)]
        rows.append(powers[: t + e] + [(-s.y * powers[j]) % prime for j in range(e)])
        rhs.append(s.y * powers[e] % prime)
    sol = _solve_mod(rows, rhs, t + 2 * e, prime)
    if sol is not None:
        q_poly, e_poly = sol[: t + e], sol[t + e:] + [1]
        f, rem = _poly_divmod(q_poly, e_poly, prime)
        if not any(rem) and len([c for c in f[t:] if c]) == 0:
            bad = tuple(s.x for s in shares if evaluate_polynomial(f[:t], s.x, prime) != s.y)
            if len(bad) <= e:
                return f[0] % prime, bad
    raise InconsistentSharesError(
        f"more than {e} of the {m} shares at x={[s.x for s in shares]} are bad: detected, cannot be corrected")


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
    return _secret_bytes(reconstruct(shares, threshold), shares)


def robust_reconstruct_bytes(shares: Sequence[Share], threshold: int) -> tuple[bytes, tuple[int, ...]]:
    """:func:`robust_reconstruct` for a secret shared with :func:`split_bytes`: the secret and bad points."""
    value, bad = robust_reconstruct(shares, threshold)
    return _secret_bytes(value, shares), bad


def _secret_bytes(value: int, shares: Sequence[Share]) -> bytes:
    if value >> (8 * SECRET_BYTES):
        raise InconsistentSharesError(
            f"shares at x={[s.x for s in shares]} reconstruct a value above 2^256: not a 32-byte secret"
        )
    return value.to_bytes(SECRET_BYTES, "big")
