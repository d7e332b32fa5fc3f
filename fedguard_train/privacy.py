"""Privacy components attached to the trainer from a run config (``dp:``, ``watermark:`` sections).

``dp:`` (client-level DP-FedAvg, McMahan et al. ICLR 2018; see ``fedguard.dp``)::

    dp:
      clip_norm: 0.5            # C: each client's update is clipped to this L2 norm
      noise_multiplier: 1.0     # z: Gaussian noise z·C on the sum, added by the server (central placement)
      target_delta: 1.0e-3      # delta of the reported epsilon (must be < 1/clients)
      epsilon_budget: 8.0       # optional: the run stops before a round that would exceed it
      backend: pld              # pld | rdp | prv

Distributed placement (DP-FedAvg with the distributed discrete Gaussian, Kairouz, Liu, Steinke, ICML
2021): each client clips, quantises into the ring of the secure aggregator and adds its share of
discrete-Gaussian noise there, with randomness from the OS, so the server only ever decodes a noised
sum; nobody adds noise after aggregation. It needs a secure aggregator (``masking``, ``paillier`` or
``mpc``: with ``plaintext`` the server would see each client's under-noised update) and is accounted as
zCDP on the RDP backend::

    dp:
      placement: distributed
      clip_norm: 0.5
      noise_multiplier: 1.0     # total noise of min_survivors clients = z · sensitivity (integer units)
      min_survivors: 3          # default: every client (federation.clients)
      value_bits: 24            # the ring encoding of the noised updates (ring_bits: 64)
      target_delta: 1.0e-3

Client sampling (``federation.sample_rate`` or ``federation.clients_per_round``; the trainer's
``participants``): central placement with a Poisson sample is accounted as ``PoissonSampled(q, Gaussian(z))``
and divides the noised sum by the public expected count ``q·N`` (an empty sample releases noise only, and
is accounted); a fixed-size sample of ``k`` divides by ``k`` and is accounted without amplification;
distributed placement is never amplified (the server draws the sample). The round table reports epsilon
after each round's event is on disk; the ledger is saved with every checkpoint and restored on ``--resume``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedguard.encoding import FixedPointSpec
from fedguard.errors import ConfigError, ProtocolAbort
from fedguard.federation.protocol import Aggregator
from fedguard.rng import SecureRNG
from fedguard.updates import ClientUpdate
from fedguard_train.config import DPSection, TrainConfig, section_from_mapping
from fedguard_train.engine import TrainingDiverged
from fedguard_train.hooks import RingEncoding, TrainerHook

LEDGER_FILE = "privacy_ledger.json"
"""The write-ahead ledger's file name in the run directory."""

FAULT_POINTS: tuple[str, ...] = ("round_start", "ledger_persisted", "released", "finalized", "round_end")
"""The step boundaries of a DP round at which a fault-injection callback runs (in this order):
before anything; after the write-ahead record is on disk (clients then train and the aggregator runs);
after the aggregator revealed the sum, before the DP post-processing; after it; after the round's metrics,
before the trainer's checkpoint."""


class ClientDPHook(TrainerHook):
    """Client-level DP-FedAvg with central or distributed noise and a budgeted accountant, as a trainer hook.

    Release guard: with distributed noise the aggregator must not reveal a sum with fewer than
    ``min_survivors`` clients' noise. :meth:`check_aggregator` refuses, at construction, an aggregator whose
    reveal threshold is below ``min_survivors``; :attr:`min_contributors` is what the trainer puts in every
    round's ``RoundSpec.min_contributors``, so an aggregator aborts *before decoding* a round with fewer
    survivors (:class:`~fedguard.errors.ProtocolAbort`).

    Write-ahead ledger (``ledger_path``, :mod:`fedguard.dp.ledger`): the round's event is recorded and
    ``fsync``-ed at round start, before any client sends anything; :meth:`on_round_aborted` retracts it when
    the round provably released nothing.
    """

    name = "dp"

    def __init__(self, section: DPSection | Mapping[str, Any], *, n_clients: int, aggregator: str = "plaintext",
                 aggregator_options: Any = None,
                 noise_rng: Callable[[int], SecureRNG] | None = None,
                 ledger_path: str | os.PathLike[str] | None = None,
                 fault: Callable[[str], None] | None = None,
                 sample_rate: float | None = None, clients_per_round: int | None = None,
                 upload_bits: int | None = None, rotation: bool = False) -> None:
        """``section``: the typed ``dp:`` section (a plain mapping is checked into one).
        ``noise_rng(client_id)``: where a client's distributed noise comes from (default: a fresh
        :class:`SecureRNG` on OS entropy per client and round; tests pass a seeded one to be repeatable).
        ``ledger_path``: the write-ahead ledger file (``None``: the ledger lives only in checkpoints).
        ``fault(point)``: called at each of :data:`FAULT_POINTS` (fault injection in tests).
        ``sample_rate`` / ``clients_per_round``: the federation's client sampling (see the module doc).
        ``upload_bits`` / ``rotation``: the federation's quantised upload; distributed noise then goes into
        the upload's ring at its public scale (:meth:`fedguard.dp.ClientLevelDP.use_upload`)."""
        from fedguard.dp import ClientLevelDP, PrivacyAccountant
        from fedguard.dp.ledger import WriteAheadLedger

        if not isinstance(section, DPSection):
            section = section_from_mapping(DPSection, section, "dp")
        problems = section.problems_with(n_clients=n_clients, aggregator=aggregator,
                                         aggregator_options=aggregator_options or {},
                                         sample_rate=sample_rate, clients_per_round=clients_per_round)
        if problems:
            raise ConfigError.collect(problems)
        config = section.client_config(n_clients, sample_rate=sample_rate, clients_per_round=clients_per_round)
        accountant = PrivacyAccountant(target_delta=section.target_delta, epsilon_budget=section.epsilon_budget,
                                       backend=section.accounting_backend, population=n_clients)
        self.section = section
        self.n_clients = n_clients
        self.dp = ClientLevelDP(config, accountant=accountant, rng=SecureRNG())
        self._last: Any = None
        self._dimension: int | None = None
        self._noise_rng = noise_rng if noise_rng is not None else (lambda client_id: SecureRNG())
        self.ledger = None if ledger_path is None else WriteAheadLedger(ledger_path)
        self._fault = fault
        self._pending: tuple[int, str] | None = None  # (round, label) of a write-ahead record not yet released
        self._reconciled = False
        self._quantised_upload = upload_bits is not None or bool(rotation)
        self._rotation = bool(rotation)
        self._upload: FixedPointSpec | None = None

    def _at(self, point: str) -> None:
        if self._fault is not None:
            self._fault(point)

    @property
    def distributed(self) -> bool:
        return self.dp.config.placement == "distributed"

    @property
    def min_contributors(self) -> int:
        """The fewest clients whose inputs may be in a revealed sum: ``min_survivors`` (distributed), 1
        (central: the noise is added after aggregation and does not depend on the count)."""
        return int(self.dp.config.min_survivors or 1) if self.distributed else 1

    def check_aggregator(self, aggregator: Aggregator, n_clients: int) -> None:
        """Refuse an aggregator that could reveal a sum with fewer clients' noise than planned: its
        threshold (fewest clients that must reply at every stage) must be >= ``min_survivors``."""
        if not self.distributed:
            return
        t = aggregator.threshold(n_clients)
        need = self.min_contributors
        if t < need:
            option = {"masking": "threshold", "masking-signed": "threshold", "paillier": "min_clients",
                      "mpc": "min_clients"}.get(getattr(aggregator, "name", ""))
            fix = (f"set federation.aggregator_options.{option} >= {need}" if option is not None
                   else f"raise the aggregator's reveal threshold to >= {need}")
            raise ConfigError(
                f"dp.min_survivors={need}: each client adds 1/{need} of the noise variance, but aggregator "
                f"{aggregator.label!r} reveals a sum from as few as {t} of {n_clients} clients, which would be "
                f"under-noised; {fix} or lower dp.min_survivors to {t}"
            )

    def on_layout(self, dimension: int) -> None:
        self._dimension = dimension

    def on_encoding(self, spec: FixedPointSpec, dimension: int) -> None:
        """The trainer's fixed-point encoding (central placement sums it): calibrate the noise to the
        post-quantisation sensitivity (:meth:`fedguard.dp.ClientLevelDP.calibrate_to_encoding`). Distributed
        placement with a quantised or rotated upload adds its noise in that upload's ring instead
        (:meth:`fedguard.dp.ClientLevelDP.use_upload`, over the update length from :meth:`on_layout`)."""
        self.dp.calibrate_to_encoding(spec, dimension)
        if self.distributed and self._quantised_upload:
            if self._dimension is None:
                raise ConfigError("distributed DP needs the update dimension: the trainer calls on_layout first")
            self._upload = spec
            self.dp.use_upload(spec, dimension=self._dimension, n_clients=self.n_clients, rotation=self._rotation)

    def on_round_start(self, round_id: int, participants: Sequence[int]) -> None:
        self._at("round_start")
        self.dp.abandon_round()  # a previous attempt that aborted before aggregation released nothing
        self._pending = None
        if self.distributed and self._dimension is None:
            raise ConfigError("distributed DP needs the update dimension: the trainer calls on_layout first")
        # raises BudgetExceededError before anything is trained (and, distributed, RingOverflowError when
        # the noised sum could wrap the ring)
        if self.ledger is not None and not self._reconciled:
            # a run killed before its first checkpoint left only the ledger file: continue from it
            self.dp.accountant = self.ledger.reconcile(self.dp.accountant)
            self._reconciled = True
        self.dp.begin_round(round_id, dimension=self._dimension if self.distributed else None)
        if self.ledger is not None and self.dp.accountant is not None:
            _, label = self.dp.prepay()  # BudgetExceededError here: nothing recorded or released
            self._pending = (round_id, label)
            self.ledger.persist(self.dp.accountant)  # durable before any client sends anything
        self._at("ledger_persisted")

    def on_round_aborted(self, round_id: int, error: BaseException) -> None:
        """Retract the round's write-ahead record only when nothing can have been decoded: a diverged
        client (nothing reached the aggregator) or a :class:`ProtocolAbort` with ``nothing_revealed``.
        Any other failure, including an abort after a party may have decrypted or unmasked a sum (a
        Paillier key holder refusing an overfull slot), keeps the record: over-counting is safe."""
        self.dp.abandon_round()
        provably_unreleased = isinstance(error, TrainingDiverged) or (
            isinstance(error, ProtocolAbort) and error.nothing_revealed)
        if provably_unreleased and self._pending is not None and self._pending[0] == round_id \
                and self.ledger is not None and self.dp.accountant is not None:
            self.ledger.retract(self.dp.accountant, self._pending[1])
        self._pending = None

    def client_update(self, update: ClientUpdate) -> ClientUpdate:
        return self.dp.clip(update)

    def ring_encoding(self) -> RingEncoding | None:
        """Distributed placement: ``[q + ξ mod 2^k, 1]`` per client; ξ drawn from OS entropy (a seeded
        noise stream would let anyone who knows the seed subtract it)."""
        if not self.distributed:
            return None

        def encode(update: ClientUpdate, quantise_rng: SecureRNG) -> np.ndarray:
            return self.dp.noise_for_client(update, rng=self._noise_rng(update.client_id), quantise_rng=quantise_rng)

        return RingEncoding(self.dp.fixed_point_spec(), encode)

    def aggregate(self, round_id: int, mean: np.ndarray, contributors: Sequence[int]) -> np.ndarray:
        """The DP release of the round. ``contributors`` empty: an empty Poisson sample (the trainer passes a
        zero mean) — central placement still releases ``N(0, (z·sens)²)/(q·N)``, already accounted."""
        self._pending = None  # released: the record stays whatever happens next
        self._at("released")
        if not contributors and self.dp.config.adaptive is not None:
            mean = np.zeros(mean.size + 1, dtype=mean.dtype)  # the (empty) clipped-count coordinate
        self._last = self.dp.finalize(mean, total_weight=len(contributors))
        if self.ledger is not None and self.dp.accountant is not None:
            self.ledger.persist(self.dp.accountant)  # no-op content-wise unless finalize recorded more
        self._at("finalized")
        return self._last.update

    def on_round_end(self, round_id: int, model: torch.nn.Module, metrics: dict[str, Any]) -> None:
        if self._last is not None:
            # the accountant's epsilon, read after the round's event is on disk (write-ahead ledger)
            metrics["epsilon"] = float(self.dp.accountant.epsilon()) if self.dp.accountant is not None \
                else float(self._last.epsilon)
            metrics["dp_clip_norm"] = float(self._last.clip_norm)
        self._at("round_end")

    def state_dict(self) -> dict[str, Any]:
        return self.dp.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the checkpoint's DP state; with a write-ahead ledger, continue from the ledger file, which
        must extend the checkpoint's ledger (it also holds releases made after that checkpoint)."""
        from fedguard.dp import ClientLevelDP

        if state:
            excess = self.dp.quantisation_excess
            self.dp = ClientLevelDP.from_state_dict(state, rng=SecureRNG())
            self.dp.quantisation_excess = excess
            if self._upload is not None and self._dimension is not None:  # the run's upload, as on_encoding set it
                self.dp.use_upload(self._upload, dimension=self._dimension, n_clients=self.n_clients,
                                   rotation=self._rotation)
        if self.ledger is not None:
            self.dp.accountant = self.ledger.reconcile(self.dp.accountant)
            self._reconciled = True


def hooks_from_config(config: TrainConfig) -> list[TrainerHook]:
    """The privacy hooks a run config asks for."""
    hooks: list[TrainerHook] = []
    if config.dp:
        hooks.append(ClientDPHook(config.dp, n_clients=config.n_parties,
                                  aggregator=config.federation.aggregator,
                                  aggregator_options=config.federation.aggregator_options,
                                  ledger_path=Path(config.run_dir) / LEDGER_FILE, **config.sampling_options,
                                  upload_bits=config.federation.upload_bits, rotation=config.federation.rotation))
    if config.watermark:
        from fedguard_train.watermarking import WatermarkHook

        hooks.append(WatermarkHook(config.watermark, config=config))
    return hooks
