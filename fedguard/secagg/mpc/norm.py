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

**Clipping instead of exclusion** (``clip_halvings = H > 0``). An over-bound update is scaled down by a
factor from a public ladder ``a_j / 2^e`` with ``a_j = round(2^e · 2^(-j/L))``, ``j = 0..J``, ``J = L·H``
(``L = 16`` steps per halving: consecutive factors differ by 2^(1/16) = 4.4% before rounding to integers,
at most 5.3% after it, since ``a_J = 2^(e-H) >= 2^7`` is required). With the public thresholds
``t_j = floor(T·4^e / a_j^2)`` (``t_0 = T``), ``S <= t_j  <=>  a_j^2·S <= T·4^e  <=>  ||(a_j/2^e)·q||^2 <=
T`` exactly (``S`` is an integer). The factor is ``A = a_{j*}`` for the first ``j*`` with ``S <= t_{j*}``:
the largest ladder factor whose clipped update is within the bound, at most one ladder step (<= 5.3%)
below the exact clip ``B/||Δ||``. The parties clamp at ``t_J + 1`` instead of ``T + 1``, compare the clamped ``S`` with all
``J + 1`` thresholds at once (secret bits ``c_j``, monotone in ``j``), and form ``A = Σ_j c_j·(a_j −
a_{j+1})`` (``a_{J+1} = 0``: a telescoping sum, linear in the bits, so local on shares). Only ``c_J`` is
revealed (is the update within ``2^H`` times the bound; if not it is excluded as before); ``A`` stays
secret. The parties then compute ``w·q·A`` with one more exact Beaver product, sum the accepted clients,
reveal ``Z = Σ w_i·A_i·q_i`` (scale ``2^e``) and return ``round(Z / 2^e)`` — a public rounding of the
revealed sum, so the result is exactly :meth:`NormCheck.clipped_sum` of the plaintext inputs, within half
a quantisation step of the real-valued clipped sum. ``e`` (``scale_bits``) is the largest value up to 16
for which ``N·M·W·2^e < 2^62`` (``N`` clients, ``W`` the largest weight), so ``Z`` cannot wrap.

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

from fedguard.checks import int_problem, number_problem
from fedguard.encoding import FixedPointSpec
from fedguard.errors import ConfigError

CHUNK_LIMIT_BITS = 61
"""Each exact chunk sum of squares stays below 2^61."""
THRESHOLD_LIMIT_BITS = 60
"""``T < 2^60``: clamped values (``<= T + 1``) and their pairwise sums stay below 2^62."""
MAX_NORM_VALUE_BITS = 31
"""The chunked check needs ``M^2 < 2^61``: value_bits <= 31."""
CLIP_STEPS_PER_HALVING = 16
"""``L``: ladder factors per halving of the clip factor (consecutive factors differ by about 2^(1/16))."""
MAX_SCALE_BITS = 16
"""``e``: the fixed-point scale of the clip factors (at most 2^16)."""
MIN_SCALE_BITS = 8
MIN_LADDER_BITS = 7
"""The smallest clip factor ``a_J = 2^(e-H)`` is at least ``2^7``, so rounding ``a_j`` to integers moves
each factor by at most 0.4%."""
MAX_LADDER_STEP = 2.0 ** (1 / CLIP_STEPS_PER_HALVING) * (1 + 0.5 / 2**MIN_LADDER_BITS) / (1 - 0.5 / 2**MIN_LADDER_BITS)
"""Bound on ``a_{j-1} / a_j``: 2^(1/16) (4.4%) widened by the rounding of both factors (5.3% in all)."""


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
    clip_halvings: int = 0
    """``H``: 0 excludes over-bound updates; ``H > 0`` clips updates up to ``2^H·B`` and excludes beyond."""
    scale_bits: int = 0
    """``e``: the fixed-point scale of the clip factors (clipping only)."""

    @classmethod
    def for_bound(cls, bound: float, spec: FixedPointSpec, length: int, *, clip_halvings: int = 0,
                  n_clients: int = 1) -> NormCheck:
        problems = [p for p in (
            int_problem("clip_halvings", clip_halvings, low=0, high=16),
            int_problem("n_clients", n_clients, low=1),
            number_problem("norm_bound", bound, low=0.0, low_open=True),
            int_problem("update length", length, low=1),
        ) if p]
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
        scale_bits = 0
        if clip_halvings:
            # Z = Σ w·A·q must stay below 2^62 in magnitude: N·M·W·2^e < 2^62
            headroom = 62 - (n_clients * spec.max_int * spec.max_weight).bit_length()
            scale_bits = min(MAX_SCALE_BITS, headroom)
            if scale_bits < MIN_SCALE_BITS:
                raise ConfigError(
                    f"clipping needs 2^{MIN_SCALE_BITS} of headroom in the ring for its factors: {n_clients} clients x "
                    f"M={spec.max_int} x max_weight={spec.max_weight} leave 2^{headroom}; lower value_bits or max_weight"
                )
        if clip_halvings and scale_bits - clip_halvings < MIN_LADDER_BITS:
            raise ConfigError(
                f"clip_halvings={clip_halvings} needs a factor scale of at least 2^{clip_halvings + MIN_LADDER_BITS} "
                f"(the smallest factor a_J = 2^(e-H) must stay >= 2^{MIN_LADDER_BITS} so that rounding keeps the "
                f"ladder's steps below {100 * (MAX_LADDER_STEP - 1):.1f}%), but {n_clients} clients x M={spec.max_int} "
                f"x max_weight={spec.max_weight} leave e = {scale_bits}: lower clip_halvings, value_bits or max_weight"
            )
        check = cls(float(bound), length, chunk, -(-length // chunk), threshold, clip_halvings, scale_bits)
        if clip_halvings and check.cap >= 1 << THRESHOLD_LIMIT_BITS:
            raise ConfigError(
                f"norm_bound={bound} with clip_halvings={clip_halvings} needs t_J = {check.cap - 1} < "
                f"2^{THRESHOLD_LIMIT_BITS} for the exact check; lower the bound, value_bits or clip_halvings"
            )
        return check

    @property
    def clipping(self) -> bool:
        return self.clip_halvings > 0

    @property
    def factors(self) -> tuple[int, ...]:
        """``a_0 = 2^e > a_1 > ... > a_J``: the clip factors at scale ``2^e`` (clipping only)."""
        if not self.clipping:
            return ()
        steps = CLIP_STEPS_PER_HALVING * self.clip_halvings
        one = 1 << self.scale_bits
        return tuple(round(one * 2.0 ** (-j / CLIP_STEPS_PER_HALVING)) for j in range(steps + 1))

    @property
    def thresholds(self) -> tuple[int, ...]:
        """``t_j = floor(T·4^e / a_j^2)``: ``S <= t_j`` iff the update scaled by ``a_j/2^e`` is within bound."""
        four_e = 1 << (2 * self.scale_bits)
        return tuple((self.threshold * four_e) // (a * a) for a in self.factors)

    @property
    def cap(self) -> int:
        """The clamp of the tree sum: ``T + 1``, or ``t_J + 1`` when clipping."""
        return (self.thresholds[-1] if self.clipping else self.threshold) + 1

    def clip_factor(self, q: np.ndarray) -> int | None:
        """The reference factor ``A`` (scale ``2^e``) for ``q``, or None when ``q`` is excluded."""
        values = np.asarray(q, dtype=np.int64).astype(object)
        total = sum(values * values)
        if not self.clipping:
            return None if total > self.threshold else 1
        for a, t in zip(self.factors, self.thresholds, strict=True):
            if total <= t:
                return a
        return None

    def clipped_sum(self, inputs: list[tuple[np.ndarray, int]], ring_bits: int = 64) -> tuple[np.ndarray, list[int]]:
        """The exact result the parties reveal for ``[(q_i, w_i)]`` (the reference for tests): the vector
        ``round(Σ w_i·A_i·q_i / 2^e)`` over the accepted clients, then ``Σ w_i``, in ``Z_{2^ring_bits}``,
        and the indices of the excluded inputs."""
        total = [0] * self.length
        weight, excluded = 0, []
        for i, (q, w) in enumerate(inputs):
            a = self.clip_factor(q)
            if a is None:
                excluded.append(i)
                continue
            for j, v in enumerate(np.asarray(q, dtype=np.int64).tolist()):
                total[j] += int(w) * a * v
            weight += int(w)
        half = (1 << self.scale_bits) >> 1 if self.clipping else 0
        rounded = [(z + half) >> self.scale_bits for z in total] if self.clipping else total
        mask = (1 << ring_bits) - 1
        return np.array([z & mask for z in rounded] + [weight & mask], dtype=np.uint64), excluded

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
