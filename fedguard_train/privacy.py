"""Privacy components attached to the trainer from a run config (``dp:``, ``watermark:`` sections).

``dp:`` (client-level DP-FedAvg, McMahan et al. ICLR 2018; see ``fedguard.dp``)::

    dp:
      clip_norm: 0.5            # C: each client's update is clipped to this L2 norm
      noise_multiplier: 1.0     # z: Gaussian noise z·C on the sum, added by the server (central placement)
      target_delta: 1.0e-3      # delta of the reported epsilon (must be < 1/clients)
      epsilon_budget: 8.0       # optional: the run stops before a round that would exceed it
      backend: pld              # pld | rdp | prv

Every client takes part in every round here (sampling rate 1); the round table reports epsilon after
each round; the ledger is saved with every checkpoint and restored on ``--resume``. Distributed
placement (noise added by the clients inside secure aggregation) is available in the library
(``ClientLevelDP.noise_for_client``) but not yet wired into the trainer: asking for it is an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedguard.errors import ConfigError
from fedguard.rng import SecureRNG
from fedguard.updates import ClientUpdate
from fedguard_train.config import TrainConfig
from fedguard_train.hooks import TrainerHook

_DP_TRAINER_KEYS = {"target_delta", "epsilon_budget", "backend"}


class ClientDPHook(TrainerHook):
    """Client-level DP-FedAvg with central noise and a budgeted accountant, as a trainer hook."""

    name = "dp"

    def __init__(self, section: Mapping[str, Any], *, n_clients: int) -> None:
        from fedguard.dp import ClientDPConfig, ClientLevelDP, PrivacyAccountant

        raw = dict(section)
        if "target_delta" not in raw:
            raise ConfigError(f"dp.target_delta is required (a delta below 1/{n_clients})")
        trainer_keys = {k: raw.pop(k) for k in list(raw) if k in _DP_TRAINER_KEYS}
        raw.setdefault("population", n_clients)
        raw.setdefault("denominator", "participants")
        config = ClientDPConfig.from_dict(raw)
        problems = []
        if config.placement != "central":
            problems.append("dp.placement must be 'central' in the trainer for now (distributed placement is a "
                            "library API: fedguard.dp.ClientLevelDP.noise_for_client)")
        if config.sampling_rate != 1.0:
            problems.append(f"dp.sampling_rate must be 1.0 (every client trains every round), got {config.sampling_rate}")
        if config.population != n_clients:
            problems.append(f"dp.population must equal federation.clients={n_clients}, got {config.population}")
        if problems:
            raise ConfigError.collect(problems)
        accountant = PrivacyAccountant(target_delta=float(trainer_keys["target_delta"]),
                                       epsilon_budget=trainer_keys.get("epsilon_budget"),
                                       backend=trainer_keys.get("backend", "pld"), population=n_clients)
        self._trainer_keys = trainer_keys
        self.dp = ClientLevelDP(config, accountant=accountant, rng=SecureRNG())
        self._last: Any = None

    def on_round_start(self, round_id: int, participants: Sequence[int]) -> None:
        self.dp.abandon_round()  # a previous attempt that aborted before aggregation released nothing
        self.dp.begin_round(round_id)  # raises BudgetExceededError before anything is trained

    def client_update(self, update: ClientUpdate) -> ClientUpdate:
        return self.dp.clip(update)

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
        hooks.append(ClientDPHook(config.dp, n_clients=config.federation.clients))
    if config.watermark:
        from fedguard_train.watermarking import WatermarkHook

        hooks.append(WatermarkHook(config.watermark, config=config))
    return hooks
