"""Randomised Hadamard rotation of an update before it is quantised (pure numpy, seeded from public randomness).

Why. Stochastic quantisation with a shared scale ``s = M / c`` has per-coordinate error of variance at most
``1/(4s²)`` whatever the value, but any coordinate beyond ``±c`` is clipped (bias). A LoRA update is
spiky: a few coordinates are far larger than the rest, so ``c`` must be large and most coordinates use few of
the ``2M + 1`` levels. A random rotation spreads the energy evenly: for ``y = R x`` with ``R`` orthonormal
and random, every ``y_j`` is about ``‖x‖₂/√B`` in size (B the block length), so a much smaller ``c`` holds
every coordinate and the same bits give a smaller error. This is the rotation of DDGauss (Kairouz, Liu and
Steinke, ICML 2021) and of Chen et al. (2022) for communication-efficient secure aggregation; Suresh et
al. (ICML 2017) show the mean-estimation error drops from ``O(d/M²)`` to ``O(log d/M²)`` per unit norm.

The math. The vector of length ``d`` is zero-padded to ``d' = ⌈d / B⌉·B`` with ``B`` a power of two
(:func:`choose_block`: the longest block with at most 1/64 padding) and each block ``x_b`` of length ``B`` becomes

    y_b = H_B D_b x_b / √B,

``H_B`` the Walsh–Hadamard matrix (entries ±1, ``H_B H_B = B·I``) and ``D_b`` a diagonal of random signs.
``R = H D / √B`` is orthonormal, so ``R⁻¹ = D H / √B`` and ``‖R x‖₂ = ‖x‖₂``: an L2 clipping bound
(e.g. differential privacy's ``C``) holds in the rotated domain too. The transform costs ``O(d' log B)``
(the in-place butterfly, :func:`fwht`).

Seeds. The signs come from *public* randomness (the run's seed and the round): the server must invert the
rotation of the sum, and because ``R`` is linear, ``Σ_i R x_i = R Σ_i x_i``, every client of a round must
use the same ``R``. The rotation hides nothing; it only conditions the values for quantisation.

DP. What the server decodes is ``R⁻¹(Σ q_i / s)``: the quantisation error of one client is at most
``√d'/s`` in L2 (``d'`` coordinates, each off by less than ``1/s``) before the inverse rotation, which
keeps norms, and dropping the ``d' − d`` padding coordinates only shrinks it. So central DP must calibrate
to ``C + √d'/s`` with the *padded* length ``d'`` (:meth:`BlockHadamard.padded_length`).

>>> rot = BlockHadamard(5, seed="demo/round-1")
>>> x = np.array([3.0, 0.0, 0.0, 0.0, -1.0], dtype=np.float32)
>>> y = rot.forward(x)
>>> y.size, bool(np.isclose(np.linalg.norm(y), np.linalg.norm(x)))
(8, True)
>>> np.allclose(rot.inverse(y), x, atol=1e-6)
True
"""

from __future__ import annotations

import hashlib

import numpy as np

from fedguard.checks import int_problem
from fedguard.errors import ConfigError, InvalidUpdateError
from fedguard.rng import SecureRNG

DEFAULT_BLOCK = 1 << 16
"""Longest Hadamard block: rotation mixes within a block; longer blocks spread more but cost ``log B``."""


def fwht(a: np.ndarray) -> np.ndarray:
    """In-place unnormalised fast Walsh–Hadamard transform along the last axis (length a power of two):
    ``a ← a H_B``. Applying it twice multiplies by ``B``."""
    n = a.shape[-1]
    if n & (n - 1):
        raise ConfigError(f"the Hadamard transform needs a power-of-two length, got {n}")
    lead = a.shape[:-1]
    h = 1
    while h < n:
        view = a.reshape(*lead, n // (2 * h), 2, h)
        top = view[..., 0, :].copy()
        view[..., 0, :] += view[..., 1, :]
        view[..., 1, :] *= -1
        view[..., 1, :] += top
        h *= 2
    return a


MAX_PADDING = 1 / 64
"""Padding overhead :func:`choose_block` accepts: at most 1/64 more values travel than the update has."""

MIN_BLOCK = 64
"""Shortest block :func:`choose_block` considers (shorter blocks spread a spike over too few coordinates)."""


def choose_block(dimension: int, max_block: int = DEFAULT_BLOCK) -> int:
    """The block length ``B``: the longest power of two ``<= max_block`` whose padding ``⌈d/B⌉·B − d`` is at
    most ``d/64``; when none is (short vectors), the one with the least padding among the powers of two from
    ``min(64, 2^⌈log2 d⌉)`` up. A SmolLM2 LoRA vector (d = 460,800 = 2^11·225) gets ``B = 8192``
    (1.3% padding) instead of 524,288 values for one block.

    >>> choose_block(460_800), choose_block(5), choose_block(4096)
    (8192, 8, 4096)
    """
    top = min(max_block, 1 << max(0, (dimension - 1).bit_length()))
    low = min(MIN_BLOCK, top)
    candidates = []
    b = top
    while b >= low:
        padded = -(-dimension // b) * b
        if padded - dimension <= dimension * MAX_PADDING:
            return b
        candidates.append((padded, -b))
        b //= 2
    return -min(candidates)[1]


class BlockHadamard:
    """The rotation ``R = blockdiag(H_B D_b) / √B`` for vectors of length ``dimension`` (see the module doc).

    Args:
        dimension: length ``d`` of the vectors to rotate (>= 1).
        seed: the public label the signs are drawn from (e.g. ``"<run seed>/rotation/<round>"``).
        block: the longest block, a power of two (default :data:`DEFAULT_BLOCK`).
    """

    def __init__(self, dimension: int, *, seed: str, block: int = DEFAULT_BLOCK) -> None:
        problems = [p for p in (int_problem("dimension", dimension, low=1), int_problem("block", block, low=1)) if p]
        if not problems and block & (block - 1):
            problems.append(f"block must be a power of two, got {block}")
        if not isinstance(seed, str) or not seed:
            problems.append(f"seed must be a non-empty string (public round randomness), got {seed!r}")
        if problems:
            raise ConfigError.collect(problems)
        self.dimension = int(dimension)
        self.block = choose_block(self.dimension, int(block))
        self.blocks = -(-self.dimension // self.block)
        # public randomness on purpose: every party derives the same signs from the public label
        public = SecureRNG.from_seed(hashlib.sha256(b"fedguard/hadamard-signs/" + seed.encode()).digest())
        bits = public.bytes((self.padded_length + 7) // 8)
        signs = np.unpackbits(np.frombuffer(bits, dtype=np.uint8))[: self.padded_length]
        self._signs = (1.0 - 2.0 * signs.astype(np.float64)).reshape(self.blocks, self.block)

    @property
    def padded_length(self) -> int:
        """``d' = ⌈d/B⌉·B``: the length of a rotated vector (what travels, and what DP's ``√d'/s`` counts)."""
        return self.blocks * self.block

    def forward(self, x: np.ndarray) -> np.ndarray:
        """``R x`` (zero-padded to :attr:`padded_length`), float64 for exactness of the round trip."""
        v = np.asarray(x, dtype=np.float64).reshape(-1)
        if v.size != self.dimension:
            raise InvalidUpdateError(f"rotation is for vectors of length {self.dimension}, got {v.size}")
        padded = np.zeros((self.blocks, self.block), dtype=np.float64)
        padded.reshape(-1)[: self.dimension] = v
        padded *= self._signs
        fwht(padded)
        padded *= 1.0 / np.sqrt(self.block)
        return padded.reshape(-1)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """``R⁻¹ y = D H y / √B``, truncated to the first ``d`` coordinates (float64)."""
        v = np.array(y, dtype=np.float64).reshape(-1)
        if v.size != self.padded_length:
            raise InvalidUpdateError(f"inverse rotation needs length {self.padded_length}, got {v.size}")
        blocks = v.reshape(self.blocks, self.block)
        fwht(blocks)
        blocks *= self._signs / np.sqrt(self.block)
        return blocks.reshape(-1)[: self.dimension]
