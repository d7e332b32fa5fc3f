"""How a round's updates travel: the ring sized to need, quantised uploads, and the optional rotation.

An :class:`UploadPlan` is the public, per-run agreement of every party on the fixed-point encoding of the
updates (:class:`~fedguard.encoding.FixedPointSpec`) and on what happens to an update before it is
encoded and to the decoded mean after it (:meth:`UploadPlan.forward`, :meth:`UploadPlan.inverse`).

**Ring sized to need** (``ring_bits="auto"``). Client ``i`` sends ``[w_i·q_i, w_i]`` with ``|q_i| <= M =
2^(b-1) - 1`` and ``1 <= w_i <= max_weight``; the sum of ``n`` clients never wraps ``Z_{2^k}`` iff
``n·max_weight·M <= 2^(k-1) - 1`` (:mod:`fedguard.encoding`). :func:`plan_upload` picks the smallest ``k`` in
:data:`~fedguard.encoding.RING_CHOICES` (32, 64) that holds it; a fixed ``ring_bits`` that would overflow is
refused with :class:`~fedguard.errors.RingOverflowError` naming the bits needed. Ring vectors travel in the
smallest unsigned type holding ``Z_{2^k}`` (:func:`~fedguard.encoding.ring_wire_dtype`), so a 32-bit ring
costs 4 bytes per value, as fp32 does. Every aggregator sums in ``Z_{2^k}`` exactly, so the aggregate is
the plaintext one bit for bit.

**Quantised uploads** (``upload_bits=b_u``, e.g. 8 or 16). The ring is exactly ``b_u`` bits wide, so each
value costs ``b_u/8`` bytes (¼ of fp32 at 8 bits). For the sum of ``n`` clients to fit, every client carries
weight 1 (equal-weight FedAvg: the mean is ``Σ_i Δ_i / n``; differential privacy's clipping already sets
weight 1) and the value bits are the most that fit: the largest ``b`` with ``n·(2^(b-1) - 1) <= 2^(b_u-1) -
1`` (8-bit uploads and 3 clients: ``b = 6``, ``M = 31``). The scale ``s = M/c`` is shared and public (``c`` is
the run's ``clip``): per-client scales would make the ring sum meaningless. Stochastic rounding keeps each
client's decoded update unbiased, ``E[q/s] = x`` for ``|x| <= c`` (:func:`fedguard.encoding.quantize`).

**Rotation** (``rotation=True``). Before quantisation each update is rotated by the randomised Hadamard
transform of the round, ``y = R_r x`` (:class:`~fedguard.rotation.BlockHadamard`, signs from the public label
``"<seed>/round-<r>"``), which spreads a spiky update evenly over its coordinates, so the shared range ``c``
clips less and the same bits give a smaller error; the server decodes ``Σ y_i`` exactly and applies
``R_r⁻¹`` (linear, so ``R_r⁻¹ Σ_i R_r x_i = Σ_i x_i``). The update then travels as ``d' >= d`` values
(``d'`` the padded length, at most 1/64 more).

**DP.** Central DP calibrates its noise to ``C + √d'/s`` for ``d'`` coordinates, each stochastically rounded
by less than ``1/s`` (:meth:`fedguard.dp.ClientLevelDP.calibrate_to_encoding`); both clipping a coordinate
to ``±c`` and the orthonormal rotation keep an L2 bound. The trainer therefore reports
:attr:`UploadPlan.dp_dimension` — the number of coordinates that are rounded, the padded length with
rotation (counting DP's adaptive-clipping coordinate too, conservatively) — as the dimension.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fedguard.checks import int_problem
from fedguard.encoding import (
    MAX_VALUE_BITS,
    RING_CHOICES,
    FixedPointSpec,
    choose_ring_bits,
    max_abs_int,
    required_ring_bits,
)
from fedguard.errors import ConfigError, InvalidUpdateError, RingOverflowError
from fedguard.rotation import DEFAULT_BLOCK, BlockHadamard, choose_block
from fedguard.updates import ClientUpdate

RingBits = int | Literal["auto"]

UPLOAD_BITS = (8, 16, 32)
"""Quantised upload widths: the ring is this wide, and so is every value on the wire."""


def padded_length(dimension: int, max_block: int = DEFAULT_BLOCK) -> int:
    """Length of a rotated vector of length ``dimension``: ``⌈d/B⌉·B`` with ``B`` from :func:`choose_block`."""
    b = choose_block(dimension, max_block)
    return -(-dimension // b) * b


def upload_value_bits(upload_bits: int, n_clients: int) -> int:
    """The most value bits ``b`` with ``n·(2^(b-1) - 1) <= 2^(k-1) - 1`` for a ``k = upload_bits`` ring and
    weight 1 per client. Raises :class:`RingOverflowError` when not even ``b = 2`` (M = 1) fits.

    >>> upload_value_bits(8, 3), upload_value_bits(16, 3), upload_value_bits(32, 3)
    (6, 14, 30)
    """
    limit = (1 << (upload_bits - 1)) - 1
    best = 0
    for b in range(2, MAX_VALUE_BITS + 1):
        if n_clients * max_abs_int(b) <= limit:
            best = b
    if best < 2:
        raise RingOverflowError(f"{n_clients} clients do not fit a {upload_bits}-bit upload even at 2 value bits "
                                f"(each value in [-1, 1]): use wider upload_bits")
    return best


@dataclass(frozen=True, slots=True)
class UploadPlan:
    """The public encoding of a run's updates (see the module doc).

    Attributes:
        spec: the fixed-point encoding every ring input obeys (its ``ring_bits`` is the round's ring).
        dimension: the update length ``d``.
        rotation: whether updates are rotated (randomised Hadamard) before quantisation.
        seed: the public label each round's rotation is derived from.
        equal_weights: every client carries weight 1 (quantised uploads).
    """

    spec: FixedPointSpec
    dimension: int
    rotation: bool = False
    seed: str = "0"
    equal_weights: bool = False
    block: int = DEFAULT_BLOCK
    _rotations: dict[tuple[int, int], BlockHadamard] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        problem = int_problem("dimension", self.dimension, low=1)
        if problem:
            raise ConfigError(problem)
        if not isinstance(self.spec, FixedPointSpec):
            raise ConfigError(f"spec must be a FixedPointSpec, got {type(self.spec).__name__}")

    def rotation_for(self, round_id: int, length: int | None = None) -> BlockHadamard:
        """Round ``round_id``'s rotation of vectors of ``length`` (default ``d``); signs from the public label
        ``"<seed>/round-<r>/<length>"``. Rotations of the latest round are kept."""
        length = self.dimension if length is None else int(length)
        key = (int(round_id), length)
        if key not in self._rotations:
            for old in [k for k in self._rotations if k[0] != round_id]:
                del self._rotations[old]
            self._rotations[key] = BlockHadamard(length, seed=f"{self.seed}/round-{round_id}/{length}", block=self.block)
        return self._rotations[key]

    @property
    def travelling_length(self) -> int:
        """Values per update on the wire (``d``, or the padded ``d'`` with rotation); the ring vector adds the
        weight slot."""
        return padded_length(self.dimension, self.block) if self.rotation else self.dimension

    @property
    def dp_dimension(self) -> int:
        """The coordinates that are stochastically rounded, for central DP's ``√d'/s``: ``d`` without rotation;
        with rotation the padded length of ``d + 1`` (DP's adaptive clipping appends a count coordinate, which is
        rotated too; DP adds that one to whatever it is told, so this over-counts by at most one: conservative)."""
        if not self.rotation:
            return self.dimension
        return padded_length(self.dimension + 1, self.block)

    @property
    def bytes_per_value(self) -> float:
        """Ring bytes per update value on the wire (protocol framing aside)."""
        from fedguard.encoding import ring_wire_dtype

        return ring_wire_dtype(self.spec.ring_bits).itemsize * self.travelling_length / self.dimension

    def forward(self, update: ClientUpdate) -> ClientUpdate:
        """What client ``update`` sends into the encoding: rotated (float32) with rotation, weight 1 with
        equal weights. Any length is rotated (e.g. DP's adaptive clipping appends a count coordinate)."""
        vector, weight = update.vector, update.weight
        if self.rotation:
            vector = self.rotation_for(update.round, vector.size).forward(vector).astype(np.float32)
        if self.equal_weights:
            weight = 1
        if vector is update.vector and weight == update.weight:
            return update
        return ClientUpdate(update.client_id, update.round, vector, weight)

    def inverse(self, mean: np.ndarray, round_id: int) -> np.ndarray:
        """The decoded mean in the update's coordinates (float32): ``R_r⁻¹ mean`` with rotation, by the
        round's rotation whose padded length is ``mean``'s (the one :meth:`forward` used)."""
        if not self.rotation:
            return mean
        for (r, _), rotation in self._rotations.items():
            if r == round_id and rotation.padded_length == mean.size:
                return rotation.inverse(mean).astype(np.float32)
        for length in (self.dimension, self.dimension + 1):  # the update, or DP's update + count coordinate
            if padded_length(length, self.block) == mean.size:
                return self.rotation_for(round_id, length).inverse(mean).astype(np.float32)
        raise InvalidUpdateError(f"round {round_id}: no rotation of this round produced a vector of length {mean.size}")


def plan_upload(
    *,
    clip: float,
    value_bits: int,
    n_clients: int,
    max_weight: int,
    dimension: int,
    ring_bits: RingBits = "auto",
    upload_bits: int | None = None,
    rotation: bool = False,
    seed: str = "0",
) -> UploadPlan:
    """The run's :class:`UploadPlan` (see the module doc for the rules).

    Raises :class:`ConfigError` for contradictory choices and :class:`RingOverflowError` when a fixed
    ``ring_bits`` (or an ``upload_bits``) cannot hold the sum of ``n_clients`` clients.

    >>> plan_upload(clip=1.0, value_bits=16, n_clients=3, max_weight=300, dimension=10).spec.ring_bits
    32
    >>> plan_upload(clip=1.0, value_bits=24, n_clients=3, max_weight=300, dimension=10).spec.ring_bits
    64
    >>> p = plan_upload(clip=0.01, value_bits=24, n_clients=3, max_weight=300, dimension=10, upload_bits=8)
    >>> p.spec.ring_bits, p.spec.value_bits, p.spec.max_weight, p.equal_weights
    (8, 6, 1, True)
    """
    problems = [p for p in (int_problem("n_clients", n_clients, low=1), int_problem("max_weight", max_weight, low=1),
                            int_problem("dimension", dimension, low=1)) if p]
    if ring_bits != "auto" and int_problem("ring_bits", ring_bits, low=2, high=64):
        problems.append(f"ring_bits must be 'auto' or an int in [2, 64], got {ring_bits!r}")
    if upload_bits is not None and upload_bits not in UPLOAD_BITS:
        problems.append(f"upload_bits must be one of {UPLOAD_BITS} or None, got {upload_bits!r}")
    if upload_bits is not None and ring_bits not in ("auto", upload_bits):
        problems.append(f"upload_bits={upload_bits} fixes the ring at {upload_bits} bits; ring_bits={ring_bits} "
                        f"contradicts it (leave ring_bits: auto)")
    if not isinstance(rotation, bool):
        problems.append(f"rotation must be true or false, got {rotation!r}")
    if problems:
        raise ConfigError.collect(problems)
    if upload_bits is not None:
        bits = upload_value_bits(upload_bits, n_clients)
        spec = FixedPointSpec(clip=clip, value_bits=bits, ring_bits=upload_bits, max_weight=1)
        spec.check_capacity(n_clients)
        return UploadPlan(spec, dimension, rotation=rotation, seed=seed, equal_weights=True)
    total = n_clients * max_weight
    if ring_bits == "auto":
        k = choose_ring_bits(value_bits, total, RING_CHOICES)
    else:
        k = int(ring_bits)
        need = required_ring_bits(value_bits, total)
        if need > k:
            raise RingOverflowError(
                f"ring_bits={k} would overflow: {n_clients} clients x max_weight {max_weight} x 2^{value_bits - 1} "
                f"need a {need}-bit ring; use ring_bits: auto, a wider ring, or fewer value_bits")
    spec = FixedPointSpec(clip=clip, value_bits=value_bits, ring_bits=k, max_weight=max_weight)
    spec.check_capacity(n_clients)
    return UploadPlan(spec, dimension, rotation=rotation, seed=seed)
