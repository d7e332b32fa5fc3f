"""Distributed noise in the integer ring: the distributed discrete Gaussian (Kairouz, Liu, Steinke 2021).

With secure aggregation the server sees only the ring sum of the clients' inputs, so no party ever holds
an unnoised aggregate if *each client* adds its share of the noise to its own integer vector before
masking. Client ``i`` sends ``q_i + ξ_i (mod 2^k)`` with ``ξ_i ~ N_Z(0, s^2)^d`` i.i.d. discrete Gaussian:

    P[ξ = x] ∝ exp(-x² / (2 s²)),   x ∈ Z.

The released sum is ``Σ q_i + Σ ξ_i``. A sum of discrete Gaussians is not exactly a discrete Gaussian, but
it is very close once ``s >= 1`` and its Rényi DP is bounded by Kairouz et al. (arXiv:2102.06387,
Proposition 14); see :class:`~fedguard.dp.events.DistributedDiscreteGaussianEvent`.

Sensitivity in integer units. A client's clipped float vector ``x`` (``‖x‖₂ <= C``) is scaled by
``s_fp = M / c`` (:class:`~fedguard.encoding.FixedPointSpec`) and stochastically rounded, which moves each
coordinate by less than 1, so deterministically

    Δ2 = ‖q‖₂ <= s_fp·C + √d,     Δ1 <= min(Δ2², √d·Δ2)    (|v| <= v² on integers).

No conditional re-rounding is needed. Coordinates clipped by the encoding only shrink the norm.

Dropped clients. The noise in the sum is that of the clients who *survived the input stage*. We
pre-plan for ``min_survivors`` (each client adds ``s = z·Δ2/√min_survivors``, so ``min_survivors`` honest
contributions give noise multiplier ``z``), and the accountant records the event with the **actual**
number of survivors (more survivors: more noise, less epsilon). The aggregator's threshold must be at
least ``min_survivors`` so that a round with fewer survivors aborts before any sum is revealed;
``colluding`` clients assumed to share their noise with the server are subtracted from the count.

Quantised uploads (``federation.upload_bits``, optionally with the Hadamard rotation; DDGauss, Kairouz et
al. 2021, §4). The noise is added in the upload's ring ``Z_{2^k}`` (``k`` = 8, 16 or 32) at the upload's
public scale ``s = M/c`` (``c`` the run's shared clip): each client sends ``q_i + ξ_i mod 2^k`` for its
rotated (``y = R_r x``, orthonormal, so ``‖y‖₂ = ‖x‖₂ <= C``), clipped and stochastically rounded update of
``d'`` coordinates (the padded length with rotation). The sensitivity is the bound above with the upload's
``s`` and ``d'``: ``Δ2 <= min(s·C, M·√d') + √d'`` (clipping a coordinate to ``±c`` only shrinks the norm),
and the accountant records that ``Δ2``. The noise needs room in the ring: :func:`upload_spec_with_noise`
keeps the ring and ``c`` and lowers the value bits ``b`` (``M = 2^(b-1) - 1``) until ``n·M`` plus the noise's
tail fits ``2^(k-1) - 1`` (:meth:`DistributedDiscreteGaussian.check_headroom`); the noise std itself is at
least ``z·√d'/√min_survivors`` integer units, so a narrow ring cannot carry a long vector's noise at all
(8 bits and ``d'`` in the thousands: refused, naming the bits needed).

Sampling. Two samplers of ``N_Z(0, s²)``, both by Canonne, Kamath & Steinke (NeurIPS 2020, Algorithm 3:
discrete Laplace proposal with ``t = ⌊s⌋ + 1``, accepted with probability
``exp(-(|Y| - s²/t)² / (2 s²))``), both drawing only from :class:`~fedguard.rng.SecureRNG`:

* :func:`sample_discrete_gaussian_exact` — integer and rational arithmetic only (Bernoulli(exp(-γ)) by
  the von Neumann-style series of CKS Algorithm 1), an *exact* sampler; about 10^4 draws/s.
* :func:`sample_discrete_gaussian` — the same algorithm vectorised in float64: the geometric variates of
  the discrete Laplace proposal come from inverse CDFs and the acceptance test compares a 53-bit uniform
  with ``exp(·)``; every probability is exact up to float64 rounding (relative error ~2^-52). This is the
  default for model-sized vectors; use the exact sampler where that caveat matters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from fedguard.checks import check_number, int_problem, is_int, number_problem
from fedguard.dp.events import DistributedDiscreteGaussianEvent, _store_plain
from fedguard.encoding import FixedPointSpec, encode_weighted, ring_add, to_ring
from fedguard.errors import ConfigError, RingOverflowError
from fedguard.rng import SecureRNG

# --------------------------------------------------------------------------------------------------
# exact sampler (CKS 2020, Algorithms 1-3), rational arithmetic and SecureRNG.randbelow only
# --------------------------------------------------------------------------------------------------


def _bernoulli(p: Fraction, rng: SecureRNG) -> bool:
    """Bernoulli(p) for a rational ``p`` in [0, 1], exactly."""
    return rng.randbelow(p.denominator) < p.numerator


def _bernoulli_exp_small(gamma: Fraction, rng: SecureRNG) -> bool:
    """Bernoulli(exp(-γ)) for rational ``0 <= γ <= 1`` (CKS Algorithm 1, first case)."""
    k = 1
    while _bernoulli(gamma / k, rng):
        k += 1
    return k % 2 == 1


def _bernoulli_exp(gamma: Fraction, rng: SecureRNG) -> bool:
    """Bernoulli(exp(-γ)) for any rational ``γ >= 0`` (CKS Algorithm 1)."""
    while gamma > 1:
        if not _bernoulli_exp_small(Fraction(1), rng):
            return False
        gamma -= 1
    return _bernoulli_exp_small(gamma, rng)


def _discrete_laplace_exact(t: int, rng: SecureRNG) -> int:
    """``P[Y = y] ∝ exp(-|y|/t)`` for an integer scale ``t >= 1`` (CKS Algorithm 2 with s = 1)."""
    while True:
        u = rng.randbelow(t)
        if not _bernoulli_exp(Fraction(u, t), rng):
            continue
        v = 0
        while _bernoulli_exp(Fraction(1), rng):
            v += 1
        x = u + t * v
        negative = rng.randbelow(2) == 1
        if negative and x == 0:
            continue
        return -x if negative else x


def sample_discrete_gaussian_exact(n: int, sigma: float, rng: SecureRNG) -> np.ndarray:
    """``n`` exact draws from ``N_Z(0, sigma²)`` (CKS Algorithm 3; ``sigma²`` taken as the exact rational
    value of the float ``sigma**2``). int64 array."""
    _check_sigma(sigma)
    sigma2 = Fraction(float(sigma) ** 2)
    t = math.floor(sigma) + 1
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        while True:
            y = _discrete_laplace_exact(t, rng)
            gamma = (abs(y) - sigma2 / t) ** 2 / (2 * sigma2)
            if _bernoulli_exp(gamma, rng):
                out[i] = y
                break
    return out


# --------------------------------------------------------------------------------------------------
# vectorised sampler (same algorithm, float64 probabilities)
# --------------------------------------------------------------------------------------------------


def _geometric(n: int, t: float, rng: SecureRNG) -> np.ndarray:
    """``P[G = k] = (1 - p) p^k`` with ``p = exp(-1/t)``, by inversion: ``G = ⌊-t·ln U⌋``, U in (0, 1]."""
    u = 1.0 - rng.uniform01(n)
    return np.floor(-t * np.log(u)).astype(np.int64)


def sample_discrete_gaussian(n: int, sigma: float, rng: SecureRNG) -> np.ndarray:
    """``n`` draws from ``N_Z(0, sigma²)`` (CKS Algorithm 3 vectorised; float64 caveat in the module doc).

    The proposal ``Y = G1 - G2`` (two i.i.d. geometrics) is discrete Laplace with scale ``t``; each is
    accepted with probability ``exp(-(|Y| - σ²/t)² / (2σ²))`` (acceptance rate >= ~0.6 for σ >= 1).
    """
    _check_sigma(sigma)
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    sigma = float(sigma)
    t = math.floor(sigma) + 1.0
    out = np.empty(n, dtype=np.int64)
    filled = 0
    while filled < n:
        need = n - filled
        m = int(need * 1.8) + 16
        y = _geometric(m, t, rng) - _geometric(m, t, rng)
        accept_p = np.exp(-((np.abs(y) - sigma * sigma / t) ** 2) / (2.0 * sigma * sigma))
        keep = y[rng.uniform01(m) < accept_p][:need]
        out[filled : filled + keep.size] = keep
        filled += keep.size
    return out


def discrete_gaussian_pmf(values: np.ndarray, sigma: float) -> np.ndarray:
    """``P[X = x]`` of ``N_Z(0, σ²)`` at integer ``values`` (normaliser summed over ±(12σ + 20))."""
    _check_sigma(sigma)
    support = np.arange(-math.ceil(12 * sigma + 20), math.ceil(12 * sigma + 20) + 1, dtype=np.float64)
    norm = np.exp(-(support**2) / (2 * sigma * sigma)).sum()
    v = np.asarray(values, dtype=np.float64)
    return np.exp(-(v**2) / (2 * sigma * sigma)) / norm


def _check_sigma(sigma: float) -> None:
    check_number("sigma", sigma, low=0, low_open=True)


# --------------------------------------------------------------------------------------------------
# the mechanism: per-client noise in Z_{2^k} and its accounting
# --------------------------------------------------------------------------------------------------


def integer_sensitivity(spec: FixedPointSpec, clip_norm: float, dimension: int) -> tuple[float, float]:
    """``(Δ2, Δ1)`` of one client's quantised vector (see the module doc)."""
    check_number("clip_norm", clip_norm, low=0, low_open=True)
    if dimension < 1:
        raise ConfigError(f"dimension must be >= 1, got {dimension}")
    l2 = min(spec.scale * clip_norm, spec.max_int * math.sqrt(dimension)) + math.sqrt(dimension)
    l1 = min(l2 * l2, math.sqrt(dimension) * l2)
    return l2, l1


@dataclass(frozen=True, slots=True)
class DistributedDiscreteGaussian:
    """Per-client discrete-Gaussian noise so that ``min_survivors`` clients give noise multiplier ``z``.

    Attributes:
        noise_multiplier: ``z``, the target ratio of total noise std to the L2 sensitivity.
        clip_norm: ``C``, the L2 bound of each client's float vector.
        dimension: ``d``, the length of the noised float vector.
        spec: the fixed-point encoding of the round.
        min_survivors: the fewest clients whose noise the round is planned for.
        colluding: clients assumed to reveal their own noise to the server (subtracted when accounting).
        exact: use the exact rational sampler (slow) instead of the float64-vectorised one.
    """

    noise_multiplier: float
    clip_norm: float
    dimension: int
    spec: FixedPointSpec
    min_survivors: int
    colluding: int = 0
    exact: bool = False

    def __post_init__(self) -> None:
        problems = [p for p in (
            number_problem("noise_multiplier", self.noise_multiplier, low=0, low_open=True),
            number_problem("clip_norm", self.clip_norm, low=0, low_open=True),
            int_problem("dimension", self.dimension, low=1),
            int_problem("min_survivors", self.min_survivors, low=1),
            int_problem("colluding", self.colluding, low=0),
        ) if p]
        if (is_int(self.colluding) and self.colluding >= 0 and is_int(self.min_survivors)
                and self.colluding >= self.min_survivors):
            problems.append(f"colluding must be < min_survivors={self.min_survivors}, got {self.colluding}")
        if problems:
            raise ConfigError.collect(problems)
        _store_plain(self, "noise_multiplier", "clip_norm", "dimension", "min_survivors", "colluding")
        if self.local_stddev < 1.0:
            raise ConfigError(
                f"per-client discrete Gaussian scale {self.local_stddev:.3g} < 1 integer unit: raise value_bits "
                f"(got {self.spec.value_bits}) so that noise is not below the quantisation step"
            )

    @property
    def sensitivity(self) -> tuple[float, float]:
        return integer_sensitivity(self.spec, self.clip_norm, self.dimension)

    @property
    def local_stddev(self) -> float:
        """``s = z·Δ2 / √(min_survivors - colluding)`` in integer units."""
        return self.noise_multiplier * self.sensitivity[0] / math.sqrt(self.min_survivors - self.colluding)

    def event(self, n_survivors: int) -> DistributedDiscreteGaussianEvent:
        """The release when ``n_survivors`` clients' noise is in the sum (``colluding`` of them known)."""
        honest = n_survivors - self.colluding
        if honest < 1:
            raise ConfigError(f"n_survivors must exceed colluding={self.colluding}, got {n_survivors}")
        l2, l1 = self.sensitivity
        return DistributedDiscreteGaussianEvent(self.local_stddev, honest, l2, l1, self.dimension)

    def check_headroom(self, n_clients: int, *, failure_log2: float = -40.0) -> None:
        """Raise :class:`RingOverflowError` unless the noised sum of ``n_clients`` fits the signed ring with
        probability ``>= 1 - 2^failure_log2`` (discrete Gaussians are sub-Gaussian with the same scale:
        ``P[|X| > t] <= 2 exp(-t²/(2σ²))``, union bound over the ``d`` coordinates)."""
        total_sd = self.local_stddev * math.sqrt(n_clients)
        tail = math.sqrt(2.0 * (math.log(2.0 * self.dimension) - failure_log2 * math.log(2.0)))
        need = n_clients * self.spec.max_int + tail * total_sd
        limit = 2.0 ** (self.spec.ring_bits - 1) - 1
        if need > limit:
            raise RingOverflowError(
                f"{n_clients} clients' values (<= {n_clients * self.spec.max_int}) plus noise "
                f"({tail:.1f} x {total_sd:.3g}) need {math.ceil(math.log2(need)) + 1} ring bits, got "
                f"ring_bits={self.spec.ring_bits}"
            )

    def sample(self, rng: SecureRNG) -> np.ndarray:
        """One client's noise vector (int64, length ``dimension``)."""
        if self.exact:
            return sample_discrete_gaussian_exact(self.dimension, self.local_stddev, rng)
        return sample_discrete_gaussian(self.dimension, self.local_stddev, rng)

    def encode_noised(
        self, vector: np.ndarray, *, rng: SecureRNG, quantise_rng: SecureRNG | None = None
    ) -> np.ndarray:
        """The ring input ``[q + ξ (mod 2^k), 1]`` of one client (weight slot 1: uniform DP-FedAvg).

        ``quantise_rng`` drives the stochastic rounding (default: a child of ``rng``); ``rng`` the noise.
        """
        v = np.asarray(vector)
        if v.ndim != 1 or v.size != self.dimension:
            raise ConfigError(f"vector must be 1-D of length {self.dimension}, got shape {v.shape}")
        ring = encode_weighted(v, 1, self.spec, rng=quantise_rng if quantise_rng is not None else rng.spawn("quantise"))
        noise = to_ring(self.sample(rng), self.spec.ring_bits)
        ring[:-1] = ring_add(ring[:-1], noise, self.spec.ring_bits)
        return ring


def upload_spec_with_noise(
    upload: FixedPointSpec,
    *,
    noise_multiplier: float,
    clip_norm: float,
    dimension: int,
    min_survivors: int,
    n_clients: int,
    colluding: int = 0,
    failure_log2: float = -40.0,
) -> FixedPointSpec:
    """The encoding of a quantised upload that also carries distributed discrete-Gaussian noise.

    Keeps ``upload``'s ring (``ring_bits``) and public clip ``c`` and returns the largest value bits
    ``b <= upload.value_bits`` (weight 1 per client) for which ``n_clients`` clients' values plus their
    noise fit the signed ring with probability ``>= 1 - 2^failure_log2``
    (:meth:`DistributedDiscreteGaussian.check_headroom`): the noise std grows with ``s = M/c`` through
    ``Δ2``, so fewer value bits leave more room. ``dimension`` is the noised length (the padded ``d'``
    with rotation), ``clip_norm`` the L2 sensitivity of one clipped update.

    Raises :class:`RingOverflowError` naming the ring bits the noise needs when even ``b = 2`` does not fit.

    >>> up = FixedPointSpec(clip=0.02, value_bits=14, ring_bits=16, max_weight=1)
    >>> spec = upload_spec_with_noise(up, noise_multiplier=0.5, clip_norm=0.05, dimension=4096,
    ...                               min_survivors=3, n_clients=3)
    >>> spec.ring_bits, spec.clip, spec.value_bits < 14
    (16, 0.02, True)
    """
    if not isinstance(upload, FixedPointSpec):
        raise ConfigError(f"upload must be a FixedPointSpec, got {type(upload).__name__}")
    last: RingOverflowError | None = None
    for bits in range(upload.value_bits, 1, -1):
        spec = FixedPointSpec(clip=upload.clip, value_bits=bits, ring_bits=upload.ring_bits, max_weight=1)
        mechanism = DistributedDiscreteGaussian(noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                                                dimension=dimension, spec=spec, min_survivors=min_survivors,
                                                colluding=colluding)
        try:
            mechanism.check_headroom(n_clients, failure_log2=failure_log2)
        except RingOverflowError as err:
            last = err
            continue
        return spec
    raise RingOverflowError(
        f"distributed DP noise does not fit a {upload.ring_bits}-bit upload of {dimension} values for "
        f"{n_clients} clients even at 2 value bits ({last}): use wider federation.upload_bits (16 or 32)")
