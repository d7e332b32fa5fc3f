"""Slot packing: layouts derived from the encoding, no slot overflow at the planned N, exact round trips,
and decryption under the wrong key raising instead of returning garbage."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedguard.encoding import FixedPointSpec, encode_weighted, ring_sum, to_ring
from fedguard.errors import ConfigError, InvalidUpdateError
from fedguard.federation.protocol import RoundSpec
from fedguard.rng import SecureRNG
from fedguard.secagg.paillier import decrypt_sum, encrypt_vector, sum_ciphertexts
from fedguard.secagg.paillier.errors import CiphertextError, DecryptionError, SlotOverflowError
from fedguard.secagg.paillier.packing import STATISTICAL_BITS, SlotLayout
from tests.secagg.paillier.keys import small_keypair

SPEC8 = FixedPointSpec(clip=1.0, value_bits=8, ring_bits=32, max_weight=1024)


def _round(n: int, length: int, ring_bits: int, fixed_point: FixedPointSpec | None = None) -> RoundSpec:
    return RoundSpec(3, tuple(range(n)), length, ring_bits, fixed_point=fixed_point)


def test_bounded_layout_is_derived_from_the_fixed_point_spec() -> None:
    # B = max_weight * M = 1024 * 127; U = 2B; 10 clients: N*U = 2_600_960 needs 22 bits
    layout = SlotLayout.derive(modulus_bits=2048, round_spec=_round(10, 1_000_001, 32, fixed_point=SPEC8))
    assert (layout.offset, layout.value_max) == (1024 * 127, 2 * 1024 * 127)
    assert layout.slot_bits == (10 * 2 * 1024 * 127).bit_length() == 22
    assert layout.slots_per_ciphertext == 2047 // 22 == 93
    assert layout.bytes_per_value(512) < 6.0


def test_ring_layout_adds_carry_mask_and_log2_n_headroom_bits_to_the_ring() -> None:
    layout = SlotLayout.derive(modulus_bits=2048, round_spec=_round(6, 17, 64))
    # h = σ + bit_length(N - 1) + bit_length(L) = 40 + 3 + 5; U' = 2^64 - 1 + 2^64·(2^h - 1) = 2^(64+h) - 1
    assert layout.offset == 0 and layout.mask_bits == STATISTICAL_BITS + 3 + 5 == 48
    assert layout.value_max == (1 << 112) - 1
    assert layout.slot_bits == 112 + 3 and layout.slots_per_ciphertext == 2047 // 115
    big = SlotLayout.derive(modulus_bits=2048, round_spec=_round(6, 17, 64), max_clients=1000)
    assert big.mask_bits == 40 + 10 + 5 and big.slot_bits == 64 + 55 + 10
    # bounded mode: slot sums stay below 2^k, so no mask is needed (the integer sum *is* the ring sum)
    assert SlotLayout.derive(modulus_bits=2048, round_spec=_round(10, 17, 32, fixed_point=SPEC8)).mask_bits == 0


def _slot_sums(layout: SlotLayout, vectors: list[np.ndarray], seed: str) -> list[int]:
    """What the key holder sees: the decrypted integer slot sums (before any reduction)."""
    kp = small_keypair()
    rng = SecureRNG.for_testing(seed)
    cts = [kp.public.ciphertexts_from_bytes(encrypt_vector(kp.public, layout, v, rng=rng.spawn(str(i))),
                                            layout.n_ciphertexts) for i, v in enumerate(vectors)]
    plain = kp.private.decrypt_many(sum_ciphertexts(kp.public, cts))
    s, b = layout.slots_per_ciphertext, layout.slot_bits
    slots = [(int(m) >> (b * j)) & ((1 << b) - 1) for m in plain for j in range(s)]
    return slots[: layout.vector_length]


def test_ring_mode_hides_the_per_coordinate_carry_count_from_the_key_holder() -> None:
    # 3 clients in Z_2^8; in even coordinates two entries wrap (255 + 255 + 2 = 512: carry 2), in odd ones
    # none (0 + 0 + 0): the ring sums are all 0, so a view computed from the ring sum cannot tell them apart
    k, L, n = 8, 40, 3
    layout = SlotLayout.derive(modulus_bits=512, round_spec=_round(n, L, k))
    wrap = np.arange(L) % 2 == 0
    vectors = [np.where(wrap, v, 0).astype(np.uint64) for v in (255, 255, 2)]
    np.testing.assert_array_equal(ring_sum(vectors, k), np.zeros(L, dtype=np.uint64))
    slots = _slot_sums(layout, vectors, "carries")
    high = np.array([v >> k for v in slots], dtype=object)
    assert all((v & 0xFF) == 0 for v in slots)  # the low k bits are the ring sum
    # unmasked, the high part would be the carry count itself (2 or 0); masked, it is carry + Σ_i r_i with
    # r_i uniform on [0, 2^h): every high part is far above any carry count (fails w.p. ~L·n/2^h)
    carries = np.where(wrap, 2, 0)
    assert not any(h == c for h, c in zip(high, carries))
    assert all(h >= n for h in high)
    assert all(h < n << layout.mask_bits for h in high)
    # and the ring sum is still exact
    np.testing.assert_array_equal(_encrypted_round_trip(layout, vectors, "carries-exact"), ring_sum(vectors, k))


def test_carry_mask_bits_of_one_client_are_uniform_and_padding_stays_zero() -> None:
    # one client's plaintext: slot bits [k, k + h) are the mask r; a fixed-seed binomial test at α = 1e-6
    k, L = 16, 50
    layout = SlotLayout.derive(modulus_bits=512, round_spec=_round(4, L, k))
    plain = layout.pack(np.zeros(L, dtype=np.uint64), rng=SecureRNG.for_testing("mask-bits"))
    s, b, h = layout.slots_per_ciphertext, layout.slot_bits, layout.mask_bits
    slots = [(m >> (b * j)) & ((1 << b) - 1) for m in plain for j in range(s)]
    real, padding = slots[:L], slots[L:]
    assert all(v & ((1 << k) - 1) == 0 for v in real) and all(v >> (k + h) == 0 for v in real)
    assert padding and all(v == 0 for v in padding)
    ones = sum(bin(v >> k).count("1") for v in real)
    trials = L * h
    z = (ones - trials / 2) / (trials / 4) ** 0.5
    assert abs(z) < 4.9  # two-sided p < 1e-6 under the uniform-bits hypothesis


def test_more_participants_than_the_headroom_is_refused_before_encryption() -> None:
    with pytest.raises(SlotOverflowError, match="4 participants but the slots were sized for max_clients=3"):
        SlotLayout.derive(modulus_bits=2048, round_spec=_round(4, 5, 32, fixed_point=SPEC8), max_clients=3)
    layout = SlotLayout.derive(modulus_bits=512, round_spec=_round(3, 5, 32, fixed_point=SPEC8))
    with pytest.raises(SlotOverflowError, match="4 contributors exceed the slot headroom of max_clients=3"):
        layout.unpack([0], 4)


def test_layout_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="fixed_point.ring_bits=32 differs from the round's ring_bits=64"):
        _round(3, 5, 64, fixed_point=SPEC8)  # the round itself refuses an encoding of another ring
    with pytest.raises(ConfigError, match="cannot hold one 113-bit slot"):
        SlotLayout.derive(modulus_bits=64, round_spec=_round(6, 5, 64))
    layout = SlotLayout.derive(modulus_bits=512, round_spec=_round(3, 3, 32, fixed_point=SPEC8))
    bad = to_ring(np.array([5, -(1024 * 127) - 1, 1]), 32)
    with pytest.raises(InvalidUpdateError, match=r"ring entry 1 is -130049, outside the bounded range"):
        layout.pack(bad)


def _encrypted_round_trip(layout: SlotLayout, vectors: list[np.ndarray], seed: str) -> np.ndarray:
    kp = small_keypair()
    rng = SecureRNG.for_testing(seed)
    cts = [
        kp.public.ciphertexts_from_bytes(encrypt_vector(kp.public, layout, v, rng=rng), layout.n_ciphertexts)
        for v in vectors
    ]
    return decrypt_sum(kp.private, layout, sum_ciphertexts(kp.public, cts), len(vectors))


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 12),
    extreme=st.sampled_from(["max", "min", "alternating", "mixed"]),
    value_bits=st.integers(2, 20),
    max_weight=st.integers(1, 5000),
    length=st.integers(1, 40),
)
def test_no_slot_overflows_for_the_planned_n_with_extreme_bounded_values(
    n: int, extreme: str, value_bits: int, max_weight: int, length: int
) -> None:
    spec = FixedPointSpec(clip=1.0, value_bits=value_bits, ring_bits=64, max_weight=max_weight)
    bound = max_weight * spec.max_int
    layout = SlotLayout.derive(modulus_bits=512, round_spec=_round(n, length, 64, fixed_point=spec))
    signs = {
        "max": np.ones((n, length)),
        "min": -np.ones((n, length)),
        "alternating": np.where(np.arange(length) % 2 == 0, 1, -1)[None, :].repeat(n, 0),
        "mixed": np.where(np.arange(n)[:, None] % 2 == 0, 1, -1).repeat(length, 1),
    }[extreme]
    vectors = [to_ring((signs[i] * bound).astype(np.int64), 64) for i in range(n)]
    got = _encrypted_round_trip(layout, vectors, f"extreme/{n}/{extreme}")
    np.testing.assert_array_equal(got, ring_sum(vectors, 64))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 8), ring_bits=st.sampled_from([8, 31, 63, 64]), seed=st.integers(0, 2**16))
def test_no_slot_overflows_in_ring_mode_with_all_ones_and_uniform_elements(n: int, ring_bits: int, seed: int) -> None:
    layout = SlotLayout.derive(modulus_bits=512, round_spec=_round(n, 9, ring_bits))
    rng = SecureRNG.for_testing(f"ring-mode/{seed}")
    vectors = [np.full(9, (1 << ring_bits) - 1, dtype=np.uint64)] * (n // 2) + [
        rng.ring_elements(9, ring_bits) for _ in range(n - n // 2)
    ]
    np.testing.assert_array_equal(_encrypted_round_trip(layout, vectors, f"ring/{seed}"), ring_sum(vectors, ring_bits))


@settings(max_examples=25, deadline=None)
@given(
    values=st.lists(st.sampled_from([0.0, -0.0, -1.0, -0.5, -1e-9, 1e-9, 0.25, 1.0, -3.0, 7.0]), min_size=1, max_size=30),
    weight=st.integers(1, 1024),
)
def test_negative_values_and_zeros_round_trip_exactly(values: list[float], weight: int) -> None:
    x = np.array(values, dtype=np.float32)
    ring = encode_weighted(x, weight, SPEC8, rounding="nearest")
    layout = SlotLayout.derive(modulus_bits=512, round_spec=_round(1, ring.size, 32, fixed_point=SPEC8))
    np.testing.assert_array_equal(_encrypted_round_trip(layout, [ring], "neg-zero"), ring)
    zeros = np.zeros(ring.size, dtype=np.uint64)
    np.testing.assert_array_equal(_encrypted_round_trip(layout, [zeros], "zeros"), zeros)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), length=st.integers(5, 40), bounded=st.booleans())
def test_decrypting_with_the_wrong_key_raises(seed: int, length: int, bounded: bool) -> None:
    right, wrong = small_keypair(0), small_keypair(1)
    layout = SlotLayout.derive(modulus_bits=512,
                               round_spec=_round(3, length, 32, fixed_point=SPEC8 if bounded else None))
    rng = SecureRNG.for_testing(f"wrong-key/{seed}")
    vec = to_ring(np.zeros(length, dtype=np.int64), 32)
    data = encrypt_vector(right.public, layout, vec, rng=rng)
    # the same bytes taken for ciphertexts under the wrong key (a server lying about the fingerprint): out
    # of range for the other modulus, or decrypted to a plaintext that the decoded-sum checks refuse
    with pytest.raises((CiphertextError, DecryptionError), match="out of range|wrong key or tampered sum"):
        cts = wrong.public.ciphertexts_from_bytes(data, layout.n_ciphertexts)
        decrypt_sum(wrong.private, layout, cts, 1)
    # and the right key still decrypts them
    cts = right.public.ciphertexts_from_bytes(data, layout.n_ciphertexts)
    np.testing.assert_array_equal(decrypt_sum(right.private, layout, cts, 1), vec)
