"""Fixed-point encoding of float updates into the integer ring Z_{2^k} (pure functions).

Secure aggregation works on integers: masks are uniform in a ring, Paillier plaintexts are integers,
and MPC shares live in Z_{2^64}. Every aggregator in fedguard therefore sums the *same* integers, so a
contract test can demand exact equality with the plaintext reference.

The math. With clipping range ``c`` and ``b`` value bits, let ``M = 2^(b-1) - 1`` and ``s = M / c``.
A float ``x`` is clipped to ``[-c, c]`` and mapped to the integer

    q = floor(s·x + u),   u ~ U[0, 1)        (stochastic rounding, E[q] = s·x)

or ``q = round(s·x)`` (nearest). So ``|q| <= M`` and the dequantisation error ``|q/s - x|`` is below
``1/s`` (stochastic) or at most ``1/(2s)`` (nearest) for every ``x`` inside the clipping range.

Weighted FedAvg in the ring. Client ``i`` with integer weight ``w_i`` (its sample count) contributes
the ring vector ``[w_i·q_i (mod 2^k), w_i]``: the weight rides in the last slot, so it is protected
exactly like the update. The sum over clients is ``[Σ w_i q_i, W]`` with ``W = Σ w_i`` and the weighted
mean is ``Σ w_i q_i / (s·W)``. The sum cannot wrap around as long as

    W_max · M  <=  2^(k-1) - 1,

where ``W_max`` bounds the total weight (``n_clients · max_weight``). :meth:`FixedPointSpec.check_capacity`
raises :class:`RingOverflowError` before anything is encoded when that bound fails.

>>> spec = FixedPointSpec(clip=1.0, value_bits=16, ring_bits=32, max_weight=10)
>>> ring = encode_weighted(np.array([0.5, -0.25], dtype=np.float32), 3, spec, rounding="nearest")
>>> mean, total = decode_weighted_mean(ring_sum([ring, ring], spec.ring_bits), spec)
>>> mean.round(4).tolist(), total
([0.5, -0.25], 6)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedguard.checks import int_problem, number_problem
from fedguard.errors import ConfigError, InvalidUpdateError, RingOverflowError
from fedguard.rng import SecureRNG

Rounding = Literal["stochastic", "nearest"]

MAX_VALUE_BITS = 53  # float64 represents every integer up to 2^53 exactly


def _ring_mask(ring_bits: int) -> np.uint64:
    return np.uint64((1 << ring_bits) - 1) if ring_bits < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)


def max_abs_int(value_bits: int) -> int:
    """``M = 2^(b-1) - 1``: the largest magnitude of a quantised value."""
    return (1 << (value_bits - 1)) - 1


def required_ring_bits(value_bits: int, max_total_weight: int) -> int:
    """Smallest ``k`` with ``max_total_weight · M <= 2^(k-1) - 1`` (signed sums never wrap)."""
    if max_total_weight < 1:
        raise ConfigError(f"max_total_weight must be >= 1, got {max_total_weight}")
    return (max_total_weight * max_abs_int(value_bits)).bit_length() + 1


RING_CHOICES: tuple[int, ...] = (32, 64)
"""Ring widths ``ring_bits: auto`` chooses from: word sizes every aggregator handles (the wire carries a ring
element in the smallest unsigned integer type that holds it, :func:`ring_wire_dtype`)."""


def choose_ring_bits(value_bits: int, max_total_weight: int, choices: Sequence[int] = RING_CHOICES) -> int:
    """Ring sized to need: the smallest ``k`` in ``choices`` with ``max_total_weight · M <= 2^(k-1) - 1``,
    ``M = 2^(b-1) - 1`` (:func:`required_ring_bits`), so that a signed sum of that total weight never wraps.

    ``max_total_weight`` is ``n_clients · max_weight``. Raises :class:`RingOverflowError` (naming the bits
    needed) when no choice holds it.

    >>> choose_ring_bits(16, 3 * 300), choose_ring_bits(24, 3 * 300)
    (32, 64)
    """
    need = required_ring_bits(value_bits, max_total_weight)
    for k in sorted(int(c) for c in choices):
        if k >= need:
            return k
    raise RingOverflowError(
        f"a total weight of {max_total_weight} at value_bits={value_bits} needs a ring of {need} bits; the widest "
        f"available is {max(choices)}: lower value_bits or the clients' weights")


def ring_wire_dtype(ring_bits: int) -> np.dtype:
    """The smallest little-endian unsigned type that holds ``Z_{2^k}``: ``<u1``/``<u2``/``<u4``/``<u8`` for
    ``k <= 8/16/32/64``. Ring vectors travel in it, so a 32-bit ring costs 4 bytes per value on the wire."""
    problem = int_problem("ring_bits", ring_bits, low=2, high=64)
    if problem:
        raise ConfigError(problem)
    for width, code in ((8, "u1"), (16, "<u2"), (32, "<u4")):
        if ring_bits <= width:
            return np.dtype(code)
    return np.dtype("<u8")


def to_wire(ring: np.ndarray, ring_bits: int) -> np.ndarray:
    """A ring vector (uint64, elements in ``[0, 2^k)``) in :func:`ring_wire_dtype` (lossless: checked)."""
    r = np.asarray(ring, dtype=np.uint64)
    if ring_bits < 64 and r.size and int(r.max()) >> ring_bits:
        raise InvalidUpdateError(f"ring vector has an element outside Z_2^{ring_bits}")
    return r.astype(ring_wire_dtype(ring_bits))


@dataclass(frozen=True, kw_only=True, slots=True)
class FixedPointSpec:
    """How float updates become ring elements.

    Attributes:
        clip: values are clipped to ``[-clip, clip]`` before quantisation (> 0).
        value_bits: signed bits per quantised value, ``b`` in ``[2, 53]``.
        ring_bits: ``k`` in ``[2, 64]``; arithmetic is modulo ``2^k``.
        max_weight: the largest integer weight (sample count) one client may carry.
    """

    clip: float = 1.0
    value_bits: int = 24
    ring_bits: int = 64
    max_weight: int = 1 << 16

    def __post_init__(self) -> None:
        problems = [p for p in (
            number_problem("clip", self.clip, low=0, low_open=True),
            int_problem("value_bits", self.value_bits, low=2, high=MAX_VALUE_BITS),
            int_problem("ring_bits", self.ring_bits, low=2, high=64),
            int_problem("max_weight", self.max_weight, low=1),
        ) if p]
        if problems:
            raise ConfigError.collect(problems)
        for name in ("value_bits", "ring_bits", "max_weight"):  # numpy ints would overflow in 1 << ring_bits
            object.__setattr__(self, name, int(getattr(self, name)))
        if not isinstance(self.clip, (int, float)):
            object.__setattr__(self, "clip", float(self.clip))
        if required_ring_bits(self.value_bits, self.max_weight) > self.ring_bits:
            raise RingOverflowError(
                f"one client at max_weight={self.max_weight} with value_bits={self.value_bits} needs "
                f"{required_ring_bits(self.value_bits, self.max_weight)} ring bits, got ring_bits={self.ring_bits}"
            )

    @property
    def max_int(self) -> int:
        return max_abs_int(self.value_bits)

    @property
    def scale(self) -> float:
        """``s = M / clip``: integer steps per unit."""
        return self.max_int / self.clip

    def error_bound(self, rounding: Rounding = "stochastic") -> float:
        """Bound on ``|dequantize(quantize(x)) - x|`` for ``x`` inside the clipping range."""
        return (1.0 if rounding == "stochastic" else 0.5) / self.scale

    def clipped(self, x: np.ndarray) -> int:
        """How many entries of ``x`` lie outside ``[-clip, clip]`` (what :func:`quantize` will clip): a too
        small public clip shows here before it silently flattens the update."""
        return int(np.count_nonzero(np.abs(np.asarray(x, dtype=np.float64)) > self.clip))

    def max_clients(self) -> int:
        """How many clients at ``max_weight`` each the ring holds without wrap-around."""
        limit = (1 << (self.ring_bits - 1)) - 1
        return limit // (self.max_weight * self.max_int)

    def check_capacity(self, n_clients: int) -> None:
        """Raise :class:`RingOverflowError` if ``n_clients`` at ``max_weight`` could wrap the ring."""
        if n_clients < 1:
            raise ConfigError(f"n_clients must be >= 1, got {n_clients}")
        if n_clients > self.max_clients():
            need = required_ring_bits(self.value_bits, n_clients * self.max_weight)
            raise RingOverflowError(
                f"{n_clients} clients with max_weight={self.max_weight} and value_bits={self.value_bits} "
                f"need ring_bits >= {need}, got {self.ring_bits} (at most {self.max_clients()} clients fit)"
            )


def coerce_fixed_point(value: object, name: str, problems: list[str]) -> FixedPointSpec | None:
    """A :class:`FixedPointSpec` from a spec, a mapping of its fields (a config section) or None.

    Problems are appended to ``problems`` (named by ``name``) instead of raised, so that a constructor can
    report all of its problems at once; the result is then None.
    """
    if value is None or isinstance(value, FixedPointSpec):
        return value
    if isinstance(value, Mapping):
        try:
            return FixedPointSpec(**value)
        except (TypeError, ConfigError) as err:
            problems.append(f"{name}: {err}")
            return None
    problems.append(f"{name} must be a FixedPointSpec or a mapping, got {type(value).__name__}")
    return None


def quantize(
    x: np.ndarray, spec: FixedPointSpec, *, rng: SecureRNG | None = None, rounding: Rounding = "stochastic"
) -> np.ndarray:
    """Clip to ``[-clip, clip]`` and map to integers in ``[-M, M]`` (int64).

    Stochastic rounding needs an ``rng`` (a fresh :class:`SecureRNG` when none is given): it is unbiased,
    which keeps FedAvg unbiased; nearest rounding is deterministic.
    """
    values = np.array(x, dtype=np.float64)  # a private copy: the steps below work in place
    finite = np.isfinite(values)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise InvalidUpdateError(f"cannot quantise a non-finite value (index {bad}: {values.flat[bad]})")
    y = np.clip(values, -spec.clip, spec.clip, out=values)
    y *= spec.scale
    if rounding == "nearest":
        q = np.rint(y, out=y)
    elif rounding == "stochastic":
        rng = rng if rng is not None else SecureRNG()
        floor = np.floor(y)
        y -= floor  # the fractional part: round up with exactly this probability
        q = floor
        q += rng.uniform01(y.size).reshape(y.shape) < y
    else:
        raise ConfigError(f"rounding must be 'stochastic' or 'nearest', got {rounding!r}")
    return np.clip(q, -spec.max_int, spec.max_int, out=q).astype(np.int64)


def dequantize(q: np.ndarray, spec: FixedPointSpec, *, divisor: float = 1.0) -> np.ndarray:
    """``q / (s · divisor)`` as float32: the inverse of :func:`quantize` for a sum divided by ``divisor``."""
    return (np.asarray(q, dtype=np.float64) / (spec.scale * divisor)).astype(np.float32)


def to_ring(q: np.ndarray, ring_bits: int) -> np.ndarray:
    """Signed integers -> Z_{2^k} as uint64 (two's complement, reduced mod 2^k)."""
    return np.asarray(q, dtype=np.int64).astype(np.uint64) & _ring_mask(ring_bits)


def from_ring(r: np.ndarray, ring_bits: int) -> np.ndarray:
    """Z_{2^k} -> signed integers in ``[-2^(k-1), 2^(k-1))`` (the centred lift), int64."""
    mask = _ring_mask(ring_bits)
    r = np.asarray(r, dtype=np.uint64) & mask
    if ring_bits == 64:
        return r.view(np.int64).copy()
    # Sign-extend in uint64 (setting the bits above k when bit k-1 is set), then reinterpret: this
    # never forms 2^k as an int64 constant, which would overflow for k = 63.
    negative = r >= np.uint64(1 << (ring_bits - 1))
    return np.where(negative, r | ~mask, r).view(np.int64)


def ring_add(a: np.ndarray, b: np.ndarray, ring_bits: int) -> np.ndarray:
    """``a + b mod 2^k`` (uint64 arithmetic wraps modulo 2^64, then the mask reduces further)."""
    return (np.asarray(a, dtype=np.uint64) + np.asarray(b, dtype=np.uint64)) & _ring_mask(ring_bits)


def ring_sub(a: np.ndarray, b: np.ndarray, ring_bits: int) -> np.ndarray:
    """``a - b mod 2^k``."""
    return (np.asarray(a, dtype=np.uint64) - np.asarray(b, dtype=np.uint64)) & _ring_mask(ring_bits)


def ring_sum(vectors: Sequence[np.ndarray], ring_bits: int) -> np.ndarray:
    """Sum of ring vectors mod ``2^k``."""
    if not vectors:
        raise ConfigError("ring_sum needs at least one vector")
    total = np.zeros_like(np.asarray(vectors[0], dtype=np.uint64))
    for v in vectors:
        total += np.asarray(v, dtype=np.uint64)
    return total & _ring_mask(ring_bits)


def encode_weighted(
    vector: np.ndarray,
    weight: int,
    spec: FixedPointSpec,
    *,
    rng: SecureRNG | None = None,
    rounding: Rounding = "stochastic",
) -> np.ndarray:
    """One client's ring input ``[w·q (mod 2^k), w]`` (length ``len(vector) + 1``, uint64)."""
    problem = int_problem("weight", weight, low=1, high=spec.max_weight)
    if problem:
        raise InvalidUpdateError(problem)
    q = quantize(vector, spec, rng=rng, rounding=rounding).reshape(-1)
    out = np.empty(q.size + 1, dtype=np.uint64)
    out[:-1] = to_ring(q * np.int64(weight), spec.ring_bits)
    out[-1] = np.uint64(int(weight))
    return out


def decode_weighted_mean(ring_total: np.ndarray, spec: FixedPointSpec) -> tuple[np.ndarray, int]:
    """From ``[Σ w_i q_i, W]`` to the weighted mean update (float32) and the total weight ``W``."""
    signed = from_ring(ring_total, spec.ring_bits)
    total_weight = int(signed[-1])
    if total_weight < 1:
        raise RingOverflowError(f"decoded total weight must be >= 1, got {total_weight} (ring wrapped?)")
    return dequantize(signed[:-1], spec, divisor=total_weight), total_weight
