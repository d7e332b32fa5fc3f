"""Frozen records of privacy-consuming releases ("DP events"), after ``dp_accounting.dp_event``.

An event says *what mechanism was run*, never what it cost: the cost is computed by an accounting library
(:mod:`fedguard.dp.accountant` delegates to ``dp_accounting``). Events are immutable, hashable (so equal
events can be grouped and self-composed in one step) and round-trip through JSON
(:func:`event_to_dict` / :func:`event_from_dict`), which is how the privacy ledger is checkpointed.

Events and their math (neighbouring relation: add or remove one record, where a record is one client's
update for client-level DP and one training example for example-level DP):

* :class:`GaussianEvent` — the Gaussian mechanism with L2 sensitivity 1 and noise std ``z``
  (``z`` = noise multiplier = noise std / sensitivity).
* :class:`PoissonSampledEvent` — each record is included independently with probability ``q`` before
  the inner event runs (amplification by Poisson subsampling; Abadi et al. 2016, Mironov et al. 2019).
* :class:`SelfComposedEvent`, :class:`ComposedEvent` — sequential composition.
* :class:`ZCDPEvent` — a mechanism satisfying ``(alpha, xi + rho*alpha)``-RDP for every ``alpha``
  (Bun & Steinke 2016); accounted by the RDP backend only.
* :class:`DistributedDiscreteGaussianEvent` — the sum of ``n`` clients' independent discrete Gaussians
  ``N_Z(0, s^2)`` added to an integer vector of L2/L1 sensitivity ``Δ2``/``Δ1`` in dimension ``d``.
  Kairouz, Liu & Steinke (ICML 2021, arXiv:2102.06387, Proposition 14) bound its RDP of order ``alpha``
  by the minimum of three ``xi + rho*alpha`` forms with

      τ = 10 Σ_{k=1}^{n-1} exp(-2π² s² k/(k+1)),   a = Δ2/(√n s),   b = Δ1/(√n s):
      (1) rho = a²/2,                     xi = τ d
      (2) rho = (a² + 2bτ + τ² d)/2,      xi = 0
      (3) rho = (a + √d τ)²/2,            xi = 0

  Every one of them is a valid bound at every order, so their pointwise minimum is one too: the RDP
  backend accounts the event as ``min_f (xi_f + rho_f·alpha)`` at each of its orders
  (:meth:`DistributedDiscreteGaussianEvent.rdp`), never above the single form that is smallest at order 32
  (:meth:`~DistributedDiscreteGaussianEvent.zcdp_bound`, used where one ``ZCDPEvent`` is needed, e.g.
  nested inside a composed event). In practice ``τ`` underflows for ``s >= 2`` and all three equal ``a²/2``.
  As ``s -> ∞`` this tends to the continuous Gaussian with noise multiplier ``√n s / Δ2``.
* :class:`NonPrivateEvent` — a release with no guarantee (zero noise or no clipping): epsilon = inf.

>>> e = PoissonSampledEvent(0.01, GaussianEvent(1.1))
>>> event_from_dict(event_to_dict(e)) == e
True
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeAlias

from fedguard.checks import check_int, check_number, int_problem, number_problem
from fedguard.errors import ConfigError


def _store_plain(obj: object, *names: str) -> None:
    """After the checks passed: store a numpy scalar they accepted (any other ``numbers.Real``) as the Python
    ``int``/``float`` it equals, JSON-ready and hashing like its Python twin. ``int``, ``float`` and
    non-numbers are left as they are."""
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, numbers.Real) and not isinstance(v, (int, float)):
            object.__setattr__(obj, name, int(v) if isinstance(v, numbers.Integral) else float(v))


@dataclass(frozen=True, slots=True)
class GaussianEvent:
    """The Gaussian mechanism: L2 sensitivity 1, noise ``N(0, noise_multiplier^2)`` per coordinate."""

    noise_multiplier: float

    def __post_init__(self) -> None:
        check_number("noise_multiplier", self.noise_multiplier, low=0, low_open=True)
        _store_plain(self, "noise_multiplier")


@dataclass(frozen=True, slots=True)
class PoissonSampledEvent:
    """``event`` run on a Poisson subsample: each record included independently with ``sampling_probability``."""

    sampling_probability: float
    event: Event

    def __post_init__(self) -> None:
        check_number("sampling_probability", self.sampling_probability, low=0, high=1, low_open=True)
        _check_event(self.event, "event")
        _store_plain(self, "sampling_probability")


@dataclass(frozen=True, slots=True)
class SelfComposedEvent:
    """``event`` run ``count`` times in sequence."""

    event: Event
    count: int

    def __post_init__(self) -> None:
        _check_event(self.event, "event")
        check_int("count", self.count, low=1)
        _store_plain(self, "count")


@dataclass(frozen=True, slots=True)
class ComposedEvent:
    """The events run in sequence (any order: composition is commutative)."""

    events: tuple[Event, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.events, tuple) or not self.events:
            raise ConfigError(f"events must be a non-empty tuple, got {self.events!r}")
        for i, e in enumerate(self.events):
            _check_event(e, f"events[{i}]")


@dataclass(frozen=True, slots=True)
class ZCDPEvent:
    """A mechanism that is ``(alpha, xi + rho*alpha)``-RDP for all ``alpha > 1`` (``xi = 0``: rho-zCDP)."""

    rho: float
    xi: float = 0.0

    def __post_init__(self) -> None:
        check_number("rho", self.rho, low=0, low_open=True)
        check_number("xi", self.xi, low=0)
        _store_plain(self, "rho", "xi")


@dataclass(frozen=True, slots=True)
class DistributedDiscreteGaussianEvent:
    """The sum of ``n_clients`` independent ``N_Z(0, local_stddev^2)`` vectors on an integer query.

    Attributes:
        local_stddev: each contributing client's discrete-Gaussian scale ``s``, in integer (ring) units.
        n_clients: how many clients' noise is in the released sum *and unknown to the adversary*
            (survivors minus clients assumed to collude with the server).
        l2_sensitivity: bound ``Δ2`` on the L2 norm of one client's integer contribution.
        l1_sensitivity: bound ``Δ1`` on its L1 norm.
        dimension: ``d``, the number of noised coordinates.
    """

    local_stddev: float
    n_clients: int
    l2_sensitivity: float
    l1_sensitivity: float
    dimension: int

    def __post_init__(self) -> None:
        problems = [p for p in (
            number_problem("local_stddev", self.local_stddev, low=0.5),
            int_problem("n_clients", self.n_clients, low=1),
            number_problem("l2_sensitivity", self.l2_sensitivity, low=0, low_open=True),
            number_problem("l1_sensitivity", self.l1_sensitivity, low=0, low_open=True),
            int_problem("dimension", self.dimension, low=1),
        ) if p]
        if problems:
            raise ConfigError.collect(problems)
        _store_plain(self, "local_stddev", "n_clients", "l2_sensitivity", "l1_sensitivity", "dimension")

    @property
    def tau(self) -> float:
        """``τ = 10 Σ_{k=1}^{n-1} exp(-2π² s² k/(k+1))`` (Kairouz et al. 2021, Theorem 1)."""
        s2 = float(self.local_stddev) ** 2
        return 10.0 * math.fsum(
            math.exp(-2.0 * math.pi**2 * s2 * k / (k + 1)) for k in range(1, self.n_clients)
        )

    @property
    def central_noise_multiplier(self) -> float:
        """``√n s / Δ2``: the noise multiplier of the continuous Gaussian this converges to."""
        return math.sqrt(self.n_clients) * self.local_stddev / self.l2_sensitivity

    def forms(self) -> list[tuple[float, float]]:
        """The three ``(rho, xi)`` forms of Proposition 14 (see the module doc); each is a valid RDP bound."""
        n, s, d = self.n_clients, float(self.local_stddev), self.dimension
        tau = self.tau
        a = self.l2_sensitivity / (math.sqrt(n) * s)
        b = self.l1_sensitivity / (math.sqrt(n) * s)
        return [
            (a * a / 2.0, tau * d),
            ((a * a + 2.0 * b * tau + tau * tau * d) / 2.0, 0.0),
            ((a + math.sqrt(d) * tau) ** 2 / 2.0, 0.0),
        ]

    def rdp(self, orders: Sequence[float]) -> list[float]:
        """RDP at each order ``alpha``: ``min_f (xi_f + rho_f·alpha)`` over the three forms (tight per order)."""
        forms = self.forms()
        return [min(xi + rho * float(alpha) for rho, xi in forms) for alpha in orders]

    def zcdp_bound(self) -> ZCDPEvent:
        """The tightest at order 32 of the three RDP forms of Proposition 14 (each one is valid)."""
        rho, xi = min(self.forms(), key=lambda f: f[1] + 32.0 * f[0])
        return ZCDPEvent(rho, xi)


@dataclass(frozen=True, slots=True)
class NonPrivateEvent:
    """A release without a DP guarantee (no noise or unbounded sensitivity): epsilon is infinite."""


Event: TypeAlias = (
    GaussianEvent
    | PoissonSampledEvent
    | SelfComposedEvent
    | ComposedEvent
    | ZCDPEvent
    | DistributedDiscreteGaussianEvent
    | NonPrivateEvent
)

_TYPES: dict[str, type] = {
    "gaussian": GaussianEvent,
    "poisson_sampled": PoissonSampledEvent,
    "self_composed": SelfComposedEvent,
    "composed": ComposedEvent,
    "zcdp": ZCDPEvent,
    "distributed_discrete_gaussian": DistributedDiscreteGaussianEvent,
    "non_private": NonPrivateEvent,
}
_NAMES: dict[type, str] = {cls: name for name, cls in _TYPES.items()}


def _check_event(e: object, where: str) -> None:
    if type(e) not in _NAMES:
        raise ConfigError(f"{where} must be a fedguard.dp event, got {type(e).__name__}")


def event_to_dict(event: Event) -> dict[str, Any]:
    """A JSON-ready dict: ``{"type": ..., <fields>}`` with nested events as dicts."""
    _check_event(event, "event")
    out: dict[str, Any] = {"type": _NAMES[type(event)]}
    for f in fields(event):
        v = getattr(event, f.name)
        if f.name == "event":
            out[f.name] = event_to_dict(v)
        elif f.name == "events":
            out[f.name] = [event_to_dict(e) for e in v]
        else:
            out[f.name] = v
    return out


def event_from_dict(data: Mapping[str, Any]) -> Event:
    """Inverse of :func:`event_to_dict`; unknown types or keys raise :class:`ConfigError` naming them."""
    if not isinstance(data, Mapping) or "type" not in data:
        raise ConfigError(f"an event must be a mapping with a 'type' key, got {data!r}")
    kind = data["type"]
    if kind not in _TYPES:
        raise ConfigError(f"unknown event type {kind!r}; known: {sorted(_TYPES)}")
    cls = _TYPES[kind]
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names - {"type"})
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} for event type {kind!r}")
    kwargs: dict[str, Any] = {}
    for key in names & set(data):
        v = data[key]
        if key == "event":
            v = event_from_dict(v)
        elif key == "events":
            v = tuple(event_from_dict(e) for e in v)
        kwargs[key] = v
    try:
        event: Event = cls(**kwargs)
        return event
    except TypeError as err:
        raise ConfigError(f"event type {kind!r}: {err}") from err


def to_dp_accounting(event: Event) -> Any:
    """The equivalent ``dp_accounting.DpEvent`` (imported lazily)."""
    import dp_accounting

    if isinstance(event, GaussianEvent):
        return dp_accounting.GaussianDpEvent(float(event.noise_multiplier))
    if isinstance(event, PoissonSampledEvent):
        return dp_accounting.PoissonSampledDpEvent(
            float(event.sampling_probability), to_dp_accounting(event.event)
        )
    if isinstance(event, SelfComposedEvent):
        return dp_accounting.SelfComposedDpEvent(to_dp_accounting(event.event), event.count)
    if isinstance(event, ComposedEvent):
        return dp_accounting.ComposedDpEvent([to_dp_accounting(e) for e in event.events])
    if isinstance(event, ZCDPEvent):
        return dp_accounting.ZCDpEvent(rho=float(event.rho), xi=float(event.xi))
    if isinstance(event, DistributedDiscreteGaussianEvent):
        return to_dp_accounting(event.zcdp_bound())
    if isinstance(event, NonPrivateEvent):
        return dp_accounting.NonPrivateDpEvent()
    raise ConfigError(f"event must be a fedguard.dp event, got {type(event).__name__}")


def flatten_gaussian(event: Event, count: int = 1) -> list[tuple[float, float, int]]:
    """``(noise_multiplier, sampling_rate, steps)`` triples if ``event`` is built only from (Poisson-sampled)
    Gaussians, for accountants that take that history format (Opacus PRV); else :class:`ConfigError`."""
    if isinstance(event, GaussianEvent):
        return [(float(event.noise_multiplier), 1.0, count)]
    if isinstance(event, PoissonSampledEvent) and isinstance(event.event, GaussianEvent):
        return [(float(event.event.noise_multiplier), float(event.sampling_probability), count)]
    if isinstance(event, SelfComposedEvent):
        return flatten_gaussian(event.event, count * event.count)
    if isinstance(event, ComposedEvent):
        return [t for e in event.events for t in flatten_gaussian(e, count)]
    raise ConfigError(f"{type(event).__name__} is not a (Poisson-sampled) Gaussian event")
