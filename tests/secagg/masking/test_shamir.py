"""Shamir secret sharing: any t shares reconstruct, t-1 shares say nothing, tampering is detected."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable

import gmpy2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedguard.errors import ConfigError, MessageError
from fedguard.rng import SecureRNG
from fedguard.secagg.masking import shamir
from fedguard.secagg.masking.shamir import PRIME, InconsistentSharesError, Share

ALPHA = 0.01  # significance of every statistical test in this file


def test_default_prime_is_the_smallest_prime_above_2_to_the_256() -> None:
    assert gmpy2.is_prime(PRIME, 64)
    assert not any(gmpy2.is_prime((1 << 256) + i, 64) for i in range(1, 297))
    assert (PRIME.bit_length() + 7) // 8 == shamir.SHARE_BYTES


@settings(max_examples=60, deadline=None)
@given(
    secret=st.integers(0, PRIME - 1),
    threshold=st.integers(1, 6),
    extra=st.integers(0, 4),
    data=st.data(),
)
def test_any_t_shares_reconstruct_the_secret(secret: int, threshold: int, extra: int, data: st.DataObject) -> None:
    xs = data.draw(st.lists(st.integers(1, 10**6), min_size=threshold + extra, max_size=threshold + extra, unique=True))
    shares = shamir.split(secret, threshold, xs, rng=SecureRNG.for_testing(f"shamir/{secret % 997}"))
    order = data.draw(st.permutations(shares))
    size = data.draw(st.integers(threshold, len(shares)))
    assert shamir.reconstruct(list(order[:size]), threshold) == secret


def test_t_minus_1_shares_are_uniform_for_every_secret_exhaustively() -> None:
    """Over GF(13) with t = 3: for every secret, the pair of share values held by any 2 holders takes each
    of the 13^2 possible values for exactly one choice of the 2 random coefficients. So the distribution
    of t-1 shares is the same (uniform) whatever the secret: they carry no information about it."""
    p, t, xs = 13, 3, (1, 2, 3, 4, 5)
    for pair in itertools.combinations(xs, t - 1):
        for secret in range(p):
            seen = Counter(
                tuple(shamir.evaluate_polynomial((secret, a1, a2), x, p) for x in pair)
                for a1, a2 in itertools.product(range(p), repeat=2)
            )
            assert len(seen) == p**2 and set(seen.values()) == {1}


def _coefficients_through(points: list[tuple[int, int]], p: int) -> list[int]:
    """Coefficients of the unique polynomial of degree < len(points) through ``points`` (Lagrange basis)."""
    n = len(points)
    coeffs = [0] * n
    for j, (xj, yj) in enumerate(points):
        basis, denom = [1], 1
        for i, (xi, _) in enumerate(points):
            if i == j:
                continue
            basis = [((basis[k - 1] if k else 0) - xi * (basis[k] if k < len(basis) else 0)) % p
                     for k in range(len(basis) + 1)]
            denom = denom * (xj - xi) % p
        scale = yj * pow(denom, -1, p) % p
        for k in range(n):
            coeffs[k] = (coeffs[k] + scale * basis[k]) % p
    return coeffs


def test_t_minus_1_shares_are_consistent_with_every_candidate_secret() -> None:
    """For real 256-bit shares: whatever secret s' we guess, there is a sharing polynomial with constant
    term s' that produces exactly the observed t-1 shares."""
    rng = SecureRNG.for_testing("shamir/consistency")
    t = 4
    secret = rng.randbelow(PRIME)
    shares = shamir.split(secret, t, [3, 7, 11, 19, 23], rng=rng)
    seen = shares[: t - 1]
    for guess in [secret, 0, PRIME - 1, *(rng.randbelow(PRIME) for _ in range(5))]:
        coeffs = _coefficients_through([(0, guess)] + [(s.x, s.y) for s in seen], PRIME)
        assert len(coeffs) == t and coeffs[0] == guess
        assert all(shamir.evaluate_polynomial(coeffs, s.x) == s.y for s in seen)


def test_one_share_is_uniform_whatever_the_secret_chi_square() -> None:
    """With t = 2 over GF(11), the share of holder 1 from `split` (real rng draws) is uniform for secret 0
    and for secret 10: chi-square goodness of fit at ALPHA with a fixed seed."""
    p = 11
    rng = SecureRNG.for_testing("shamir/uniform")
    for secret in (0, 10):
        counts = Counter(shamir.split(secret, 2, [1, 2], rng=rng, prime=p)[0].y for _ in range(2200))
        assert stats.chisquare([counts[v] for v in range(p)]).pvalue > ALPHA


def test_a_tampered_share_among_more_than_t_is_detected_and_named() -> None:
    rng = SecureRNG.for_testing("shamir/tamper")
    shares = shamir.split(rng.randbelow(PRIME), 3, [1, 2, 3, 4, 5], rng=rng)
    bad = Share(shares[3].x, (shares[3].y + 1) % PRIME)
    with pytest.raises(InconsistentSharesError, match="share at x=4"):
        shamir.reconstruct([*shares[:3], bad], 3)
    # whichever position the bad share takes, some check fails when more than t shares are combined
    for pos in range(4):
        mixed = [*shares[:4]]
        mixed[pos] = Share(mixed[pos].x, (mixed[pos].y + 12345) % PRIME)
        with pytest.raises(InconsistentSharesError):
            shamir.reconstruct(mixed, 3)


def test_exactly_t_shares_cannot_reveal_tampering_so_protocols_need_a_commitment() -> None:
    """The limit the masking protocol's commitments cover: t shares always interpolate to *some* value."""
    rng = SecureRNG.for_testing("shamir/t-exact")
    secret = rng.randbelow(PRIME)
    shares = shamir.split(secret, 3, [1, 2, 3], rng=rng)
    tampered = [shares[0], shares[1], Share(3, (shares[2].y + 1) % PRIME)]
    assert shamir.reconstruct(tampered, 3) != secret


def test_bytes_round_trip_and_value_encoding() -> None:
    rng = SecureRNG.for_testing("shamir/bytes")
    secret = rng.bytes(32)
    shares = shamir.split_bytes(secret, 2, [5, 9, 12], rng=rng)
    assert shamir.reconstruct_bytes(shares[1:], 2) == secret
    for s in shares:
        assert shamir.decode_value(shamir.encode_value(s.y)) == s.y
    with pytest.raises(MessageError, match=">= p"):
        shamir.decode_value(PRIME.to_bytes(33, "big"))
    with pytest.raises(MessageError, match="33 bytes, got 32"):
        shamir.decode_value(bytes(32))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: shamir.split(5, 4, [1, 2, 3], rng=r), r"threshold must be an int in \[1, 3\] for 3 holders, got 4"),
        (lambda r: shamir.split(5, 2, [1, 1, 3], rng=r), "1 appears twice"),
        (lambda r: shamir.split(5, 2, [0, 1, 3], rng=r), r"evaluation point must be an int in \[1, p-1\], got 0"),
        (lambda r: shamir.split(PRIME, 2, [1, 2], rng=r), "secret must be an int in"),
        (lambda r: shamir.split_bytes(b"short", 2, [1, 2], rng=r), "secret must be 32 bytes, got 5 bytes"),
        (lambda r: shamir.reconstruct([Share(1, 1)], 2), "reconstruction needs 2 shares, got 1"),
    ],
)
def test_bad_arguments_raise_config_errors_naming_the_value(call: Callable[[SecureRNG], object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        call(SecureRNG.for_testing("shamir/bad"))
