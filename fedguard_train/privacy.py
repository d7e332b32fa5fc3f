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

Every client takes part in every round here (sampling rate 1); the round table reports epsilon after
each round; the ledger is saved with every checkpoint and restored on ``--resume``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedguard.errors import ConfigError
from fedguard.rng import SecureRNG
from fedguard.updates import ClientUpdate
from fedguard_train.config import DPSection, TrainConfig, section_from_mapping
from fedguard_train.hooks import RingEncoding, TrainerHook


class ClientDPHook(TrainerHook):
    """Client-level DP-FedAvg with central or distributed noise and a budgeted accountant, as a trainer hook."""

    name = "dp"

    def __init__(self, section: DPSection | Mapping[str, Any], *, n_clients: int, aggregator: str = "plaintext",
                 aggregator_options: Any = None,
                 noise_rng: Callable[[int], SecureRNG] | None = None) -> None:
        """``section``: the typed ``dp:`` section (a plain mapping is checked into one).
        ``noise_rng(client_id)``: where a client's distributed noise comes from (default: a fresh
        :class:`SecureRNG` on OS entropy per client and round; tests pass a seeded one to be repeatable)."""
        from fedguard.dp import ClientLevelDP, PrivacyAccountant

        if not isinstance(section, DPSection):
            section = section_from_mapping(DPSection, section, "dp")
        problems = section.problems_with(n_clients=n_clients, aggregator=aggregator,
                                         aggregator_options=aggregator_options or {})
        if problems:
            raise ConfigError.collect(problems)
        config = section.client_config(n_clients)
        accountant = PrivacyAccountant(target_delta=section.target_delta, epsilon_budget=section.epsilon_budget,
                                       backend=section.accounting_backend, population=n_clients)
        self.section = section
        self.dp = ClientLevelDP(config, accountant=accountant, rng=SecureRNG())
        self._last: Any = None
        self._dimension: int | None = None
        self._noise_rng = noise_rng if noise_rng is not None else (lambda client_id: SecureRNG())

    @property
    def distributed(self) -> bool:
        return self.dp.config.placement == "distributed"

    def on_layout(self, dimension: int) -> None:
        self._dimension = dimension

    def on_round_start(self, round_id: int, participants: Sequence[int]) -> None:
        self.dp.abandon_round()  # a previous attempt that aborted before aggregation released nothing
        if self.distributed and self._dimension is None:
            raise ConfigError("distributed DP needs the update dimension: the trainer calls on_layout first")
        # raises BudgetExceededError before anything is trained (and, distributed, RingOverflowError when
        # the noised sum could wrap the ring)
        self.dp.begin_round(round_id, dimension=self._dimension if self.distributed else None)

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
        self._last = self.dp.finalize(mean, total_weight=len(contributors))
        return self._last.update

    def on_round_end(self, round_id: int, model: torch.nn.Module, metrics: dict[str, Any]) -> None:
        if self._last is not None:
            metrics["epsilon"] = float(self._last.epsilon)
            metrics["dp_clip_norm"] = float(self._last.clip_norm)

    def state_dict(self) -> dict[str, Any]:
        return self.dp.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from fedguard.dp import ClientLevelDP

        if state:
            self.dp = ClientLevelDP.from_state_dict(state, rng=SecureRNG())


def hooks_from_config(config: TrainConfig) -> list[TrainerHook]:
    """The privacy hooks a run config asks for."""
    hooks: list[TrainerHook] = []
    if config.dp:
        hooks.append(ClientDPHook(config.dp, n_clients=config.n_parties,
                                  aggregator=config.federation.aggregator,
                                  aggregator_options=config.federation.aggregator_options))
    if config.watermark:
        from fedguard_train.watermarking import WatermarkHook

        hooks.append(WatermarkHook(config.watermark, config=config))
    return hooks
