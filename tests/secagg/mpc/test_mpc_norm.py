"""The integer form of the norm bound (pure math, no processes): the parties' algorithm decides exactly
like the plaintext norm, and configuration limits are enforced."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedguard.encoding import FixedPointSpec
from fedguard.errors import ConfigError
from fedguard.secagg.mpc.norm import MAX_LADDER_STEP, NormCheck


def test_threshold_is_the_floor_of_the_exact_rational_bound() -> None:
    spec = FixedPointSpec(clip=0.1, value_bits=12, max_weight=4)
    check = NormCheck.for_bound(0.3, spec, 10)
    # B·s = 0.3 · 2047 / 0.1 (as the float values 0.3 and 0.1 really are)
    from fractions import Fraction
    assert check.threshold == math.floor((Fraction(0.3) * 2047 / Fraction(0.1)) ** 2)


@settings(max_examples=200, deadline=None)
@given(
    value_bits=st.integers(16, 31),
    length=st.integers(1, 5000),
    bound_fraction=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**32 - 1),
    scale=st.floats(0.0, 1.0),
)
def test_chunked_clamped_sum_decides_like_the_plain_norm(value_bits: int, length: int, bound_fraction: float,
                                                          seed: int, scale: float) -> None:
    spec = FixedPointSpec(clip=1.0, value_bits=value_bits, max_weight=1)
    max_bound = 2**29 / spec.scale  # keeps T < 2^60
    check = NormCheck.for_bound(max(bound_fraction * max_bound, 1e-3), spec, length)
    rng = np.random.default_rng(seed)
    q = (rng.integers(-spec.max_int, spec.max_int + 1, length) * scale).astype(np.int64)
    assert check.decide_like_parties(q) == check.decide(q)


def _with_sum_of_squares(target: int, length: int, limit: int) -> np.ndarray:
    q = np.zeros(length, dtype=np.int64)
    for j in range(length):
        q[j] = min(math.isqrt(target), limit)
        target -= int(q[j]) ** 2
    assert target == 0
    return q


@pytest.mark.parametrize("offset, accepted", [(0, True), (1, False), (-1, True)])
def test_clamped_sum_is_exact_at_the_boundary_with_many_chunks(offset: int, accepted: bool) -> None:
    spec = FixedPointSpec(clip=1.0, value_bits=31, max_weight=1)
    check = NormCheck.for_bound(2**29 / spec.scale, spec, 100)
    assert check.chunks == 50 and check.levels == 6  # M^2 ~ 2^60: two coordinates per chunk
    q = _with_sum_of_squares(check.threshold + offset, 100, spec.max_int)
    q = np.random.default_rng(7).permutation(q)  # spread over the chunks
    assert check.decide(q) is accepted
    assert check.decide_like_parties(q) is accepted


def test_bounds_the_exact_check_cannot_hold_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="norm_bound=200.0 is too large"):
        NormCheck.for_bound(200.0, FixedPointSpec(value_bits=24), 10)
    with pytest.raises(ConfigError, match="value_bits <= 31, got 40"):
        NormCheck.for_bound(1.0, FixedPointSpec(value_bits=40, max_weight=4), 10)
    with pytest.raises(ConfigError, match="norm_bound must be a finite number > 0.0, got nan"):
        NormCheck.for_bound(float("nan"), FixedPointSpec(), 10)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(4, 20),
    st.integers(1, 30),
    st.floats(0.01, 8.0),
    st.integers(1, 4),
    st.integers(0, 2**32 - 1),
)
def test_the_clip_ladder_picks_the_largest_factor_within_the_bound(value_bits: int, length: int, scale: float,
                                                                  halvings: int, seed: int) -> None:
    spec = FixedPointSpec(clip=1.0, value_bits=value_bits, max_weight=50)
    check = NormCheck.for_bound(0.3, spec, length, clip_halvings=halvings, n_clients=3)
    rng = np.random.default_rng(seed)
    q = np.clip(np.round(rng.standard_normal(length) * scale * 0.3 / math.sqrt(length) * spec.scale),
                -spec.max_int, spec.max_int).astype(np.int64)
    total = int(sum(int(v) * int(v) for v in q))
    one = 1 << check.scale_bits
    factor = check.clip_factor(q)
    assert check.factors[0] == one and list(check.factors) == sorted(check.factors, reverse=True)
    assert all(a / b <= MAX_LADDER_STEP for a, b in zip(check.factors, check.factors[1:]))
    assert check.thresholds[0] == check.threshold
    if factor is None:  # more than 2^H times over: excluded
        assert total * check.factors[-1] ** 2 > check.threshold * one * one
    else:
        assert total * factor**2 <= check.threshold * one * one  # the clipped update is within the bound, exactly
        j = check.factors.index(factor)
        if j > 0:  # and the next larger factor would not be
            assert total * check.factors[j - 1] ** 2 > check.threshold * one * one


def test_clipped_sum_without_over_bound_clients_is_the_exclusion_sum() -> None:
    spec = FixedPointSpec(clip=1.0, value_bits=12, max_weight=20)
    exclude = NormCheck.for_bound(1.0, spec, 6)
    clip = NormCheck.for_bound(1.0, spec, 6, clip_halvings=3, n_clients=2)
    inputs = [(np.array([3, -4, 0, 1, 2, -2]), 5), (np.array([-7, 0, 9, 1, 1, 0]), 3)]
    assert np.array_equal(clip.clipped_sum(inputs)[0], exclude.clipped_sum(inputs)[0])
    with pytest.raises(ConfigError, match="headroom"):
        NormCheck.for_bound(1.0, FixedPointSpec(value_bits=31, max_weight=1 << 20), 6, clip_halvings=2, n_clients=64)
    with pytest.raises(ConfigError, match="clip_halvings must be an int in"):
        NormCheck.for_bound(1.0, spec, 6, clip_halvings=-1)
    # the reviewer's case: 256 clients leave e = 8, so 9 halvings would round the smallest factors to 0
    wide = FixedPointSpec(value_bits=31, max_weight=65536)
    with pytest.raises(ConfigError, match=r"smallest factor a_J = 2\^\(e-H\) must stay >= 2\^7"):
        NormCheck.for_bound(1e-6, wide, 6, clip_halvings=9, n_clients=2)
