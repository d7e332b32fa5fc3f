"""Client-level DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018) with adaptive clipping
(Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021), central or distributed noise placement.

The mechanism, per round. The server Poisson-samples clients with rate ``q`` (:func:`sample_clients`).
Each sampled client clips its update ``Δ_i`` to L2 norm ``C``:  ``Δ̂_i = Δ_i · min(1, C/‖Δ_i‖)``.
The released quantity is the noised sum

    S̃ = Σ_i Δ̂_i + N(0, (z·C)² I),        update = S̃ / D,

with ``D = q·N`` (``denominator="expected"``, McMahan's fixed-denominator estimator; ``N`` the
population) or ``D = m``, the number of contributors (``denominator="participants"``). Adding or removing
one client's update moves the sum by at most ``C``, so each round is the Poisson-subsampled Gaussian
mechanism with noise multiplier ``z`` — the event the accountant records. Clients enter with weight 1:
DP-FedAvg is FedAvg with uniform client weights (sample-count weights would raise the sensitivity).

Adaptive clipping (Andrew et al.). Each client also reports ``b_i = 1[‖Δ_i‖ <= C]``; the server forms the
noised fraction ``b̄ = (Σ b_i + N(0, σ_b²)) / D`` and updates ``C ← C·exp(-η (b̄ - γ))`` towards the
``γ``-quantile of update norms. The bit rides as one extra coordinate ``(b_i - ½)·k`` with
``k = z_Δ C / σ_b``, so every coordinate gets the same noise ``z_Δ C``; the joint sensitivity is
``C·√(1 + z_Δ²/(4σ_b²))`` and the round has effective noise multiplier

    z = (z_Δ⁻² + (2σ_b)⁻²)^(-1/2)     ⇔     z_Δ = (z⁻² - (2σ_b)⁻²)^(-1/2)   (needs 2σ_b > z),

exactly Andrew et al.'s accounting: the configured ``noise_multiplier`` is ``z``.

Placement.

* ``"central"``: clients send clipped updates through any aggregator (e.g. ``aggregate_updates`` with
  ``PlaintextAggregator``); :meth:`ClientLevelDP.finalize` adds ``N(0, (zC)²)`` after aggregation. The
  server is trusted with the unnoised sum. The Gaussian is drawn in float64 by
  :meth:`SecureRNG.normal` (Box–Muller on ChaCha20 uniforms): floating-point Gaussian noise is only
  approximately Gaussian in its extreme tails (Mironov 2012 shows such gaps for Laplace); use the
  distributed placement where the exact integer mechanism matters.
* ``"distributed"``: each client adds discrete-Gaussian noise in the ring before secure aggregation
  (:meth:`ClientLevelDP.noise_for_client`; :mod:`fedguard.dp.distributed`), so the server only ever sees
  a noised sum. Planned for ``min_survivors`` clients; the accountant records the actual survivors (RDP
  backend: the event is a zCDP bound). Client sampling is recorded *without* amplification by
  subsampling (``dp_accounting`` amplifies Gaussian events only), a conservative upper bound.
  With a quantised upload (:meth:`ClientLevelDP.use_upload`) the noise goes into the upload's ring at its
  public scale, over the rotated coordinates when the upload is rotated; the value bits are lowered until
  the noise fits (:func:`~fedguard.dp.distributed.upload_spec_with_noise`).

Lifecycle of one round, as the round loop calls it::

    dp.begin_round(r)                        # BudgetExceededError here: nothing computed or released
    clipped = [dp.clip(u) for u in updates]  # on each client
    # central:      outcome = aggregate_updates(clipped, aggregator, dp.fixed_point_spec(), round_id=r)
    # distributed:  ring inputs = dp.noise_for_client(u, rng=...) -> any secure aggregator -> decode
    result = dp.finalize(outcome.mean, outcome.total_weight)   # noised update, epsilon, next clip

What is public (threat model): the set and number of participating clients (the server selects them
and the aggregator's weight slot reveals the count); the guarantee covers the *content* of every
client's update. With ``denominator="expected"`` the released model does not depend on the count.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np

from fedguard.checks import check_int, int_problem, number_problem
from fedguard.dp.accountant import PrivacyAccountant, validate_delta
from fedguard.dp.calibration import check_sampling_rate, gaussian_round_event
from fedguard.dp.distributed import DistributedDiscreteGaussian, upload_spec_with_noise
from fedguard.dp.errors import InsufficientNoiseError
from fedguard.dp.events import Event, NonPrivateEvent, _store_plain
from fedguard.encoding import FixedPointSpec
from fedguard.errors import BudgetExceededError, ConfigError, InvalidUpdateError
from fedguard.quantise import padded_length
from fedguard.rng import SecureRNG
from fedguard.rotation import DEFAULT_BLOCK
from fedguard.updates import ClientUpdate

Placement = Literal["central", "distributed"]
Denominator = Literal["expected", "participants"]
Sampling = Literal["poisson", "fixed_size"]


def _real(x: object) -> bool:
    """A real number, not a ``bool`` (possibly infinite or NaN: a guard for the cross-checks)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass(frozen=True, kw_only=True, slots=True)
class AdaptiveClipping:
    """Geometric quantile tracking of the clip norm (Andrew et al. 2021, Algorithm 1).

    Attributes:
        target_quantile: ``γ`` in (0, 1): the fraction of updates that should be unclipped.
        learning_rate: ``η`` > 0 of the geometric update ``C ← C·exp(-η (b̄ - γ))``.
        count_noise_stddev: ``σ_b`` > 0, the noise on the clipped count (the paper suggests about
            ``expected clients / 20``).
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_stddev: float = 1.0

    def __post_init__(self) -> None:
        problems = [p for p in (
            number_problem("target_quantile", self.target_quantile, low=0, high=1, low_open=True, high_open=True),
            number_problem("learning_rate", self.learning_rate, low=0, low_open=True),
            number_problem("count_noise_stddev", self.count_noise_stddev, low=0, low_open=True),
        ) if p]
        if problems:
            raise ConfigError.collect(problems)
        _store_plain(self, "target_quantile", "learning_rate", "count_noise_stddev")


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientDPConfig:
    """The ``dp:`` section of a federated run (client level). JSON/YAML round-trip with :meth:`to_dict`.

    Attributes:
        clip_norm: ``C`` > 0 (the initial value under adaptive clipping). ``math.inf`` only with
            ``allow_non_private``.
        noise_multiplier: ``z`` > 0 (effective, including the count query under adaptive clipping);
            ``0`` only with ``allow_non_private``.
        sampling_rate: ``q`` in (0, 1], the client-sampling rate (``fixed_size``: ``k/N``).
        sampling: ``"poisson"`` (each client independently with probability ``q``; central placement is
            accounted as ``PoissonSampled(q, Gaussian(z))``, amplification by subsampling) or
            ``"fixed_size"`` (``k = q·N`` clients without replacement; accounted as ``Gaussian(z)``, *no*
            amplification: dp_accounting amplifies sampling without replacement only under the replace-one
            relation, and on its RDP accountant only, while this ledger is add/remove throughout).
        population: ``N``, the number of clients (needed for ``denominator="expected"``; also enforces
            ``delta < 1/N`` on an accountant built by :meth:`make_accountant`).
        placement: ``"central"`` or ``"distributed"``.
        denominator: ``"expected"`` (``q·N``) or ``"participants"`` (the contributor count).
        adaptive: adaptive clipping settings, or ``None`` for a fixed clip norm.
        min_survivors: distributed placement: the fewest clients the noise is planned for.
        colluding: distributed placement: clients assumed to reveal their noise to the server.
        value_bits, ring_bits: the fixed-point encoding of :meth:`ClientLevelDP.fixed_point_spec`.
        allow_non_private: permit zero noise / unbounded clipping (testing; epsilon is infinite).
    """

    clip_norm: float
    noise_multiplier: float
    sampling_rate: float = 1.0
    population: int | None = None
    sampling: Sampling = "poisson"
    placement: Placement = "central"
    denominator: Denominator = "expected"
    adaptive: AdaptiveClipping | None = None
    min_survivors: int | None = None
    colluding: int = 0
    value_bits: int = 24
    ring_bits: int = 64
    allow_non_private: bool = False

    def __post_init__(self) -> None:
        p: list[str] = []
        c, z = self.clip_norm, self.noise_multiplier
        if not (_real(c) and c > 0 and (math.isfinite(c) or self.allow_non_private)):
            p.append(f"clip_norm must be a finite float > 0, got {c!r}")
        problem = number_problem("noise_multiplier", z, low=0, low_open=not self.allow_non_private)
        if problem:
            p.append(problem)
        try:
            check_sampling_rate(self.sampling_rate)
        except ConfigError as err:
            p.extend(err.problems)
        problem = int_problem("population", self.population, low=1, optional=True)
        if problem:
            p.append(problem)
        if self.sampling not in ("poisson", "fixed_size"):
            p.append(f"sampling must be 'poisson' or 'fixed_size', got {self.sampling!r}")
        elif self.sampling == "fixed_size" and self.population is None:
            p.append("sampling='fixed_size' needs population (the number of clients N), got None")
        if self.placement not in ("central", "distributed"):
            p.append(f"placement must be 'central' or 'distributed', got {self.placement!r}")
        if self.denominator not in ("expected", "participants"):
            p.append(f"denominator must be 'expected' or 'participants', got {self.denominator!r}")
        elif self.denominator == "expected" and self.population is None:
            p.append("denominator='expected' needs population (the number of clients N), got None")
        if self.adaptive is not None:
            if not isinstance(self.adaptive, AdaptiveClipping):
                p.append(f"adaptive must be an AdaptiveClipping or None, got {type(self.adaptive).__name__}")
            elif _real(z) and z > 0 and not 2 * self.adaptive.count_noise_stddev > z:
                p.append(
                    f"adaptive.count_noise_stddev must be > noise_multiplier/2 = {z / 2:g}, "
                    f"got {self.adaptive.count_noise_stddev!r}"
                )
            elif _real(z) and z == 0:
                p.append("adaptive clipping needs noise_multiplier > 0, got 0")
        if self.placement == "distributed":
            problem = int_problem("min_survivors", self.min_survivors, low=1)
            if problem:
                p.append(f"{problem} (placement='distributed' needs it)")
            if _real(z) and z == 0:
                p.append("placement='distributed' needs noise_multiplier > 0, got 0")
            if _real(c) and not math.isfinite(c):
                p.append(f"placement='distributed' needs a finite clip_norm, got {c!r}")
        problem = int_problem("colluding", self.colluding, low=0)
        if problem:
            p.append(problem)
        if p:
            raise ConfigError.collect(p)
        FixedPointSpec(clip=1.0, value_bits=self.value_bits, ring_bits=self.ring_bits, max_weight=1)
        _store_plain(self, "clip_norm", "noise_multiplier", "sampling_rate", "population", "min_survivors",
                     "colluding", "value_bits", "ring_bits")

    @property
    def private(self) -> bool:
        return self.noise_multiplier > 0 and math.isfinite(self.clip_norm)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["adaptive"] = None if self.adaptive is None else asdict(self.adaptive)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClientDPConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown dp config key(s) {unknown}; known: {sorted(names)}")
        kwargs = dict(data)
        if isinstance(kwargs.get("adaptive"), Mapping):
            ad = kwargs["adaptive"]
            bad = sorted(set(ad) - {f.name for f in fields(AdaptiveClipping)})
            if bad:
                raise ConfigError(f"unknown dp.adaptive key(s) {bad}")
            kwargs["adaptive"] = AdaptiveClipping(**ad)
        if "clip_norm" not in kwargs or "noise_multiplier" not in kwargs:
            raise ConfigError("dp config needs clip_norm and noise_multiplier")
        return cls(**kwargs)

    def make_accountant(self, *, target_delta: float, epsilon_budget: float | None = None) -> PrivacyAccountant:
        """An accountant for this configuration (PLD for central, RDP for the distributed zCDP events)."""
        return PrivacyAccountant(
            target_delta=target_delta,
            epsilon_budget=epsilon_budget,
            backend="pld" if self.placement == "central" else "rdp",
            population=self.population,
        )


def _amplified_rate(config: ClientDPConfig) -> float:
    """The sampling rate the accounting may amplify by: ``q`` for Poisson sampling, 1 for a fixed-size sample
    (see :attr:`ClientDPConfig.sampling`)."""
    return config.sampling_rate if config.sampling == "poisson" else 1.0


def sample_fixed_size(client_ids: Sequence[int], size: int, rng: SecureRNG) -> list[int]:
    """A uniformly random ``size``-subset of ``client_ids`` without replacement (in the given order): the
    ``size`` smallest of one uniform draw per client."""
    ids = list(client_ids)
    size = check_int("size", size, low=0, high=len(ids))
    if size == len(ids):
        return ids
    draws = rng.uniform01(len(ids))
    chosen = set(np.argsort(draws, kind="stable")[:size].tolist())
    return [c for i, c in enumerate(ids) if i in chosen]


def sample_clients(client_ids: Sequence[int], sampling_rate: float, rng: SecureRNG) -> list[int]:
    """Poisson sampling: each client independently with probability ``q`` (what the accounting assumes)."""
    check_sampling_rate(sampling_rate)
    ids = list(client_ids)
    if sampling_rate == 1:
        return ids
    draws = rng.uniform01(len(ids))
    return [c for c, u in zip(ids, draws, strict=True) if u < sampling_rate]


def clip_to_norm(vector: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """``(v·min(1, C/‖v‖), ‖v‖)`` in float32 (norm computed in float64; a zero vector stays zero)."""
    v = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(v.astype(np.float64)))
    if not math.isfinite(clip_norm) or norm <= clip_norm:
        return v.copy(), norm
    out = (v.astype(np.float64) * (clip_norm / norm)).astype(np.float32)
    # float32 rounding may leave the norm a few ulps above C: shrink until it is not
    while float(np.linalg.norm(out.astype(np.float64))) > clip_norm:
        out = np.nextafter(out, np.float32(0))
    return out, norm


@dataclass(frozen=True, slots=True)
class DPRoundResult:
    """What :meth:`ClientLevelDP.finalize` releases for one round."""

    round_id: int
    update: np.ndarray
    epsilon: float
    event: Event
    participants: int
    clip_norm: float
    next_clip_norm: float
    unclipped_fraction: float | None


class ClientLevelDP:
    """The state of client-level DP across rounds: clip norm, round counter, and the accountant.

    Args:
        config: the :class:`ClientDPConfig`.
        accountant: where every round is recorded and the budget enforced (``None``: no accounting).
        rng: source of the central noise (default: a fresh OS-seeded :class:`SecureRNG`).
    """

    def __init__(
        self, config: ClientDPConfig, *, accountant: PrivacyAccountant | None = None, rng: SecureRNG | None = None
    ) -> None:
        if not isinstance(config, ClientDPConfig):
            raise ConfigError(f"config must be a ClientDPConfig, got {type(config).__name__}")
        if accountant is not None:
            if config.population is not None:
                validate_delta(accountant.target_delta, config.population, name="accountant.target_delta")
            accountant.check_supported(self._planned_event_for(config, config.clip_norm))
        self.config = config
        self.accountant = accountant
        self._rng = rng if rng is not None else SecureRNG()
        self.clip_norm = float(config.clip_norm)
        self.next_round = 0
        self._open: int | None = None
        self._dimension: int | None = None
        self._prepaid: Event | None = None
        self.quantisation_excess = 0.0
        self.upload_spec: FixedPointSpec | None = None
        """Distributed placement with a quantised upload (:meth:`use_upload`): the noised encoding."""
        self.rotation_block: int | None = None
        """The Hadamard block of a rotated upload (the noise covers the padded length), else ``None``."""

    # -- noise scales --------------------------------------------------------------------------------
    @property
    def update_noise_multiplier(self) -> float:
        """``z_Δ``: the noise multiplier seen by the update coordinates."""
        z = self.config.noise_multiplier
        if self.config.adaptive is None or z == 0:
            return z
        return (z**-2 - (2 * self.config.adaptive.count_noise_stddev) ** -2) ** -0.5

    @property
    def count_scale(self) -> float:
        """``k = z_Δ C / σ_b``: the clipped-count coordinate carries ``(b - ½)·k``."""
        if self.config.adaptive is None:
            return 0.0
        return self.update_noise_multiplier * self.clip_norm / self.config.adaptive.count_noise_stddev

    @property
    def sensitivity(self) -> float:
        """Joint L2 sensitivity of one client's vector: ``C`` or ``√(C² + k²/4)``."""
        return math.hypot(self.clip_norm, self.count_scale / 2)

    @property
    def noise_sensitivity(self) -> float:
        """The L2 sensitivity the central noise is calibrated to: :attr:`sensitivity` plus the
        post-quantisation excess ``√d'/s`` (:meth:`calibrate_to_encoding`) of what the server sums."""
        return self.sensitivity + self.quantisation_excess

    def calibrate_to_encoding(self, spec: FixedPointSpec, dimension: int) -> float:
        """Central placement: the server sums *stochastically rounded* fixed-point vectors, not the clipped
        floats. Rounding moves each of the ``d' = d (+1 with adaptive clipping)`` coordinates by less than
        one step ``1/s`` (``s = spec.scale``) and clipping coordinates to ``spec.clip`` only shrinks the
        vector, so one client's decoded contribution has L2 norm at most

            sens + √d' / s.

        The central noise ``z·(sens + √d'/s)`` is calibrated to that bound, so the recorded
        ``Gaussian(z)`` event is exact for what is summed. Returns the excess ``√d'/s`` (also stored in
        :attr:`quantisation_excess`; the release label states the sensitivity used). Distributed
        placement accounts the integer sensitivity itself (:func:`~fedguard.dp.distributed.integer_sensitivity`).
        """
        if not isinstance(spec, FixedPointSpec):
            raise ConfigError(f"spec must be a FixedPointSpec, got {type(spec).__name__}")
        d = check_int("dimension", dimension, low=1) + (1 if self.config.adaptive else 0)
        self.quantisation_excess = math.sqrt(d) / spec.scale if self.config.placement == "central" else 0.0
        return self.quantisation_excess

    def use_upload(self, upload: FixedPointSpec, *, dimension: int, n_clients: int, rotation: bool = False,
                   block: int = DEFAULT_BLOCK) -> FixedPointSpec:
        """Distributed placement through a quantised upload (``federation.upload_bits``/``rotation``): the
        noise is added in ``upload``'s ring at its public scale ``s = M/c``, to the rotated update of
        ``d' = padded_length(d)`` coordinates when ``rotation`` (the caller rotates, see
        :class:`fedguard.quantise.UploadPlan`), and the accountant counts ``Δ2 <= min(s·C, M·√d') + √d'``
        in those units. The value bits are the most that leave the noise room in the ring
        (:func:`~fedguard.dp.distributed.upload_spec_with_noise`); ``dimension`` is the update length
        ``d``, ``n_clients`` the most clients a sum may hold. Returns the noised encoding.

        Raises :class:`ConfigError` for central placement (it calibrates with :meth:`calibrate_to_encoding`)
        or adaptive clipping (its count coordinate, ``±k/2``, would be clipped to the upload's ``±c``), and
        :class:`~fedguard.errors.RingOverflowError` when the ring cannot carry the noise."""
        if self.config.placement != "distributed":
            raise ConfigError("use_upload is for placement='distributed' (central DP calibrates to the "
                              "encoding with calibrate_to_encoding)")
        if self.config.adaptive is not None:
            raise ConfigError("adaptive clipping does not compose with quantised uploads under distributed DP: its "
                              "count coordinate would be clipped to the upload's public range; drop dp.adaptive "
                              "or federation.upload_bits/rotation")
        d = check_int("dimension", dimension, low=1)
        block = check_int("block", block, low=1)
        self.rotation_block = block if rotation else None
        self.upload_spec = upload_spec_with_noise(
            upload, noise_multiplier=self.config.noise_multiplier, clip_norm=self.sensitivity,
            dimension=self.noised_dimension(d), min_survivors=int(self.config.min_survivors or 1),
            n_clients=max(check_int("n_clients", n_clients, low=1), self._max_clients()),
            colluding=self.config.colluding)
        return self.upload_spec

    def noised_dimension(self, dimension: int) -> int:
        """The length of the vector the distributed noise is added to: ``dimension``, or its padded length
        when the upload is rotated (:meth:`use_upload`)."""
        return dimension if self.rotation_block is None else padded_length(dimension, self.rotation_block)

    @property
    def coordinate_bound(self) -> float:
        """The largest magnitude any coordinate of a clipped vector can have."""
        return max(self.clip_norm, self.count_scale / 2)

    def fixed_point_spec(self) -> FixedPointSpec:
        """The round's encoding: coordinate range = :attr:`coordinate_bound`, weight 1 per client (distributed
        placement through a quantised upload: the noised upload encoding of :meth:`use_upload`)."""
        if self.upload_spec is not None:
            return self.upload_spec
        if not math.isfinite(self.coordinate_bound):
            raise ConfigError("no fixed-point spec for an unbounded clip norm: pass your own FixedPointSpec")
        return FixedPointSpec(
            clip=self.coordinate_bound, value_bits=self.config.value_bits, ring_bits=self.config.ring_bits, max_weight=1
        )

    def distributed_mechanism(self, dimension: int) -> DistributedDiscreteGaussian:
        """The round's per-client discrete Gaussian for an update of ``dimension`` coordinates (over the
        :meth:`noised_dimension` it travels as)."""
        if self.config.placement != "distributed":
            raise ConfigError(f"distributed_mechanism needs placement='distributed', got {self.config.placement!r}")
        return DistributedDiscreteGaussian(
            noise_multiplier=self.config.noise_multiplier,
            clip_norm=self.sensitivity,
            dimension=self.noised_dimension(dimension),
            spec=self.fixed_point_spec(),
            min_survivors=int(self.config.min_survivors or 1),
            colluding=self.config.colluding,
        )

    # -- events --------------------------------------------------------------------------------------
    @staticmethod
    def _planned_event_for(config: ClientDPConfig, clip_norm: float) -> Event:
        if not config.private:
            return NonPrivateEvent()
        if config.placement == "central":
            return gaussian_round_event(config.noise_multiplier, _amplified_rate(config))
        from fedguard.dp.events import ZCDPEvent

        return ZCDPEvent(0.5 / config.noise_multiplier**2)  # placeholder of the right kind for backend checks

    def round_event(self, n_survivors: int | None = None, dimension: int | None = None) -> Event:
        """The event of one round: central ``PoissonSampled(q, Gaussian(z))``; distributed the discrete
        Gaussian with ``n_survivors`` contributors (default: ``min_survivors``, the planned worst case)."""
        if not self.config.private:
            return NonPrivateEvent()
        if self.config.placement == "central":
            return gaussian_round_event(self.config.noise_multiplier, _amplified_rate(self.config))
        d = dimension if dimension is not None else self._dimension
        if d is None:
            raise ConfigError("the distributed event needs the vector dimension: call begin_round(r, dimension=d)")
        n = n_survivors if n_survivors is not None else int(self.config.min_survivors or 1)
        return self.distributed_mechanism(d).event(n)

    # -- the round -----------------------------------------------------------------------------------
    def begin_round(self, round_id: int, *, dimension: int | None = None) -> Event:
        """Check the budget for round ``round_id`` *before* anything is computed; returns the planned event.

        ``dimension`` (the update length) is required for distributed placement.
        Raises :class:`BudgetExceededError` when the round would overspend (state unchanged).
        """
        round_id = check_int("round_id", round_id, low=0)
        if self._open is not None:
            raise ConfigError(f"round {self._open} is still open: finalize it before beginning round {round_id}")
        if round_id < self.next_round:
            raise ConfigError(f"round {round_id} was already finalized (next round is {self.next_round})")
        dimension = check_int("dimension", dimension, low=1, optional=True)
        full_dim = None if dimension is None else dimension + (1 if self.config.adaptive else 0)
        if self.config.placement == "distributed" and full_dim is None:
            raise ConfigError("placement='distributed' needs begin_round(..., dimension=<update length>)")
        event = self.round_event(dimension=full_dim)
        if self.accountant is not None and self.accountant.would_exceed(event):
            raise BudgetExceededError(
                f"round {round_id} would raise epsilon from {self.accountant.epsilon():.4g} to "
                f"{self.accountant.epsilon_if(event):.4g} at delta={self.accountant.target_delta:g}, over the "
                f"budget {self.accountant.epsilon_budget:g}: stop before this round (keep the last checkpoint)"
            )
        if self.config.placement == "distributed" and full_dim is not None:
            self.distributed_mechanism(full_dim).check_headroom(self._max_clients())
        self._open = round_id
        self._dimension = full_dim
        return event

    def abandon_round(self) -> None:
        """Forget a round opened by :meth:`begin_round` that released nothing (e.g. training diverged before
        aggregation); nothing more is accounted, and the same round may be begun again. A write-ahead
        record (:meth:`prepay`) stays in the ledger unless the caller retracts it."""
        self._open = None
        self._dimension = None
        self._prepaid = None

    def release_label(self, round_id: int) -> str:
        """The ledger label of round ``round_id``'s release (states the sensitivity the noise used)."""
        if self.config.placement == "central":
            # the clip norm itself (adaptive: per round) is in the round's DPRoundResult and checkpoint
            q = _amplified_rate(self.config)
            sampled = f", Poisson-sampled q={q:g}" if q < 1 else (
                ", fixed-size sample (not amplified)" if self.config.sampling_rate < 1 else "")
            return (f"round {round_id}: central Gaussian z={self.config.noise_multiplier:g} x sensitivity "
                    f"(clip sensitivity + post-quantisation excess {self.quantisation_excess:.4g}){sampled}")
        upload = "" if self.upload_spec is None else (
            f", in the {self.upload_spec.ring_bits}-bit upload ring at {self.upload_spec.value_bits}-bit values"
            f"{', rotated' if self.rotation_block is not None else ''}")
        return (f"round {round_id}: distributed discrete Gaussian, planned for min_survivors="
                f"{self.config.min_survivors}{upload}")

    def prepay(self) -> tuple[Event, str]:
        """Write-ahead accounting: record the open round's planned event *now*, before any release.

        Central placement records exactly the event :meth:`finalize` would; distributed placement the
        event with ``min_survivors`` contributors, the worst case the aggregator may reveal (its
        ``RoundSpec.min_contributors`` is set to ``min_survivors``: fewer survivors abort before decoding;
        more survivors only add noise). :meth:`finalize` then records nothing more. Raises
        :class:`BudgetExceededError` (ledger unchanged) when the round would overspend. Returns the event
        and its label (to retract it if the round provably released nothing)."""
        if self._open is None:
            raise ConfigError("prepay before begin_round")
        if self._prepaid is not None:
            raise ConfigError(f"round {self._open} is already accounted")
        event = self.round_event()
        label = self.release_label(self._open)
        if self.accountant is not None:
            self.accountant.spend(event, label=label, sensitivity=self.release_sensitivity())
        self._prepaid = event
        return event, label

    def release_sensitivity(self) -> float | None:
        """The L2 sensitivity of one client's contribution to the released *sum*, in update units, that the
        round's noise is calibrated to (stored in the ledger entry). Central: :attr:`noise_sensitivity`
        (clip, adaptive count coordinate, post-quantisation excess). Distributed: the integer sensitivity
        ``Δ2`` of :func:`~fedguard.dp.distributed.integer_sensitivity` divided by the encoding's scale."""
        if self.config.placement == "central" or self._dimension is None:
            sens = float(self.noise_sensitivity)
            return sens if math.isfinite(sens) else None  # allow_non_private: an unbounded clip
        l2, _ = self.distributed_mechanism(self._dimension).sensitivity
        return float(l2 / self.fixed_point_spec().scale)

    def _max_clients(self) -> int:
        pop = self.config.population
        return pop if pop is not None else max(int(self.config.min_survivors or 1), 1)

    def clip(self, update: ClientUpdate) -> ClientUpdate:
        """The client's clipped update (weight 1), with the clipped-count coordinate under adaptive clipping."""
        if not isinstance(update, ClientUpdate):
            raise InvalidUpdateError(f"update must be a ClientUpdate, got {type(update).__name__}")
        clipped, norm = clip_to_norm(update.vector, self.clip_norm)
        if self.config.adaptive is not None:
            bit = 1.0 if norm <= self.clip_norm else 0.0
            clipped = np.concatenate([clipped, np.array([(bit - 0.5) * self.count_scale], dtype=np.float32)])
        return ClientUpdate(update.client_id, update.round, clipped, 1)

    def noise_for_client(self, clipped: ClientUpdate, *, rng: SecureRNG, quantise_rng: SecureRNG | None = None) -> np.ndarray:
        """Distributed placement: the client's ring input ``[q + ξ mod 2^k, 1]`` for any aggregator.

        Encode with :meth:`fixed_point_spec`; the noise is the client's share of the discrete Gaussian.
        """
        if self._open is None or self._dimension is None:
            raise ConfigError("noise_for_client before begin_round(r, dimension=d)")
        if clipped.vector.size != self.noised_dimension(self._dimension):
            raise InvalidUpdateError(
                f"client {clipped.client_id}: clipped vector has length {clipped.vector.size}, expected "
                f"{self.noised_dimension(self._dimension)} (pass the output of clip(), rotated when the upload is)"
            )
        return self.distributed_mechanism(self._dimension).encode_noised(clipped.vector, rng=rng, quantise_rng=quantise_rng)

    def finalize(self, aggregate: Any, total_weight: int | None = None) -> DPRoundResult:
        """Turn the aggregator's mean of clipped updates into the released DP update, and account it.

        Args:
            aggregate: the decoded mean (``np.ndarray``) or an object with ``.mean`` and ``.total_weight``
                (e.g. :class:`~fedguard.federation.FedAvgOutcome`).
            total_weight: the number of contributors ``m`` when ``aggregate`` is an array.

        Central placement adds ``N(0, (z·sens)²)`` here, after :meth:`PrivacyAccountant.spend` has
        accepted the round (so an over-budget round releases nothing). Distributed placement records the
        event with the actual contributors; fewer than ``min_survivors`` raises
        :class:`InsufficientNoiseError` after recording it.
        """
        if self._open is None:
            raise ConfigError("finalize without begin_round: every round must be opened (and budget-checked) first")
        mean: Any
        if isinstance(aggregate, np.ndarray):
            mean, m = aggregate, total_weight
        else:
            mean, m = getattr(aggregate, "mean", None), getattr(aggregate, "total_weight", total_weight)
        if not isinstance(mean, np.ndarray) or mean.ndim != 1:
            raise InvalidUpdateError(f"aggregate must be a 1-D array or have a 1-D .mean, got {type(mean).__name__}")
        # an empty Poisson sample (central, fixed denominator) still releases: noise only, and it is accounted
        empty_ok = self.config.placement == "central" and self.config.denominator == "expected"
        m = check_int("total_weight (the number of contributors)", m, low=0 if empty_ok else 1)
        width = mean.size
        if self._dimension is not None and width != self._dimension:
            raise InvalidUpdateError(f"aggregate has length {width}, expected {self._dimension}")
        round_id = self._open
        event = self.round_event(n_survivors=m, dimension=width)
        if self.config.placement == "distributed" and m < int(self.config.min_survivors or 1):
            # the aggregator should have refused to reveal this (RoundSpec.min_contributors); it did not, so
            # the server has seen an under-noised sum: the ledger never lies
            if self.accountant is not None:
                self.accountant.record(event, label=f"round {round_id} (under-noised: {m} survivors)",
                                       sensitivity=self.release_sensitivity())
            self._open = None
            self._prepaid = None
            self.next_round = round_id + 1
            raise InsufficientNoiseError(
                f"round {round_id}: only {m} clients contributed noise, planned for min_survivors="
                f"{self.config.min_survivors}; the event was recorded, discard this aggregate and stop",
                round_id=round_id,
            )
        epsilon = math.nan
        if self.accountant is not None:
            if self._prepaid is None:
                try:
                    self.accountant.spend(event, label=self.release_label(round_id),
                                          sensitivity=self.release_sensitivity())
                except BudgetExceededError:
                    self._open = None
                    raise
            epsilon = self.accountant.epsilon()
        total = mean.astype(np.float64) * m
        if self.config.placement == "central" and self.config.noise_multiplier > 0:
            total = total + self._rng.normal(width, std=self.config.noise_multiplier * self.noise_sensitivity)
        denom = self._denominator(m)
        d = width - (1 if self.config.adaptive else 0)
        update = (total[:d] / denom).astype(np.float32)
        clip_used = self.clip_norm
        fraction = None
        if self.config.adaptive is not None:
            unclipped = total[d] / self.count_scale + m / 2.0
            fraction = float(unclipped / denom)
            ad = self.config.adaptive
            self.clip_norm = float(self.clip_norm * math.exp(-ad.learning_rate * (fraction - ad.target_quantile)))
        self._open = None
        self._prepaid = None
        self.next_round = round_id + 1
        return DPRoundResult(round_id, update, epsilon, event, m, clip_used, self.clip_norm, fraction)

    def _denominator(self, m: int) -> float:
        """``D``: ``m`` (participants) or the public expected count ``q·N`` (``k`` for a fixed-size sample)."""
        if self.config.denominator == "participants":
            return float(m)
        expected = self.config.sampling_rate * float(self.config.population or 1)
        return float(round(expected)) if self.config.sampling == "fixed_size" else expected

    # -- checkpointing -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state (config, clip norm, next round, ledger) to save with every checkpoint."""
        return {
            "config": self.config.to_dict(),
            "clip_norm": self.clip_norm,
            "next_round": self.next_round,
            "accountant": None if self.accountant is None else self.accountant.to_dict(),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], *, rng: SecureRNG | None = None) -> ClientLevelDP:
        unknown = sorted(set(state) - {"config", "clip_norm", "next_round", "accountant"})
        if unknown:
            raise ConfigError(f"unknown ClientLevelDP state key(s) {unknown}")
        acc = None if state.get("accountant") is None else PrivacyAccountant.from_dict(state["accountant"])
        dp = cls(ClientDPConfig.from_dict(state["config"]), accountant=acc, rng=rng)
        clip = state["clip_norm"]
        if not (_real(clip) and clip > 0):
            raise ConfigError(f"clip_norm in state must be > 0, got {clip!r}")
        dp.clip_norm = float(clip)
        dp.next_round = int(state["next_round"])
        return dp
