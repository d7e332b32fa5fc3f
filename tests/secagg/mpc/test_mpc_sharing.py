"""Additive sharing over Z_2^k (k = the round's ring, 64 under the norm check) and the per-party AEAD channel
(no processes, no CrypTen)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fedguard.errors import ConfigError, InvalidUpdateError
from fedguard.rng import SecureRNG
from fedguard.secagg.mpc.sharing import (
    SealedShares,
    expand,
    new_party_key,
    open_share,
    public_key_bytes,
    seal,
    split,
)


def test_expand_is_the_aes256_ctr_keystream_known_answer() -> None:
    # FIPS-197-style known answer: AES-256 with the all-zero key encrypts the zero block to dc95c078...
    first = expand(bytes(32), 2).astype("<u8").tobytes()
    assert first.hex() == "dc95c078a2408989ad48a21492842087"


@pytest.mark.parametrize("n_parties", [2, 3, 5])
def test_shares_add_up_to_the_input_exactly(n_parties: int) -> None:
    rng = SecureRNG.for_testing(f"split/{n_parties}")
    x = rng.ring_elements(1000, 64)
    share0, seeds = split(x, n_parties, rng)
    total = share0.copy()
    for seed in seeds:
        total += expand(seed, x.size)
    np.testing.assert_array_equal(total, x)


def test_party0_share_of_a_constant_input_is_uniform() -> None:
    # chi-square on the top byte of party 0's share of x = 0: uniform at the 1e-3 level (fixed seed)
    rng = SecureRNG.for_testing("uniform-share")
    share0, _ = split(np.zeros(200_000, dtype=np.uint64), 3, rng)
    counts = np.bincount((share0 >> np.uint64(56)).astype(np.int64), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-3


def test_each_party_opens_only_its_own_share() -> None:
    rng = SecureRNG.for_testing("open")
    keys = [new_party_key(rng.spawn(f"k{k}")) for k in range(3)]
    pubs = tuple(public_key_bytes(k) for k in keys)
    x = rng.ring_elements(50, 64)
    sealed = seal(x, pubs, round_id=3, client_id=9, rng=rng)
    shares = [open_share(sealed, k, keys[k], round_id=3, client_id=9, length=50) for k in range(3)]
    assert all(s is not None for s in shares)
    np.testing.assert_array_equal(sum(shares[1:], shares[0].copy()), x)  # type: ignore[union-attr]
    # another party's key, another round, another client, another length: all refused
    assert open_share(sealed, 1, keys[2], round_id=3, client_id=9, length=50) is None
    assert open_share(sealed, 1, keys[1], round_id=4, client_id=9, length=50) is None
    assert open_share(sealed, 1, keys[1], round_id=3, client_id=8, length=50) is None
    assert open_share(sealed, 0, keys[0], round_id=3, client_id=9, length=49) is None
    swapped = SealedShares(sealed.ephemeral_key, (sealed.ciphertexts[1], sealed.ciphertexts[0], sealed.ciphertexts[2]))
    assert open_share(swapped, 0, keys[0], round_id=3, client_id=9, length=50) is None


def test_split_validates_the_number_of_parties() -> None:
    with pytest.raises(ConfigError, match="n_parties must be in \\[2, 16\\], got 1"):
        split(np.zeros(3, dtype=np.uint64), 1, SecureRNG.for_testing("x"))


# -- shares in the round's ring (Z_2^k, party 0's share in the ring's word) --------------------------------
def test_expand_in_a_narrow_ring_reads_the_same_keystream_in_narrower_words() -> None:
    wide = expand(bytes(32), 2).astype("<u8").tobytes()
    assert expand(bytes(32), 4, 32).astype("<u4").tobytes() == wide
    assert expand(bytes(32), 16, 8).astype("u1").tobytes() == wide
    # a width that is not a word: the low 12 bits of each 16-bit word
    np.testing.assert_array_equal(expand(bytes(32), 8, 12), expand(bytes(32), 8, 16) & np.uint64(0xFFF))


@pytest.mark.parametrize("ring_bits", [8, 12, 16, 32])
@pytest.mark.parametrize("n_parties", [2, 3])
def test_shares_in_a_narrow_ring_add_up_to_the_input_and_stay_in_the_ring(ring_bits: int, n_parties: int) -> None:
    rng = SecureRNG.for_testing(f"split/{ring_bits}/{n_parties}")
    x = rng.ring_elements(1000, ring_bits)
    share0, seeds = split(x, n_parties, rng, ring_bits)
    assert int(share0.max()) < 1 << ring_bits
    total = share0.copy()
    for seed in seeds:
        part = expand(seed, x.size, ring_bits)
        assert int(part.max()) < 1 << ring_bits
        total += part
    np.testing.assert_array_equal(total & np.uint64((1 << ring_bits) - 1), x)


def test_party0_share_in_an_8_bit_ring_is_uniform_on_every_value() -> None:
    # chi-square over all 256 elements of Z_2^8 for a constant input (x = 5): a one-time pad mod 2^8
    rng = SecureRNG.for_testing("uniform-share-8")
    share0, _ = split(np.full(100_000, 5, dtype=np.uint64), 3, rng, 8)
    counts = np.bincount(share0.astype(np.int64), minlength=256)
    assert counts.size == 256 and stats.chisquare(counts).pvalue > 1e-3


@pytest.mark.parametrize(("ring_bits", "word"), [(8, 1), (16, 2), (32, 4), (64, 8)])
def test_party0_ciphertext_is_one_ring_word_per_value(ring_bits: int, word: int) -> None:
    rng = SecureRNG.for_testing(f"word/{ring_bits}")
    keys = [new_party_key(rng.spawn(f"k{k}")) for k in range(3)]
    pubs = tuple(public_key_bytes(k) for k in keys)
    x = rng.ring_elements(301, ring_bits)
    sealed = seal(x, pubs, round_id=1, client_id=2, rng=rng, ring_bits=ring_bits)
    assert len(sealed.ciphertexts[0]) == 12 + word * 301 + 16  # nonce + one word per value + GCM tag
    assert all(len(ct) == 12 + 32 + 16 for ct in sealed.ciphertexts[1:])  # a seed each
    shares = [open_share(sealed, k, keys[k], round_id=1, client_id=2, length=301, ring_bits=ring_bits)
              for k in range(3)]
    total = sum(shares[1:], shares[0].copy())  # type: ignore[union-attr]
    if ring_bits < 64:
        total &= np.uint64((1 << ring_bits) - 1)
    np.testing.assert_array_equal(total, x)
    if ring_bits < 64:  # a party that expects another width refuses the share (wrong size), nothing is misread
        assert open_share(sealed, 0, keys[0], round_id=1, client_id=2, length=301, ring_bits=64) is None


def test_an_input_outside_the_ring_is_refused_before_anything_is_sealed() -> None:
    rng = SecureRNG.for_testing("outside")
    with pytest.raises(InvalidUpdateError, match="outside Z_2\\^16"):
        split(np.array([1 << 16], dtype=np.uint64), 3, rng, 16)
    with pytest.raises(ConfigError, match="ring_bits"):
        split(np.array([1], dtype=np.uint64), 3, rng, 65)
