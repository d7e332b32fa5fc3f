"""Additive sharing over Z_2^64 and the per-party AEAD channel (no processes, no CrypTen)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fedguard.errors import ConfigError
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
