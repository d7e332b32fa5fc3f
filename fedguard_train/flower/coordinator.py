"""The server's trainer when the clients are remote: the same run, rounds driven over a network.

:func:`remote_trainer` builds the configured trainer (FedHomoLLM, ...) with the run's hooks as the
coordinator — its run loop, resume from checkpoints, evaluation, budget stop, metrics and checkpoints
unchanged — but whose rounds go through :func:`fedguard_train.flower.rounds.remote_round` over a
:class:`~fedguard_train.flower.rounds.StageExchange` instead of training every client in this process.
The server never trains: its model only holds the global adapter, for evaluation and checkpoints.

:meth:`RemoteRounds._round_result` overrides only the base's round seam (participant selection, an empty
Poisson sample's noise-only round, the aggregation); the base keeps the round row, evaluation, the hooks'
round end and the atomic checkpoint. The first stage carries the hooks' per-round values to the clients
(the DP clip norm, :mod:`fedguard_train.flower.dp_split`).
"""

from __future__ import annotations

from typing import Any

from fedguard.errors import ConfigError
from fedguard.federation.round import RoundResult
from fedguard_train.config import TrainConfig
from fedguard_train.flower.dp_split import extra_coordinates, round_parameters
from fedguard_train.flower.rounds import DropLog, StageExchange, Timeouts, remote_round
from fedguard_train.trainers.base import Trainer


class RemoteRounds(Trainer):
    """Mixin placed before a concrete trainer class: rounds over :attr:`exchange`."""

    exchange: StageExchange
    timeouts: Timeouts
    drops: DropLog

    def _remote_result(self, round_id: int) -> RoundResult:
        chosen = self.participants(round_id)
        if not chosen:
            return self._empty_round(round_id)
        return remote_round(round_id, self.global_vector(), chosen, self._require_aggregator(), self.spec,
                            self.exchange, hooks=self.hooks, load=self.load, timeouts=self.timeouts,
                            min_contributors=self.hooks.min_contributors, upload=self.upload, drops=self.drops,
                            parameters=round_parameters(self.hooks), extra_coordinates=extra_coordinates(self.hooks))

    def _require_aggregator(self) -> Any:
        if self.aggregator is None:
            raise ConfigError("the trainer's aggregator is closed")
        return self.aggregator

    def _round_result(self, round_id: int) -> tuple[RoundResult, float | None]:
        """The round over the exchange (one round trip per protocol stage); the base does the rest (abort
        handling, server step, evaluation, hooks, checkpoint)."""
        return self._remote_result(round_id), None


def remote_trainer(config: TrainConfig, exchange: StageExchange, *, timeouts: Timeouts | None = None,
                   quiet: bool = True) -> RemoteRounds:
    """The configured trainer, with the run's hooks, whose rounds go over ``exchange``."""
    from fedguard_train.privacy import hooks_from_config
    from fedguard_train.trainers import trainer_class

    base = trainer_class(config.trainer)
    cls = type(f"Remote{base.__name__}", (RemoteRounds, base), {})
    trainer: RemoteRounds = cls(config, hooks=hooks_from_config(config), quiet=quiet)
    trainer.exchange = exchange
    trainer.timeouts = timeouts if timeouts is not None else Timeouts()
    trainer.drops = DropLog()
    return trainer
