"""The raw Paillier layer: correctness against phe, key policy, secrecy of keys and obfuscators."""

from __future__ import annotations

import pickle

import gmpy2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phe import paillier as phe_paillier

from fedguard.errors import ConfigError
from fedguard.rng import SecureRNG
from fedguard.secagg.paillier.errors import CiphertextError, ForeignKeyError
from fedguard.secagg.paillier.keys import (
    DJNObfuscators,
    ObfuscatorPool,
    PaillierPrivateKey,
    PaillierPublicKey,
    check_key_bits,
    encrypt_many,
    key_fingerprint,
    obfuscator_source,
)
from tests.secagg.paillier.keys import small_keypair


def test_our_ciphertexts_decrypt_with_phe_and_phe_ciphertexts_decrypt_with_ours() -> None:
    pub, priv = phe_paillier.generate_paillier_keypair(n_length=512)
    ours_pub = PaillierPublicKey.from_phe(pub)
    ours_priv = PaillierPrivateKey.from_phe(ours_pub, priv)
    rng = SecureRNG.for_testing("phe-interop")
    for m in (0, 1, 12345, int(pub.n) - 1, 1 << 300):
        assert priv.raw_decrypt(int(ours_pub.encrypt(m, rng))) == m
        assert ours_priv.decrypt(pub.raw_encrypt(m)) == m


@settings(max_examples=30, deadline=None)
@given(a=st.integers(min_value=0), b=st.integers(min_value=0))
def test_product_of_ciphertexts_decrypts_to_the_sum_mod_n(a: int, b: int) -> None:
    kp = small_keypair()
    n = int(kp.public.n)
    a, b = a % n, b % n
    rng = SecureRNG.for_testing(f"homomorphic/{a}/{b}")
    c = kp.public.add(kp.public.encrypt(a, rng), kp.public.encrypt(b, rng))
    assert kp.private.decrypt(c) == (a + b) % n


def test_encryption_is_randomised_and_plaintexts_outside_z_n_are_refused() -> None:
    kp = small_keypair()
    rng = SecureRNG.for_testing("randomised")
    assert kp.public.encrypt(7, rng) != kp.public.encrypt(7, rng)
    with pytest.raises(ConfigError, match=r"plaintext must lie in \[0, n\)"):
        kp.public.encrypt(int(kp.public.n), rng)
    with pytest.raises(ConfigError, match=r"plaintext must lie in \[0, n\)"):
        kp.public.encrypt(-1, rng)


def test_key_policy_offers_2048_and_3072_and_refuses_small_keys_outside_tests() -> None:
    assert check_key_bits(2048) == 2048 and check_key_bits(3072) == 3072
    with pytest.raises(ConfigError, match="key_bits must be one of \\(2048, 3072\\).*got 1024"):
        check_key_bits(1024)
    assert check_key_bits(512, allow_insecure_test_keys=True) == 512
    with pytest.raises(ConfigError, match="got 128"):
        check_key_bits(128, allow_insecure_test_keys=True)


def test_public_key_round_trips_through_bytes_and_checks_its_fingerprint() -> None:
    kp, other = small_keypair(0), small_keypair(1)
    key = PaillierPublicKey.from_bytes(kp.public.to_bytes(), fingerprint=kp.public.fingerprint)
    assert key == kp.public and key.fingerprint == key_fingerprint(int(kp.public.n))
    with pytest.raises(ForeignKeyError, match=f"fingerprint {kp.public.fingerprint}.*claims {other.public.fingerprint}"):
        PaillierPublicKey.from_bytes(kp.public.to_bytes(), fingerprint=other.public.fingerprint)
    with pytest.raises(ForeignKeyError, match="unusable public key"):
        PaillierPublicKey.from_bytes((1 << 511).to_bytes(64, "big"))  # even: not a Paillier modulus


def test_ciphertext_parsing_refuses_wrong_length_out_of_range_and_non_units() -> None:
    kp = small_keypair()
    pub = kp.public
    rng = SecureRNG.for_testing("parse")
    good = [pub.encrypt(i, rng) for i in range(3)]
    width = pub.ciphertext_bytes
    assert pub.ciphertexts_from_bytes(pub.ciphertexts_to_bytes(good), 3) == good
    with pytest.raises(CiphertextError, match=f"is not 3 ciphertexts of {width} bytes"):
        pub.ciphertexts_from_bytes(pub.ciphertexts_to_bytes(good)[:-1], 3)
    zero = good[:1] + [gmpy2.mpz(0)] + good[2:]
    with pytest.raises(CiphertextError, match="ciphertext 1 is out of range"):
        pub.ciphertexts_from_bytes(pub.ciphertexts_to_bytes(zero), 3)
    too_big = (1 << (8 * width)) - 1
    data = pub.ciphertexts_to_bytes(good[:2]) + too_big.to_bytes(width, "little")
    with pytest.raises(CiphertextError, match="ciphertext 2 is out of range"):
        pub.ciphertexts_from_bytes(data, 3)
    p = kp.private._p  # a multiple of p is in range but not a unit
    non_unit = good[:1] + [gmpy2.mpz(p) * 3] + good[2:]
    with pytest.raises(CiphertextError, match="ciphertext 1 is not a unit"):
        pub.ciphertexts_from_bytes(pub.ciphertexts_to_bytes(non_unit), 3)


def test_private_key_and_obfuscator_pool_are_never_pickled_or_printed() -> None:
    kp = small_keypair()
    pool = ObfuscatorPool(kp.public, rng=SecureRNG.for_testing("pool-secret"))
    pool.fill(2)
    for secret in (kp.private, pool):
        with pytest.raises(TypeError, match="never pickled"):
            pickle.dumps(secret)
    assert str(int(kp.private._p)) not in repr(kp.private)
    assert "secret" in repr(kp.private) and "secret" in repr(pool)


def test_obfuscator_pool_hands_each_obfuscator_out_once_then_falls_back_to_fresh_ones() -> None:
    kp = small_keypair()
    pool = ObfuscatorPool(kp.public, rng=SecureRNG.for_testing("pool"))
    pool.fill(5)
    first = pool.take(2)
    assert len(pool) == 3
    second = pool.take(2)
    assert not set(map(int, first)) & set(map(int, second))
    rng = SecureRNG.for_testing("pool-encrypt")
    cts = encrypt_many(kp.public, [10, 20, 30], rng=rng, obfuscators=pool)  # 1 pooled, 2 fresh
    assert len(pool) == 0
    assert [int(kp.private.decrypt(c)) for c in cts] == [10, 20, 30]
    # the pooled obfuscator is exactly the one used: (1 + m n) R
    known = ObfuscatorPool(kp.public, rng=SecureRNG.for_testing("pool-known"))
    known.fill(1)
    (r,) = known._items
    (c,) = encrypt_many(kp.public, [5], rng=rng, obfuscators=known)
    assert c == kp.public.encrypt_with(5, r)


def test_obfuscator_pool_for_another_key_is_refused() -> None:
    pool = ObfuscatorPool(small_keypair(1).public, rng=SecureRNG.for_testing("other-pool"))
    pool.fill(1)
    with pytest.raises(ForeignKeyError, match=f"pool is for key {small_keypair(1).public.fingerprint}"):
        encrypt_many(small_keypair(0).public, [1], rng=SecureRNG.for_testing("x"), obfuscators=pool)


@pytest.mark.multiprocess
def test_parallel_encryption_fill_and_decryption_agree_with_serial() -> None:
    kp = small_keypair()
    rng = SecureRNG.for_testing("parallel")
    plaintexts = list(range(1000, 1020))
    cts = encrypt_many(kp.public, plaintexts, rng=rng, workers=2)
    assert [int(m) for m in kp.private.decrypt_many(cts, workers=2)] == plaintexts
    assert len(set(map(int, cts))) == len(cts)  # independent seeds per worker chunk: no repeated r
    pool = ObfuscatorPool(kp.public, rng=rng)
    pool.fill(12, workers=2)
    assert len(pool) == 12 and len({int(r) for r in pool.take(12)}) == 12


@pytest.mark.parametrize("method", ["standard", "djn"])
def test_obfuscators_are_distinct_nth_residues_so_they_decrypt_to_zero(method: str) -> None:
    kp = small_keypair()
    fresh = obfuscator_source(kp.public, SecureRNG.for_testing(f"residues/{method}"), method)  # type: ignore[arg-type]
    values = [fresh() for _ in range(20)]
    assert len({int(v) for v in values}) == 20
    assert all(kp.private.decrypt(v) == 0 for v in values)  # R = Enc(0; r): an n-th residue mod n^2
    assert all(gmpy2.gcd(v, kp.public.n) == 1 for v in values)


def test_djn_fast_path_encrypts_correctly_and_its_table_stays_secret() -> None:
    kp = small_keypair()
    rng = SecureRNG.for_testing("djn")
    plaintexts = [0, 1, 2**200 + 17, int(kp.public.n) - 1]
    cts = encrypt_many(kp.public, plaintexts, rng=rng, method="djn")
    assert [int(kp.private.decrypt(c)) for c in cts] == plaintexts
    source = DJNObfuscators(kp.public, rng)
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(source)
    assert "secret" in repr(source)
    with pytest.raises(ConfigError, match="obfuscator method must be one of \\('standard', 'djn'\\), got 'fast'"):
        encrypt_many(kp.public, [1], rng=rng, method="fast")  # type: ignore[arg-type]


@pytest.mark.multiprocess
def test_djn_fast_path_in_worker_processes_decrypts_correctly() -> None:
    kp = small_keypair()
    plaintexts = list(range(50, 70))
    cts = encrypt_many(kp.public, plaintexts, rng=SecureRNG.for_testing("djn-parallel"), workers=2, method="djn")
    assert [int(m) for m in kp.private.decrypt_many(cts)] == plaintexts


def test_a_public_key_of_the_wrong_size_is_refused_before_any_arithmetic() -> None:
    kp = small_keypair()
    with pytest.raises(ForeignKeyError, match="public key has 64 bytes, a 2048-bit modulus has 256"):
        PaillierPublicKey.from_bytes(kp.public.to_bytes(), bits=2048)
    assert PaillierPublicKey.from_bytes(kp.public.to_bytes(), bits=512) == kp.public
