"""Shared small test keys: generated once per test process (512-bit keys are for tests only)."""

from __future__ import annotations

from functools import cache

from fedguard.secagg.paillier.keys import PaillierKeypair, generate_keypair

TEST_BITS = 512


def small_keypair(index: int = 0, bits: int = TEST_BITS) -> PaillierKeypair:
    """The ``index``-th cached key pair of ``bits`` bits (distinct indices give distinct keys)."""
    return _cached(index, bits)


@cache
def _cached(index: int, bits: int) -> PaillierKeypair:
    return generate_keypair(bits, allow_insecure_test_keys=True)
