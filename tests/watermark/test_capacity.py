"""FedIPR's capacity bound: K*N <= M, refusal with numbers, and Cover's count beyond it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedguard.rng import SecureRNG
from fedguard.watermark import CapacityError, make_sign_key, plan_capacity
from fedguard.watermark.capacity import allocate_bits, min_bits_for, realisable_fraction
from fedguard.watermark.simulation import SimulationConfig, tiny_gpt2_lora


def test_plan_within_the_bound_is_accepted_with_its_load() -> None:
    plan = plan_capacity([64, 64, 64, 64], 32, 4)
    assert plan.block_bits == (8, 8, 8, 8)
    assert plan.load == pytest.approx(0.5)
    assert plan.max_bits_per_client == 64


def test_over_capacity_plan_is_refused_naming_the_numbers() -> None:
    with pytest.raises(CapacityError, match=r"4 client\(s\) x 80 bits = 320 bits > M = 256.*at most 64 bits"):
        plan_capacity([64, 64, 64, 64], 80, 4)


def test_too_few_bits_for_the_significance_is_refused() -> None:
    assert min_bits_for(1e-6) == 20
    with pytest.raises(CapacityError, match="at least 20 bits"):
        plan_capacity([512], 19, 1)
    plan_capacity([512], 20, 1)


def test_keygen_refuses_an_over_capacity_federation() -> None:
    model = tiny_gpt2_lora(SimulationConfig(n_layer=2), 0)  # 4 invariant norm blocks of 64 channels: M = 256
    with pytest.raises(CapacityError, match="M = 256"):
        make_sign_key(model, bits=64, n_clients=5, rng=SecureRNG.for_testing("cap"))


def test_allocation_is_proportional_and_exact() -> None:
    bits = allocate_bits(64, [576, 576, 128])
    assert bits == [29, 29, 6]


def test_cover_count_matches_enumeration_of_sign_patterns() -> None:
    """P = 5 random directions in R^2: exactly C(5, 2) = 2*(1+4) = 10 of the 32 patterns are realisable."""
    rng = SecureRNG.for_testing("cover").numpy_generator()
    e = rng.standard_normal((2, 5))
    angles = np.linspace(0, 2 * np.pi, 20000, endpoint=False)
    thetas = np.stack([np.cos(angles), np.sin(angles)])
    patterns = {tuple(col) for col in np.sign(e.T @ thetas).T.astype(int) if 0 not in col}
    assert len(patterns) == 10
    assert realisable_fraction(5, 2) == pytest.approx(10 / 32)
    assert realisable_fraction(2, 5) == 1.0
    # and every one of the 2^P patterns is realisable when P <= M (full column rank):
    e3 = rng.standard_normal((3, 3))
    for signs in itertools.product((-1, 1), repeat=3):
        theta = np.linalg.solve(e3.T, np.array(signs, dtype=float))
        assert tuple(np.sign(e3.T @ theta).astype(int)) == signs


def test_over_capacity_message_states_the_block_diagonal_realisable_fraction() -> None:
    """Four blocks of 64, 8 clients x 64 bits: 16 bits per client per block, 128 constraints on each
    block's 64 parameters. Cover's share per block is F(128, 64) = 1/2 (by symmetry of Binomial(127, 1/2)),
    so 1/16 of all patterns for the four independent blocks — not F(512, 256), which pools the blocks."""
    from fedguard.watermark.capacity import CapacityError, block_realisable_fraction, plan_capacity

    assert realisable_fraction(128, 64) == pytest.approx(0.5)
    assert block_realisable_fraction([16] * 4, [64] * 4, n_clients=8) == pytest.approx(1 / 16)
    with pytest.raises(CapacityError, match=r"product over blocks of Cover's F\(K\*N_i, D_i\): 0\.0625"):
        plan_capacity([64] * 4, 64, n_clients=8)
