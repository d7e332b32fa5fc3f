"""The privacy ledger and its accountant: epsilon(delta) computed by ``dp_accounting``, never by us.

A :class:`PrivacyAccountant` keeps an append-only ledger of :mod:`fedguard.dp.events` and answers
``epsilon(delta)`` by handing the composition of every event to a trusted library:

* ``backend="pld"`` (default): ``dp_accounting.pld.PLDAccountant`` — privacy loss distributions
  (Koskela et al. 2020; Doroshenko et al. 2022), a tight *upper* bound up to the discretisation
  interval (``pessimistic_estimate=True``). Cannot account :class:`~fedguard.dp.events.ZCDPEvent`.
* ``backend="rdp"``: ``dp_accounting.rdp.RdpAccountant`` — Rényi DP (Mironov 2017), an upper bound that
  is looser than PLD; accounts zCDP events (the distributed discrete Gaussian).
* ``backend="prv"``: Opacus' ``PRVAccountant`` (Gopi et al. 2021), returning its certified upper bound
  ``eps_upper``; (Poisson-sampled) Gaussian events only.

Opacus' Gaussian-DP (CLT) accountant is deliberately not offered: it can report an epsilon *below* the
tight PLD value, i.e. claim more privacy than a run has.

Budget. With ``epsilon_budget`` set, :meth:`spend` raises :class:`~fedguard.errors.BudgetExceededError`
*before* recording (and so before the caller releases anything) when the ledger plus the new event would
exceed the budget at ``target_delta``; :meth:`would_exceed` asks the same question without raising.

Checkpointing. :meth:`to_json` / :meth:`from_json` (and atomic :meth:`save` / :meth:`load`) serialise the
configuration and the whole ledger; a restored accountant answers the same epsilon as the original.

Equal events are grouped before composition (composition is commutative), so 10,000 identical DP-SGD
steps cost one ``SelfComposed(event, 10000)`` — one FFT self-convolution for PLD.

>>> from fedguard.dp.events import GaussianEvent, PoissonSampledEvent
>>> acc = PrivacyAccountant(target_delta=1e-5, backend="rdp")
>>> _ = acc.spend(PoissonSampledEvent(0.01, GaussianEvent(1.0)), count=1000)
>>> round(acc.epsilon(), 2)
2.1
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from fedguard.checks import check_int, number_problem
from fedguard.dp.errors import UnsupportedEventError
from fedguard.dp.events import (
    ComposedEvent,
    DistributedDiscreteGaussianEvent,
    Event,
    NonPrivateEvent,
    PoissonSampledEvent,
    SelfComposedEvent,
    ZCDPEvent,
    event_from_dict,
    event_to_dict,
    flatten_gaussian,
    to_dp_accounting,
)
from fedguard.errors import BudgetExceededError, ConfigError
from fedguard.files import atomic_write

Backend = Literal["pld", "rdp", "prv"]
BACKENDS: Final[tuple[str, ...]] = ("pld", "rdp", "prv")
LEDGER_FORMAT: Final[str] = "fedguard.dp.ledger/1"


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One recorded release: ``event`` run ``count`` times, tagged with a free-form ``label``.

    ``sensitivity``: the L2 sensitivity (one client's or record's contribution to the released sum, in the
    caller's units) that the noise was calibrated to — the event itself is normalised (a noise *multiplier*),
    so this is what ties it to the release; ``None`` when the caller did not state one (older ledgers).
    """

    event: Event
    count: int
    label: str = ""
    sensitivity: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": event_to_dict(self.event), "count": self.count, "label": self.label}
        if self.sensitivity is not None:
            out["sensitivity"] = self.sensitivity
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LedgerEntry:
        unknown = sorted(set(data) - {"event", "count", "label", "sensitivity"})
        if unknown:
            raise ConfigError(f"unknown ledger entry key(s) {unknown}")
        count = check_int("ledger entry count", data.get("count"), low=1)
        sensitivity = data.get("sensitivity")
        problem = number_problem("ledger entry sensitivity", sensitivity, low=0, low_open=True, optional=True)
        if problem:
            raise ConfigError(problem)
        return cls(event_from_dict(data["event"]), count, str(data.get("label", "")),
                   None if sensitivity is None else float(sensitivity))


def _contains(event: Event, kinds: tuple[type, ...]) -> bool:
    if isinstance(event, kinds):
        return True
    if isinstance(event, (PoissonSampledEvent, SelfComposedEvent)):
        return _contains(event.event, kinds)
    if isinstance(event, ComposedEvent):
        return any(_contains(e, kinds) for e in event.events)
    return False


def validate_delta(delta: float, population: int | None = None, *, name: str = "delta") -> None:
    """``0 < delta < 1`` and, with a ``population`` of ``n`` records, ``delta < 1/n``.

    A delta of at least ``1/n`` admits the mechanism "publish one random record in the clear", so
    such an (epsilon, delta) statement protects nobody.
    """
    problem = number_problem(name, delta, low=0, high=1, low_open=True, high_open=True)
    if problem:
        raise ConfigError(problem)
    if population is not None:
        check_int("population", population, low=1)
        if delta >= 1.0 / population:
            raise ConfigError(
                f"{name} must be < 1/n = {1.0 / population:.3g} for a population of n={population}, got {delta!r}"
            )


class PrivacyAccountant:
    """Append-only privacy ledger with epsilon(delta) delegated to ``dp_accounting`` (or Opacus PRV).

    Args:
        target_delta: the delta at which the budget is enforced and :meth:`epsilon` answers by default.
        epsilon_budget: the most epsilon the run may spend at ``target_delta``; ``None``: no budget.
        backend: ``"pld"`` (tight), ``"rdp"`` (upper bound, accepts zCDP events) or ``"prv"`` (Opacus).
        population: the number of protected records (clients or examples); enforces ``delta < 1/n``.
        pld_discretization: PLD value-discretisation interval (dp_accounting's default ``1e-4``).
    """

    def __init__(
        self,
        *,
        target_delta: float,
        epsilon_budget: float | None = None,
        backend: Backend = "pld",
        population: int | None = None,
        pld_discretization: float = 1e-4,
    ) -> None:
        problems: list[str | None] = []
        try:
            validate_delta(target_delta, population, name="target_delta")
        except ConfigError as err:
            problems.extend(err.problems)
        if epsilon_budget != math.inf:  # an infinite budget is allowed (and never binds)
            problems.append(number_problem("epsilon_budget", epsilon_budget, low=0, low_open=True, optional=True))
        if backend not in BACKENDS:
            problems.append(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        problems.append(number_problem("pld_discretization", pld_discretization, low=0, high=1,
                                       low_open=True, high_open=True))
        found = [p for p in problems if p]
        if found:
            raise ConfigError.collect(found)
        self.target_delta = float(target_delta)
        self.epsilon_budget = None if epsilon_budget is None else float(epsilon_budget)
        self.backend: Backend = backend
        self.population = None if population is None else int(population)
        self.pld_discretization = float(pld_discretization)
        self._ledger: list[LedgerEntry] = []
        self._cache: dict[float, float] = {}
        self._allowance: dict[Event, tuple[int, int]] = {}
        self._version = 0

    # -- the ledger ----------------------------------------------------------------------------------
    @property
    def ledger(self) -> tuple[LedgerEntry, ...]:
        return tuple(self._ledger)

    @property
    def steps(self) -> int:
        """Total count of recorded events."""
        return sum(e.count for e in self._ledger)

    def check_supported(self, event: Event) -> None:
        """Raise :class:`UnsupportedEventError` if this backend cannot account ``event``."""
        if self.backend == "pld" and _contains(event, (ZCDPEvent, DistributedDiscreteGaussianEvent)):
            raise UnsupportedEventError(
                f"backend 'pld' cannot account {type(event).__name__} (a zCDP/RDP bound); use backend='rdp'"
            )
        if self.backend == "prv" and not _contains(event, (NonPrivateEvent,)):
            try:
                flatten_gaussian(event)
            except ConfigError as err:
                raise UnsupportedEventError(
                    f"backend 'prv' accounts (Poisson-sampled) Gaussian events only, got {type(event).__name__}; "
                    "use backend='pld' or 'rdp'"
                ) from err
        if self.backend == "rdp" and _contains(event, (PoissonSampledEvent,)):
            self._check_rdp_sampled(event)

    def _check_rdp_sampled(self, event: Event) -> None:
        if isinstance(event, PoissonSampledEvent):
            if _contains(event.event, (ZCDPEvent, DistributedDiscreteGaussianEvent, PoissonSampledEvent)):
                raise UnsupportedEventError(
                    "backend 'rdp' amplifies Poisson sampling of Gaussian events only, got "
                    f"PoissonSampledEvent({type(event.event).__name__})"
                )
        elif isinstance(event, SelfComposedEvent):
            self._check_rdp_sampled(event.event)
        elif isinstance(event, ComposedEvent):
            for e in event.events:
                self._check_rdp_sampled(e)

    # -- epsilon -------------------------------------------------------------------------------------
    def _epsilon_of(self, groups: Counter[Event], delta: float) -> float:
        if not groups:
            return 0.0
        if any(isinstance(e, NonPrivateEvent) for e in groups):
            return math.inf
        if self.backend == "prv":
            return self._prv_epsilon(groups, delta)
        from dp_accounting.pld import PLDAccountant
        from dp_accounting.rdp import RdpAccountant

        # a canonical order: the same multiset of events gives bit-identical epsilon however it was recorded
        ordered = sorted(groups.items(), key=lambda kv: json.dumps(event_to_dict(kv[0]), sort_keys=True))
        if self.backend == "rdp" and any(isinstance(e, DistributedDiscreteGaussianEvent) for e in groups):
            return self._rdp_epsilon_per_order(ordered, delta)
        acc = PLDAccountant(value_discretization_interval=self.pld_discretization) if self.backend == "pld" else RdpAccountant()
        for event, count in ordered:
            acc.compose(to_dp_accounting(event), count)
        return float(acc.get_epsilon(delta))

    @staticmethod
    def _rdp_epsilon_per_order(ordered: list[tuple[Event, int]], delta: float) -> float:
        """RDP epsilon with each distributed discrete Gaussian at its tight per-order bound, through
        ``dp_accounting``'s public API only.

        KLS Proposition 14 gives three linear RDP forms ``xi_f + rho_f·alpha``, each valid at every order;
        the tight bound is their minimum *per order*, a curve no single ``ZCDpEvent`` expresses. The RDP
        conversion is order-wise: ``epsilon = min_alpha g_alpha(RDP(alpha))`` (dp_accounting's
        ``compute_epsilon``, Canonne-Kamath-Steinke's Proposition 12 bound per order). So for each order
        ``alpha`` of ``DEFAULT_RDP_ORDERS`` we compose the ledger on an ``RdpAccountant(orders=[alpha])``, with
        each discrete-Gaussian event as the ``ZCDpEvent`` of the form smallest at ``alpha`` (exact at that one
        order), and take the minimum of the per-order epsilons — the same number the whole-curve accountant
        would give, without writing into its private state."""
        from dp_accounting.rdp import RdpAccountant
        from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS

        best = math.inf
        for alpha in DEFAULT_RDP_ORDERS:
            acc = RdpAccountant(orders=[float(alpha)])
            for event, count in ordered:
                if isinstance(event, DistributedDiscreteGaussianEvent):
                    rho, xi = min(event.forms(), key=lambda f: f[1] + f[0] * float(alpha))
                    acc.compose(to_dp_accounting(ZCDPEvent(rho, xi)), count)
                else:
                    acc.compose(to_dp_accounting(event), count)
            best = min(best, float(acc.get_epsilon(delta)))
        return best

    @staticmethod
    def _prv_epsilon(groups: Counter[Event], delta: float) -> float:
        from opacus.accountants import PRVAccountant

        acc = PRVAccountant()
        for event, count in groups.items():
            for sigma, q, steps in flatten_gaussian(event, count):
                acc.history.append((sigma, q, steps))
        return float(acc.get_epsilon(delta))

    def _groups(self, extra: Event | None = None, extra_count: int = 0) -> Counter[Event]:
        groups: Counter[Event] = Counter()
        for entry in self._ledger:
            groups[entry.event] += entry.count
        if extra is not None:
            groups[extra] += extra_count
        return groups

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon of everything recorded so far, at ``delta`` (default ``target_delta``)."""
        d = self.target_delta if delta is None else delta
        validate_delta(d, self.population)
        if d not in self._cache:
            self._cache[d] = self._epsilon_of(self._groups(), d)
        return self._cache[d]

    def epsilon_if(self, event: Event, count: int = 1, delta: float | None = None) -> float:
        """Epsilon the ledger would have after also recording ``event`` ``count`` times."""
        count = check_int("count", count, low=1)
        self.check_supported(event)
        d = self.target_delta if delta is None else delta
        validate_delta(d, self.population)
        return self._epsilon_of(self._groups(event, count), d)

    def affordable(self, event: Event, *, limit: int = 1 << 24) -> int:
        """How many more times ``event`` fits in the budget (``limit`` without a budget).

        Found once by doubling and bisection over ``epsilon_if`` (epsilon grows with the count) and then
        cached until the ledger changes by anything other than :meth:`spend` of this same event, so a
        training loop pays for the accounting once, not at every step.
        """
        self.check_supported(event)
        if self.epsilon_budget is None:
            return limit
        cached = self._allowance.get(event)
        if cached is not None and cached[0] == self._version:
            return cached[1]
        budget = self.epsilon_budget

        def fits(k: int) -> bool:
            return self._epsilon_of(self._groups(event, k), self.target_delta) <= budget

        if not fits(1):
            k = 0
        else:
            lo, hi = 1, 2
            while hi <= limit and fits(hi):
                lo, hi = hi, 2 * hi
            hi = min(hi, limit + 1)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            k = lo
        self._allowance[event] = (self._version, k)
        return k

    def would_exceed(self, event: Event, count: int = 1) -> bool:
        """Whether recording ``event`` ``count`` times would take epsilon above the budget."""
        count = check_int("count", count, low=1)
        if self.epsilon_budget is None:
            self.check_supported(event)
            return False
        cached = self._allowance.get(event)
        if cached is not None and cached[0] == self._version:
            return count > cached[1]
        return self.epsilon_if(event, count) > self.epsilon_budget  # one composition, no search

    def spend(self, event: Event, count: int = 1, *, label: str = "", sensitivity: float | None = None) -> None:
        """Record ``event`` ``count`` times, *refusing* first if that would exceed ``epsilon_budget``.

        ``sensitivity``: the L2 sensitivity the release's noise was calibrated to (stored in the entry).
        Raises :class:`BudgetExceededError` (ledger unchanged) if the budget would be exceeded,
        :class:`UnsupportedEventError` if the backend cannot account the event.
        """
        count = check_int("count", count, low=1)
        if self.would_exceed(event, count):
            raise BudgetExceededError(
                f"{label or type(event).__name__} x{count} would raise epsilon from {self.epsilon():.4g} to "
                f"{self.epsilon_if(event, count):.4g} at delta={self.target_delta:g}, over the budget "
                f"epsilon={self.epsilon_budget:g}; nothing was released"
            )
        left = self._allowance.get(event)
        self.record(event, count, label=label, sensitivity=sensitivity)
        if left is not None and left[0] == self._version - 1:
            self._allowance[event] = (self._version, left[1] - count)

    def record(self, event: Event, count: int = 1, *, label: str = "", sensitivity: float | None = None) -> None:
        """Record a release that *has already happened*, whatever the budget (the ledger never lies)."""
        count = check_int("count", count, low=1)
        problem = number_problem("sensitivity", sensitivity, low=0, low_open=True, optional=True)
        if problem:
            raise ConfigError(problem)
        sensitivity = None if sensitivity is None else float(sensitivity)
        self.check_supported(event)
        last = self._ledger[-1] if self._ledger else None
        if last is not None and last.event == event and last.label == label and last.sensitivity == sensitivity:
            # run-length: 10k steps, 1 entry
            self._ledger[-1] = LedgerEntry(event, last.count + count, label, sensitivity)
        else:
            self._ledger.append(LedgerEntry(event, count, label, sensitivity))
        self._cache = {}
        self._version += 1

    def retract(self, label: str) -> bool:
        """Remove the *last* entry if it carries ``label`` (a write-ahead record of a release that provably
        did not happen: the round aborted before anything was decoded). Returns whether one was removed.

        Only the most recent entry can be retracted, and only by its exact label: a release that may have
        been seen is never taken back (see :mod:`fedguard.dp.ledger`)."""
        if not self._ledger or self._ledger[-1].label != label:
            return False
        last = self._ledger[-1]
        if last.count > 1:
            self._ledger[-1] = LedgerEntry(last.event, last.count - 1, label, last.sensitivity)
        else:
            self._ledger.pop()
        self._cache = {}
        self._allowance = {}
        self._version += 1
        return True

    def extends(self, other: PrivacyAccountant) -> bool:
        """Whether this ledger is ``other``'s ledger with zero or more entries appended (same settings)."""
        mine, theirs = self._ledger, other._ledger
        if (self.target_delta, self.backend, self.population) != (other.target_delta, other.backend, other.population):
            return False
        if len(theirs) > len(mine):
            return False
        if not theirs:
            return True
        *head, tail = theirs
        if mine[: len(head)] != head:
            return False
        # run-length merging may have grown the checkpoint's last entry since
        at = mine[len(head)]
        return (at.event == tail.event and at.label == tail.label and at.sensitivity == tail.sensitivity
                and at.count >= tail.count)

    def remaining(self) -> float:
        """Budget left (``inf`` without a budget)."""
        return math.inf if self.epsilon_budget is None else self.epsilon_budget - self.epsilon()

    # -- persistence ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": LEDGER_FORMAT,
            "target_delta": self.target_delta,
            "epsilon_budget": self.epsilon_budget,
            "backend": self.backend,
            "population": self.population,
            "pld_discretization": self.pld_discretization,
            "ledger": [e.to_dict() for e in self._ledger],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyAccountant:
        known = {"format", "target_delta", "epsilon_budget", "backend", "population", "pld_discretization", "ledger"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ledger key(s) {unknown}")
        if data.get("format") != LEDGER_FORMAT:
            raise ConfigError(f"ledger format must be {LEDGER_FORMAT!r}, got {data.get('format')!r}")
        acc = cls(
            target_delta=data["target_delta"],
            epsilon_budget=data.get("epsilon_budget"),
            backend=data.get("backend", "pld"),
            population=data.get("population"),
            pld_discretization=data.get("pld_discretization", 1e-4),
        )
        entries = [LedgerEntry.from_dict(e) for e in data.get("ledger", [])]
        for e in entries:
            acc.check_supported(e.event)
        acc._ledger = entries
        acc._version = 1
        return acc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PrivacyAccountant:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"ledger is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"ledger JSON must be an object, got {type(data).__name__}")
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the ledger atomically (:func:`fedguard.files.atomic_write`) next to a checkpoint, creating
        the directory if needed."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(target, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivacyAccountant:
        return cls.from_json(Path(path).read_text())

    def copy(self) -> PrivacyAccountant:
        return copy.deepcopy(self)

    def __repr__(self) -> str:
        budget = "none" if self.epsilon_budget is None else f"{self.epsilon_budget:g}"
        return (
            f"PrivacyAccountant(backend={self.backend!r}, delta={self.target_delta:g}, budget={budget}, "
            f"entries={len(self._ledger)}, steps={self.steps})"
        )

