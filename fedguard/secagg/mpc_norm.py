"""The L2 norm bound of the MPC aggregator, in the integers the compute parties hold (pure math).

A client's dequantised update is ``Δ = q / s`` (``s = M / clip`` the encoding scale of
:mod:`fedguard.encoding`, ``q`` its quantised vector, ``|q_j| <= M``). Since ``Σ q_j^2`` is an integer,

    ||Δ||_2 <= B   <=>   Σ_j q_j^2 <= T := floor((B·s)^2).

The parties decide the right side **exactly** under MPC in Z_{2^64}, without any intermediate wrapping
and without truncation (CrypTen's probabilistic truncation fails with probability about ``|x| / 2^64``
per value, which is far from negligible for sums of squares near 2^61):

1. squares ``q_j^2`` by a Beaver square (integers, CrypTen ``precision=0``);
2. sums over *chunks* of ``m = floor((2^61 - 1) / M^2)`` coordinates, so each chunk sum ``S_c < 2^61``
   (a local, linear step);
3. a *clamped tree sum*: every value is clamped to ``cap = T + 1`` (``min(x, cap) = b·(x - cap) + cap``
   with the secret bit ``b = [x <= cap]`` from CrypTen's exact comparison), then neighbours are added
   and clamped again, until one value per client remains. Clamping never changes the decision: the
   values are non-negative, so a partial sum above ``T`` means the total is above ``T``, and a clamped
   value ``cap`` keeps it above. Every intermediate stays below ``2^61 + 2^61 = 2^62``;
4. the result ``<= T`` by CrypTen's ``le``: one secret bit per client, the only value revealed about it.

The decision equals the plaintext decision for every input with ``|q_j| <= M``. ``T`` must stay below
``2^60`` (``B·s < 2^30``), checked when the bound is configured.

Assumption (documented limitation): clients encode with fedguard's quantiser, so ``|q_j| <= M``. The
parties do not prove that range per coordinate (an MPC comparison per coordinate); a client that
bypasses the quantiser with elements near 2^32 can wrap a chunk sum modulo 2^64.

>>> check = NormCheck.for_bound(0.5, FixedPointSpec(clip=1.0, value_bits=16), length=8)
>>> check.chunks, check.threshold  # floor(16383.5 ** 2)
(1, 268419072)
>>> big = NormCheck.for_bound(20.0, FixedPointSpec(value_bits=24), length=10**6)
>>> big.chunk, big.chunks, big.levels
(32768, 31, 5)
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from fedguard.encoding import FixedPointSpec
from fedguard.errors import ConfigError

CHUNK_LIMIT_BITS = 61
"""Each exact chunk sum of squares stays below 2^61."""
THRESHOLD_LIMIT_BITS = 60
"""``T < 2^60``: clamped values (``<= T + 1``) and their pairwise sums stay below 2^62."""
MAX_NORM_VALUE_BITS = 31
"""The chunked check needs ``M^2 < 2^61``: value_bits <= 31."""


@dataclass(frozen=True, slots=True)
class NormCheck:
    """The integer form of ``||Δ||_2 <= B`` for updates of ``length`` coordinates (see the module doc).

    Attributes:
        bound: ``B``.
        length: ``n``.
        chunk: ``m``, coordinates per exact chunk sum.
        chunks: ``C = ceil(n / m)``.
        threshold: ``T = floor((B·s)^2)``.
    """

    bound: float
    length: int
    chunk: int
    chunks: int
    threshold: int

    @classmethod
    def for_bound(cls, bound: float, spec: FixedPointSpec, length: int) -> NormCheck:
        problems = []
        if isinstance(bound, bool) or not (isinstance(bound, (int, float)) and np.isfinite(bound) and bound > 0):
            problems.append(f"norm_bound must be a finite float > 0, got {bound!r}")
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            problems.append(f"update length must be an int >= 1, got {length!r}")
        if spec.value_bits > MAX_NORM_VALUE_BITS:
            problems.append(f"the norm check needs value_bits <= {MAX_NORM_VALUE_BITS}, got {spec.value_bits}")
        if problems:
            raise ConfigError.collect(problems)
        threshold = int((Fraction(bound) * Fraction(spec.max_int) / Fraction(spec.clip)) ** 2)  # floor (>= 0)
        if threshold >= 1 << THRESHOLD_LIMIT_BITS:
            raise ConfigError(
                f"norm_bound={bound} is too large for the exact check at value_bits={spec.value_bits}: "
                f"(B·M/clip)^2 = {threshold} must be < 2^{THRESHOLD_LIMIT_BITS} "
                f"(B < {2 ** (THRESHOLD_LIMIT_BITS / 2) / spec.scale:.6g}); lower value_bits or the bound"
            )
        chunk = min(length, ((1 << CHUNK_LIMIT_BITS) - 1) // spec.max_int**2)
        return cls(float(bound), length, chunk, -(-length // chunk), threshold)

    @property
    def cap(self) -> int:
        """The clamp ``T + 1`` of the tree sum."""
        return self.threshold + 1

    @property
    def levels(self) -> int:
        """Clamp-and-add levels after the first clamp: ``ceil(log2(C))``."""
        return max(0, (self.chunks - 1).bit_length())

    def decide(self, q: np.ndarray) -> bool:
        """The exact plaintext decision ``Σ q_j^2 <= T`` (the reference for tests; parties never run it)."""
        values = np.asarray(q, dtype=np.int64).astype(object)
        return bool(sum(values * values) <= self.threshold)

    def decide_like_parties(self, q: np.ndarray) -> bool:
        """The parties' algorithm (chunk sums, clamped tree sum) on plaintext, for tests of its logic."""
        values = np.asarray(q, dtype=np.int64).astype(object)
        padded = list(values * values) + [0] * (self.chunks * self.chunk - self.length)
        level = [min(sum(padded[c * self.chunk : (c + 1) * self.chunk]), self.cap) for c in range(self.chunks)]
        while len(level) > 1:
            if len(level) % 2:
                level.append(0)
            level = [min(level[i] + level[i + 1], self.cap) for i in range(0, len(level), 2)]
        return bool(level[0] <= self.threshold)
