"""The default obfuscators ``h_s^α`` (long exponent): correct comb, sizes, and the statistical half of the
DCR reduction (docs/secagg-paillier.md, "Why the fast obfuscators need DCR only"), tested on tiny keys.

The reduction runs the obfuscator code with a DCR challenge ``z`` as its base. If ``z`` is an n-th
residue, that is the scheme; the tests check that the scheme's obfuscators are uniform on ``<h_s>`` and
decrypt to 0. If ``z`` is *not* an n-th residue, ``z^α = g^α·(1+n)^(t·α)`` and the argument claims that
``(z^α mod n, D(z^α) = t·α mod n)`` is uniform on ``<g> × Z_n``: the plaintext part is a uniform mask
independent of everything else. On a 7-bit modulus that joint distribution is small enough to count, so
the claim is checked with a chi-square test, and the same test rejects DJN's original half-length
exponent overwhelmingly (its masks ``t·α`` take only a few values): the long exponent is what the
argument needs.
"""

from __future__ import annotations

from collections import Counter

import gmpy2
import pytest
from scipy.stats import chisquare

from fedguard.errors import ConfigError
from fedguard.rng import SecureRNG
from fedguard.secagg.paillier.keys import (
    STATISTICAL_BITS,
    DJNObfuscators,
    ObfuscatorPool,
    PaillierPrivateKey,
    PaillierPublicKey,
    best_window,
    encrypt_many,
    exponent_bits,
    obfuscator_source,
)
from fedguard.secagg.paillier.options import PaillierOptions
from tests.secagg.paillier.keys import small_keypair

P, Q = 7, 11  # n = 77, φ(n) = 60, gcd(n, φ(n)) = 1: a (toy) Paillier modulus
N = P * Q
SAMPLES = 40_000


def _tiny_key() -> tuple[PaillierPublicKey, PaillierPrivateKey]:
    pub = PaillierPublicKey(N)
    return pub, PaillierPrivateKey(pub, P, Q)


def _order_mod_n(x: int) -> int:
    k, y = 1, x % N
    while y != 1:
        y, k = y * x % N, k + 1
    return k


def _subgroup_mod_n(x: int) -> set[int]:
    return {pow(x, k, N) for k in range(_order_mod_n(x))}


def _p_value(counts: Counter[object], support: set[object]) -> float:
    """Chi-square goodness of fit of ``counts`` to the uniform distribution on ``support``."""
    assert set(counts) <= support
    observed = [counts.get(s, 0) for s in support]
    return float(chisquare(observed).pvalue)


def test_exponent_is_long_enough_for_every_window_and_the_comb_computes_h_to_the_alpha() -> None:
    kp = small_keypair()
    base = int(kp.public.obfuscator(SecureRNG.for_testing("comb/base")))
    n2 = int(kp.public.n_squared)
    assert exponent_bits(2048) == 2 * 2048 + STATISTICAL_BITS == 4136
    for window in range(1, 9):
        source = DJNObfuscators.with_base(kp.public, SecureRNG.for_testing(f"comb/{window}"), base, window=window)
        assert source.exponent_bits >= exponent_bits(kp.public.bits)
        assert source.exponent_bits - exponent_bits(kp.public.bits) < window
        # replay the CSPRNG stream: α is the little-endian integer of the drawn bytes, h_s^α is what comes out
        replay = SecureRNG.for_testing(f"comb/{window}")
        for _ in range(3):
            drawn = int.from_bytes(replay.bytes((source.exponent_bits + 7) // 8), "little")
            alpha = drawn % (1 << source.exponent_bits)  # bits beyond rows·w are drawn and unused
            assert source.obfuscator() == pow(base, alpha, n2)


def test_fixed_base_obfuscators_are_distinct_nth_residues_and_the_default() -> None:
    kp = small_keypair()
    assert PaillierOptions().obfuscator == "djn"
    source = DJNObfuscators(kp.public, SecureRNG.for_testing("default"))
    values = [source.obfuscator() for _ in range(50)]
    assert len({int(v) for v in values}) == 50 and all(kp.private.decrypt(v) == 0 for v in values)
    plaintexts = list(range(100, 160))
    cts = encrypt_many(kp.public, plaintexts, rng=SecureRNG.for_testing("default/enc"))  # default method
    assert [int(kp.private.decrypt(c)) for c in cts] == plaintexts


def test_small_batches_use_fresh_r_to_the_n_and_large_ones_an_8_bit_table() -> None:
    assert best_window(2048, 1) is None and best_window(2048, 5) is None
    assert best_window(2048, 100) == 5 and best_window(2048, 10_753) == 8 and best_window(2048, None) == 8
    kp = small_keypair()
    one = obfuscator_source(kp.public, SecureRNG.for_testing("one"), "djn", count=1)
    assert kp.private.decrypt(one()) == 0
    with pytest.raises(ConfigError, match="count must be"):
        best_window(2048, -1)
    with pytest.raises(ConfigError, match="unit of Z"):
        DJNObfuscators.with_base(kp.public, SecureRNG.for_testing("bad"), 0)
    with pytest.raises(ConfigError, match="window must be"):
        DJNObfuscators(kp.public, SecureRNG.for_testing("bad"), window=9)


def test_scheme_obfuscators_are_uniform_on_the_subgroup_of_h_s() -> None:
    """Case 0 of the reduction (the real scheme): ``h_s^α`` is uniform on ``<h_s>`` and decrypts to 0."""
    pub, priv = _tiny_key()
    rng = SecureRNG.for_testing("case0")
    source = DJNObfuscators(pub, rng)
    h_mod_n = int(source._table[0][1]) % N  # noqa: SLF001 - the secret base, read by the test only
    counts = Counter(int(source.obfuscator()) % N for _ in range(SAMPLES // 4))
    assert _p_value(counts, _subgroup_mod_n(h_mod_n)) > 1e-4  # type: ignore[arg-type]
    assert all(priv.decrypt(source.obfuscator()) == 0 for _ in range(100))


def _case1_base(rng: SecureRNG) -> tuple[int, int]:
    """A unit ``z = g·(1+n)^t`` that is not an n-th residue (``t ∈ Z*_n``) with ``<g>`` as large as it gets."""
    pub, priv = _tiny_key()
    while True:
        z = int(pub.random_unit(rng)) + N * rng.randbelow(N)
        t = int(priv.decrypt(z))
        if gmpy2.gcd(z, N) == 1 and gmpy2.gcd(t, N) == 1 and _order_mod_n(z) == 30:  # λ(77) = 30
            return z, t


def test_with_a_non_residue_base_the_plaintext_mask_is_uniform_and_independent() -> None:
    """Case 1 of the reduction: ``(z^α mod n, D(z^α))`` is uniform on ``<g> × Z_n`` (2,310 cells)."""
    pub, priv = _tiny_key()
    rng = SecureRNG.for_testing("case1")
    z, _ = _case1_base(rng)
    source = DJNObfuscators.with_base(pub, rng, z)
    counts: Counter[tuple[int, int]] = Counter()
    for _ in range(SAMPLES):
        c = source.obfuscator()
        counts[(int(c) % N, int(priv.decrypt(c)))] += 1
    support = {(g, u) for g in _subgroup_mod_n(z) for u in range(N)}
    assert len(support) == 30 * N
    assert _p_value(counts, support) > 1e-4  # type: ignore[arg-type]
    # encryptions of 0 and 1 under this base: both masks uniform on Z_n, so they look the same
    for m in (0, 1):
        masks = Counter(int(priv.decrypt(pub.encrypt_with(m, source.obfuscator()))) for _ in range(SAMPLES // 4))
        assert _p_value(masks, set(range(N))) > 1e-4  # type: ignore[arg-type]


def test_djn_half_length_exponent_fails_the_same_test() -> None:
    """The attack on the statistical step: with ``α`` of ``ceil(bits(n)/2)`` bits (DJN's original choice)
    the mask ``t·α mod n`` takes at most ``2^4`` of the 77 values, so ``D(c) - m`` is far from uniform and
    the plaintext is not statistically hidden (its security would need the short-exponent assumption)."""
    pub, priv = _tiny_key()
    rng = SecureRNG.for_testing("short")
    z, _ = _case1_base(rng)
    n2 = int(pub.n_squared)
    short_bits = (pub.bits + 1) // 2
    counts = Counter(int(priv.decrypt(pow(z, rng.randbelow(1 << short_bits), n2))) for _ in range(SAMPLES // 4))
    assert len(counts) <= 1 << short_bits
    assert _p_value(counts, set(range(N))) < 1e-30  # type: ignore[arg-type]


@pytest.mark.multiprocess
def test_default_tables_in_worker_processes_and_pool_fill_encrypt_correctly() -> None:
    kp = small_keypair()
    assert best_window(kp.public.bits, 40) is not None  # 40 per worker: each builds its own secret table
    plaintexts = list(range(1000, 1080))
    cts = encrypt_many(kp.public, plaintexts, rng=SecureRNG.for_testing("workers"), workers=2)
    assert [int(m) for m in kp.private.decrypt_many(cts)] == plaintexts
    assert len({int(c) for c in cts}) == len(cts)
    pool = ObfuscatorPool(kp.public, rng=SecureRNG.for_testing("pool-workers"))  # default method
    pool.fill(80, workers=2)
    values = pool.take(80)
    assert len({int(v) for v in values}) == 80 and all(kp.private.decrypt(v) == 0 for v in values)
