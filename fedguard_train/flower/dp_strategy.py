"""fedguard's privacy accountant inside Flower's own DP strategy wrappers: two lines for a Flower user.

Flower 1.42's DP wrappers (``DifferentialPrivacyServerSideFixedClipping`` and
``DifferentialPrivacyClientSideFixedClipping`` in ``flwr.serverapp.strategy``) take an ``accountant``
that follows ``flwr.serverapp.PrivacyAccountant``: before each round they ask ``would_exceed`` (and stop
with ``PrivacyBudgetExhausted``), after each noised release they ``compose`` the round's
``GaussianPrivacyEvent``. :class:`FedguardAccountant` is such an accountant, backed by
:class:`fedguard.dp.PrivacyAccountant`:

* the round's release is the Gaussian mechanism with noise multiplier ``z`` (Flower adds
  ``N(0, (z·C/k)²)`` to the mean of ``k`` updates clipped to ``C``: sensitivity ``C/k`` under
  add-or-remove-one), so the event is ``GaussianEvent(z)`` — or, for Poisson client sampling with
  ``q = k/N``, ``PoissonSampledEvent(q, GaussianEvent(z))`` (Abadi et al. 2016; Mironov et al. 2019);
* ε(δ) comes from ``dp_accounting``'s privacy-loss distributions by default (``backend="pld"``: tight,
  Koskela et al. 2020; Doroshenko et al. 2022) instead of an RDP bound, or from RDP (``"rdp"``);
* with ``ledger=PATH`` every release is written, ``fsync``-ed, to a write-ahead ledger file
  (:class:`fedguard.dp.ledger.WriteAheadLedger`) *before* Flower is told it is composed, and a
  restarted ServerApp continues from the file (the accountant of a crashed run never forgets a release);
* ``epsilon_per_round`` lists ε after every release, for the run's report.

Two lines in an existing Flower ServerApp::

    accountant = FedguardAccountant(population_size=N, target_delta=1e-5, max_epsilon=8.0, ledger="ledger.json")
    strategy = DifferentialPrivacyServerSideFixedClipping(FedAvg(...), noise_multiplier=z, clipping_norm=C,
                                                          num_sampled_clients=k, accountant=accountant)

(``examples/flower_dp_strategy.py`` runs it on Flower's Deployment Engine).
"""

from __future__ import annotations

import os
from typing import Any

from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    PrivacySpent,
    SamplingMethod,
)

from fedguard.dp import GaussianEvent, PoissonSampledEvent, PrivacyAccountant
from fedguard.dp.events import Event
from fedguard.dp.ledger import WriteAheadLedger
from fedguard.errors import ConfigError


class FedguardAccountant:
    """A ``flwr.serverapp.PrivacyAccountant`` computed by fedguard (see the module doc).

    Args:
        population_size: ``N``, the clients that could take part (δ must be < 1/N).
        target_delta: δ at which ε is reported and the budget enforced.
        max_epsilon: the budget (``None``: none); Flower refuses a round that would exceed it.
        sampling: ``"no-amplification"`` (every round a plain Gaussian release; what Flower's fixed-clipping
            wrappers require today) or ``"poisson"`` (each client independently with ``q = k/N``).
        backend: ``"pld"`` (tight) or ``"rdp"``.
        ledger: a write-ahead ledger file (``None``: accounting in memory only).
    """

    def __init__(self, *, population_size: int, target_delta: float, max_epsilon: float | None = None,
                 sampling: str = "no-amplification", backend: str = "pld",
                 ledger: str | os.PathLike[str] | None = None) -> None:
        methods = {"no-amplification": SamplingMethod.NO_AMPLIFICATION, "poisson": SamplingMethod.POISSON}
        if sampling not in methods:
            raise ConfigError(f"sampling must be one of {sorted(methods)}, got {sampling!r} (sampling without "
                              "replacement under replace-one is not accounted by fedguard)")
        if backend not in ("pld", "rdp"):
            raise ConfigError(f"backend must be 'pld' or 'rdp', got {backend!r}")
        self._accountant = PrivacyAccountant(target_delta=target_delta, epsilon_budget=max_epsilon,
                                             backend=backend,  # type: ignore[arg-type]
                                             population=population_size)
        try:
            self._config = PrivacyConfig(target_delta=target_delta, population_size=population_size,
                                         neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                         sampling_method=methods[sampling], max_epsilon=max_epsilon)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        self._ledger = None if ledger is None else WriteAheadLedger(ledger)
        if self._ledger is not None:
            restored = self._ledger.reconcile(None)
            if restored is not None:
                self._accountant = restored
        self.epsilon_per_round: list[float] = []

    # -- the flwr.serverapp.PrivacyAccountant protocol ------------------------------------------------------
    @property
    def config(self) -> PrivacyConfig:
        return self._config

    @property
    def num_releases(self) -> int:
        return int(self._accountant.steps)

    def event_of(self, event: GaussianPrivacyEvent) -> Event:
        """fedguard's event for one Flower release (see the module doc)."""
        if event.population_size != self._config.population_size:
            raise ConfigError(f"the event's population {event.population_size} differs from the accountant's "
                              f"{self._config.population_size}")
        gaussian = GaussianEvent(float(event.noise_multiplier))
        if self._config.sampling_method is SamplingMethod.POISSON:
            return PoissonSampledEvent(event.sample_size / event.population_size, gaussian)
        return gaussian

    def compose(self, event: GaussianPrivacyEvent, count: int = 1) -> None:
        """Record a release that has happened (whatever the budget: the ledger never lies), durably first."""
        self._accountant.record(self.event_of(event), count, label="flower-release")
        if self._ledger is not None:
            self._ledger.persist(self._accountant)
        self.epsilon_per_round.append(self.get_epsilon(self._config.target_delta))

    def get_epsilon(self, delta: float) -> float:
        return float(self._accountant.epsilon(delta))

    def get_delta(self, epsilon: float) -> float:
        """The smallest δ with ε(δ) <= ``epsilon`` (bisection on a log scale over ε(δ), which decreases in δ),
        searched below ``1/N`` (a larger δ protects nobody: 1.0 is returned when even that is not enough)."""
        if not self._accountant.steps:
            return 0.0
        low, high = 1e-12, (1.0 / self._config.population_size) * (1 - 1e-9)
        if self.get_epsilon(high) > epsilon:
            return 1.0
        for _ in range(60):
            mid = (low * high) ** 0.5
            if self.get_epsilon(mid) > epsilon:
                low = mid
            else:
                high = mid
        return high

    def get_privacy_spent(self, delta: float | None = None) -> PrivacySpent:
        delta = self._config.target_delta if delta is None else delta
        return PrivacySpent(epsilon=self.get_epsilon(delta), delta=delta, num_releases=self.num_releases,
                            accounting_method=f"fedguard-{self._accountant.backend}")

    def would_exceed(self, event: GaussianPrivacyEvent, max_epsilon: float | None = None, count: int = 1) -> bool:
        limit = self._config.max_epsilon if max_epsilon is None else max_epsilon
        if limit is None:
            return False
        return float(self._accountant.epsilon_if(self.event_of(event), count)) > limit

    def state_dict(self) -> dict[str, Any]:
        return {"fedguard_accountant": self._accountant.to_dict(), "epsilon_per_round": list(self.epsilon_per_round)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raw = state.get("fedguard_accountant")
        if not isinstance(raw, dict):
            raise ConfigError("state has no fedguard_accountant entry")
        self._accountant = PrivacyAccountant.from_dict(raw)
        eps = state.get("epsilon_per_round", [])
        self.epsilon_per_round = [float(e) for e in eps] if isinstance(eps, list) else []
