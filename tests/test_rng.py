"""fedguard.rng: known-answer vectors, reproducibility of seeded streams, and distribution tests."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fedguard.errors import ConfigError
from fedguard.rng import SEED_BYTES, SecureRNG, expand_seed, random_seed

ALPHA = 1e-3  # significance of every statistical test in this file


def test_keystream_matches_rfc8439_vector() -> None:
    # RFC 8439 Appendix A.1, test vector #1: all-zero key and nonce, block counter 0.
    expected = bytes.fromhex(
        "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
        "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
    )
    assert SecureRNG.from_seed(bytes(32)).bytes(64) == expected


def test_stream_is_the_same_however_it_is_chunked() -> None:
    a = SecureRNG.from_seed(b"k" * 32)
    b = SecureRNG.from_seed(b"k" * 32)
    assert a.bytes(3) + a.bytes(2_000_005) == b.bytes(2_000_008)


def test_seeded_streams_reproduce_and_differ_by_seed() -> None:
    assert np.array_equal(expand_seed(b"s" * 32, 100, 64), expand_seed(b"s" * 32, 100, 64))
    assert not np.array_equal(expand_seed(b"s" * 32, 100, 64), expand_seed(b"t" * 32, 100, 64))
    assert not np.array_equal(
        expand_seed(b"s" * 32, 100, 64), expand_seed(b"s" * 32, 100, 64, nonce=b"\x01" + bytes(11))
    )


def test_default_rng_is_fresh_each_time() -> None:
    assert SecureRNG().bytes(32) != SecureRNG().bytes(32)
    assert len(random_seed()) == SEED_BYTES


def test_spawned_children_are_independent_of_parent_consumption() -> None:
    parent = SecureRNG.for_testing(1)
    child_before = parent.spawn("client/3").bytes(16)
    parent.bytes(1000)
    assert parent.spawn("client/3").bytes(16) == child_before
    assert parent.spawn("client/4").bytes(16) != child_before


def test_repr_does_not_leak_the_seed() -> None:
    assert "secret" in repr(SecureRNG(b"x" * 32)) and "78" not in repr(SecureRNG(b"x" * 32))


@pytest.mark.parametrize("bad", [b"short", b"x" * 33, "a" * 32])
def test_bad_seed_is_refused(bad: object) -> None:
    with pytest.raises(ConfigError, match="seed must be 32 bytes"):
        SecureRNG(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("ring_bits", [1, 13, 32, 63, 64])
def test_ring_elements_stay_in_the_ring_and_fill_it(ring_bits: int) -> None:
    x = SecureRNG.for_testing("ring").ring_elements(20_000, ring_bits)
    assert x.dtype == np.uint64
    if ring_bits < 64:
        assert int(x.max()) < 1 << ring_bits
    # top bit of the ring is set about half the time
    top = (x >> np.uint64(ring_bits - 1)) & np.uint64(1)
    assert stats.binomtest(int(top.sum()), x.size).pvalue > ALPHA


def test_integers_below_are_uniform_chi_square() -> None:
    x = SecureRNG.for_testing("below").integers_below(60_000, 6)
    counts = np.bincount(x.astype(np.int64), minlength=6)
    assert counts.size == 6
    assert stats.chisquare(counts).pvalue > ALPHA


def test_randbelow_handles_big_moduli() -> None:
    rng = SecureRNG.for_testing("big")
    n = (1 << 2047) + 12345
    draws = [rng.randbelow(n) for _ in range(200)]
    assert all(0 <= d < n for d in draws)
    assert max(draws).bit_length() >= 2040  # not stuck in a small range


def test_uniform01_passes_kolmogorov_smirnov() -> None:
    u = SecureRNG.for_testing("u01").uniform01(50_000)
    assert u.min() >= 0 and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > ALPHA


def test_normal_passes_kolmogorov_smirnov() -> None:
    z = SecureRNG.for_testing("normal").normal(50_001, std=2.5)
    assert z.shape == (50_001,)
    assert stats.kstest(z / 2.5, "norm").pvalue > ALPHA


def test_numpy_generator_is_seeded_from_the_stream() -> None:
    a = SecureRNG.for_testing(9).numpy_generator().integers(0, 1 << 30, 5)
    b = SecureRNG.for_testing(9).numpy_generator().integers(0, 1 << 30, 5)
    assert np.array_equal(a, b)
