"""The server's trainer when the clients are remote: the same run, rounds driven over a network.

:func:`remote_trainer` builds the configured trainer (FedHomoLLM, ...) with the run's hooks as the
coordinator — its run loop, resume from checkpoints, evaluation, budget stop, metrics and checkpoints
unchanged — but whose rounds go through :func:`fedguard_train.flower.rounds.remote_round` over a
:class:`~fedguard_train.flower.rounds.StageExchange` instead of training every client in this process.
The server never trains: its model only holds the global adapter, for evaluation and checkpoints.

:meth:`RemoteRounds._round` mirrors :meth:`Trainer._round` (participant selection, an empty Poisson
sample's noise-only round, the round row, evaluation, the hooks' round end, the atomic checkpoint); only
the aggregation step differs.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fedguard.errors import ConfigError, ProtocolAbort
from fedguard.federation.round import RoundResult
from fedguard_train.checkpoint import save_checkpoint
from fedguard_train.config import TrainConfig
from fedguard_train.engine import TrainingDiverged, gathered
from fedguard_train.flower.rounds import DropLog, StageExchange, Timeouts, remote_round
from fedguard_train.trainers.base import Trainer


class RemoteRounds(Trainer):
    """Mixin placed before a concrete trainer class: rounds over :attr:`exchange`."""

    exchange: StageExchange
    timeouts: Timeouts
    drops: DropLog

    def _chosen(self, round_id: int) -> list[int]:
        chooser = getattr(self, "participants", None)  # client sampling, where the trainer has it
        if callable(chooser):
            return list(chooser(round_id))
        return list(range(len(self.client_items)))

    def _remote_result(self, round_id: int) -> RoundResult:
        chosen = self._chosen(round_id)
        if not chosen:
            empty = getattr(self, "_empty_round", None)
            if not callable(empty):
                raise ConfigError(f"round {round_id} has no participants")
            result: RoundResult = empty(round_id)
            return result
        return remote_round(round_id, self.global_vector(), chosen, self._require_aggregator(), self.spec,
                            self.exchange, hooks=self.hooks, load=self.load, timeouts=self.timeouts,
                            min_contributors=self.hooks.min_contributors, upload=getattr(self, "upload", None),
                            drops=self.drops)

    def _require_aggregator(self) -> Any:
        if self.aggregator is None:
            raise ConfigError("the trainer's aggregator is closed")
        return self.aggregator

    def _round(self, round_id: int) -> dict[str, Any]:
        cfg = self.config
        start = time.perf_counter()
        try:
            result = self._remote_result(round_id)
        except (ProtocolAbort, TrainingDiverged) as err:
            self.hooks.on_round_aborted(round_id, err)
            raise
        final = self.server_step(round_id, result)
        if final is not result.global_vector:
            self.load(final)
        row: dict[str, Any] = {"round": round_id,
                               "train_loss": result.mean_loss if result.losses else float("nan"),
                               "clients": len(result.contributors),
                               "bytes_up": result.bytes_up, "bytes_down": result.bytes_down}
        sampling = getattr(cfg, "sampling_options", None)
        if isinstance(sampling, dict) and any(v is not None for v in sampling.values()):
            row["sampled"] = len(result.participants)
        if round_id % cfg.eval.every == 0 or round_id == cfg.federation.rounds:
            row.update(self.evaluate())
        self.hooks.on_round_end(round_id, self.model, row)
        row["seconds"] = time.perf_counter() - start
        with gathered(self._params()):
            save_checkpoint(self.run_dir, round_id, self.model, final,
                            {"config": cfg.to_dict(), "hooks": self.hooks.state_dict(), "baseline": self._baseline,
                             "layout": json.loads(self.layout.to_json()), "metrics": row, "trainer": self.name},
                            arrays=self.server_state())
        return row


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
