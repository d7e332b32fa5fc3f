"""Noise calibration: the smallest noise multiplier that meets a target (epsilon, delta).

For ``steps`` releases of the Poisson-subsampled Gaussian mechanism with sampling rate ``q`` (``q = 1``:
no subsampling), epsilon at fixed delta decreases monotonically in the noise multiplier ``z``. We bracket
the answer ourselves (doubling from ``z = 1/8`` up to ``max_noise_multiplier``) and hand the root search to
``dp_accounting.mechanism_calibration.calibrate_dp_mechanism`` (Brent's method) with fresh accountants of
the chosen backend, so the returned ``z`` is certified by the same library that accounts the run:
``epsilon(z) <= target_epsilon``.

Mathematically every epsilon > 0 is reachable as ``z -> ∞``; in practice a target that needs more than
``max_noise_multiplier`` (default 1000: the update would be drowned in noise) raises
:class:`~fedguard.dp.errors.UnreachableTargetError`, naming the target and the epsilon reached at the cap.

>>> kw = dict(target_delta=1e-5, steps=100, sampling_rate=0.1, backend="rdp")
>>> z = calibrate_noise_multiplier(target_epsilon=3.0, **kw)
>>> round(z, 2), epsilon_for(z, **kw) <= 3.0
(1.8, True)
"""

from __future__ import annotations

from fedguard.checks import check_int, check_number, number_problem
from fedguard.dp.accountant import Backend, PrivacyAccountant, validate_delta
from fedguard.dp.errors import UnreachableTargetError
from fedguard.dp.events import Event, GaussianEvent, PoissonSampledEvent, SelfComposedEvent
from fedguard.errors import ConfigError


def gaussian_round_event(noise_multiplier: float, sampling_rate: float) -> Event:
    """One release: ``Gaussian(z)``, Poisson-subsampled at ``q`` unless ``q == 1``."""
    g = GaussianEvent(noise_multiplier)
    return g if sampling_rate == 1 else PoissonSampledEvent(sampling_rate, g)


def check_sampling_rate(q: float, name: str = "sampling_rate") -> None:
    problem = number_problem(name, q, low=0, high=1, low_open=True)
    if problem:
        raise ConfigError(problem)


def epsilon_for(
    noise_multiplier: float,
    *,
    steps: int,
    sampling_rate: float,
    target_delta: float,
    backend: Backend = "pld",
) -> float:
    """Epsilon of ``steps`` releases of the (subsampled) Gaussian with this noise multiplier."""
    acc = PrivacyAccountant(target_delta=target_delta, backend=backend)
    acc.record(gaussian_round_event(noise_multiplier, sampling_rate), steps)
    return acc.epsilon()


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    steps: int,
    sampling_rate: float,
    backend: Backend = "pld",
    population: int | None = None,
    max_noise_multiplier: float = 1000.0,
    tol: float = 1e-3,
) -> float:
    """The smallest noise multiplier ``z`` (within ``tol``) with ``epsilon(z) <= target_epsilon``.

    Raises:
        ConfigError: non-positive epsilon, delta outside (0, 1) or ``>= 1/population``, steps < 1,
            sampling rate outside (0, 1].
        UnreachableTargetError: even ``max_noise_multiplier`` does not meet the target.
    """
    problems: list[str] = []
    for check in (lambda: check_number("target_epsilon", target_epsilon, low=0, low_open=True),
                  lambda: validate_delta(target_delta, population, name="target_delta"),
                  lambda: check_sampling_rate(sampling_rate),
                  lambda: check_int("steps", steps, low=1)):
        try:
            check()
        except ConfigError as err:
            problems.extend(err.problems)
    if not (isinstance(max_noise_multiplier, (int, float)) and max_noise_multiplier > 0):
        problems.append(f"max_noise_multiplier must be > 0, got {max_noise_multiplier!r}")
    if problems:
        raise ConfigError.collect(problems)

    def eps(z: float) -> float:
        return epsilon_for(z, steps=steps, sampling_rate=sampling_rate, target_delta=target_delta, backend=backend)

    if backend in ("pld", "prv"):
        # RDP upper-bounds PLD/PRV and is cheap: its calibrated z certainly meets the target here, so it
        # is the upper end of the bracket; halve down for the lower end.
        hi = calibrate_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=target_delta, steps=steps, sampling_rate=sampling_rate,
            backend="rdp", population=population, max_noise_multiplier=max_noise_multiplier, tol=tol,
        )
        lo = hi / 2
        while eps(lo) <= target_epsilon:
            hi, lo = lo, lo / 2
            if lo < 1e-3:
                return hi
    else:
        hi = 0.125
        while eps(hi) > target_epsilon:
            if hi >= max_noise_multiplier:
                raise UnreachableTargetError(
                    f"target_epsilon={target_epsilon:g} at delta={target_delta:g} is unreachable in {steps} "
                    f"step(s) with sampling_rate={sampling_rate:g}: even noise_multiplier={hi:g} gives "
                    f"epsilon={eps(hi):.4g}"
                )
            hi = min(2 * hi, float(max_noise_multiplier))
        lo = hi / 2
        if hi == 0.125:
            lo = 1e-3
            if eps(lo) <= target_epsilon:
                return lo
    from dp_accounting import mechanism_calibration
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    from fedguard.dp.events import to_dp_accounting

    if backend == "prv":  # no dp_accounting accountant: bisect on Opacus' certified upper bound
        while hi - lo > tol:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
        return hi

    def fresh() -> object:
        return PLDAccountant() if backend == "pld" else RdpAccountant()

    def make_event(z: float) -> object:
        return to_dp_accounting(SelfComposedEvent(gaussian_round_event(z, sampling_rate), steps))

    z = float(
        mechanism_calibration.calibrate_dp_mechanism(
            fresh, make_event, target_epsilon, target_delta,
            mechanism_calibration.ExplicitBracketInterval(lo, hi), tol=tol,
        )
    )
    # Brent returns a root within tol; step up until the certified epsilon meets the target.
    while eps(z) > target_epsilon:
        z += tol
    return z


def max_steps(
    *,
    noise_multiplier: float,
    sampling_rate: float,
    target_epsilon: float,
    target_delta: float,
    backend: Backend = "pld",
    limit: int = 1_000_000,
) -> int:
    """The most releases of the (subsampled) Gaussian that fit in ``target_epsilon`` (0 if none does)."""
    GaussianEvent(noise_multiplier)
    check_sampling_rate(sampling_rate)

    def fits(n: int) -> bool:
        return epsilon_for(noise_multiplier, steps=n, sampling_rate=sampling_rate,
                           target_delta=target_delta, backend=backend) <= target_epsilon

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return limit if fits(limit) else _bisect(fits, lo, limit + 1)
    return _bisect(fits, lo, hi)


def _bisect(fits: object, lo: int, hi: int) -> int:
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):  # type: ignore[operator]
            lo = mid
        else:
            hi = mid
    return lo
