"""FedHomoLLM: clients that own the same base model fine-tune it together; only adapters travel.

FATE-LLM §3.1, Figure 3(a). One round ``r``:

1. hooks may refuse the round (``on_round_start``);
2. every client loads the global adapter into the shared base model, trains ``local_steps`` on DeepSpeed
   (hooks may add a loss term or rewrite batches), and forms ``Δ_k = θ_k - θ`` with weight ``n_k``
   (its number of training examples);
3. hooks transform each ``ClientUpdate`` (e.g. DP clipping), the configured ``fedguard`` aggregator
   computes the weighted mean ``Σ n_k Δ_k / Σ n_k`` over the real serialised protocol, and hooks
   transform the mean (e.g. central DP noise);
4. ``θ ← θ + mean``; evaluation (ROUGE-1/2/L, BLEU-4, perplexity); hooks add metrics; an atomic
   checkpoint; a table row and a ``metrics.jsonl`` line.

Simulation keeps ONE copy of the frozen base weights in memory: clients differ only in the adapter
vector loaded into it. ``mode: centralized`` trains one party on the union of the clients' data for the
same total number of steps; ``mode: local`` trains each client alone. Both score on the same test split.

Randomness is derived from ``seed`` per (round, client), so a run resumed after round ``r`` produces
bit-identical adapters to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedguard import wire
from fedguard.encoding import FixedPointSpec
from fedguard.errors import BudgetExceededError, ConfigError
from fedguard.federation.fedavg import aggregate_updates
from fedguard.federation.registry import make_aggregator
from fedguard.params import flatten, layout_of, load_vector, parameter_counts
from fedguard.rng import SecureRNG
from fedguard.updates import ClientUpdate
from fedguard_train.checkpoint import load_latest, load_round_metrics, save_checkpoint
from fedguard_train.config import TrainConfig
from fedguard_train.data import (
    load_examples,
    partition,
    partition_report,
    tokenize,
    train_test_split,
)
from fedguard_train.engine import LocalTrainer, TrainingDiverged, gathered
from fedguard_train.hooks import HookList, TrainerHook
from fedguard_train.metrics import evaluate
from fedguard_train.models import attach_adapter, family_of, load_base_model


@dataclass
class RunResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    baseline: dict[str, Any] = field(default_factory=dict)
    run_dir: Path = Path(".")
    trainable_share: float = 0.0
    stopped: str | None = None


def _seed_of(*parts: object) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class FedHomoLLM:
    """The FedHomoLLM trainer over a config; ``hooks`` attach privacy components."""

    def __init__(self, config: TrainConfig, *, hooks: Sequence[TrainerHook] = (), quiet: bool = False,
                 on_step: Callable[[float], None] | None = None) -> None:
        self.config = config
        self.hooks = HookList(hooks)
        self.quiet = quiet
        self.on_step = on_step
        self.run_dir = Path(config.run_dir)
        self._setup()

    # -- setup -----------------------------------------------------------------------------------
    def _log(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def _setup(self) -> None:
        cfg = self.config
        base, self.tokenizer = load_base_model(cfg.model, seed=cfg.seed)
        self.family = family_of(base, cfg.model.family)
        torch.manual_seed(_seed_of(cfg.seed, "adapter-init"))  # the adapter's initial values are part of the run
        self.model = attach_adapter(base, self.family, cfg.adapter)
        self.hooks.prepare_model(self.model)
        self.layout = layout_of(self.model)
        self.counts = parameter_counts(self.model, self.layout)
        self.hooks.on_layout(self.layout.size)
        examples = load_examples(cfg.data, seed=cfg.seed)
        train, self.test_examples = train_test_split(examples, cfg.data.test_size, seed=cfg.seed)
        self.test_examples = self.test_examples[: cfg.eval.examples]
        n_parties = cfg.federation.clients
        parts = partition(train, n_parties, cfg.data.partition, alpha=cfg.data.dirichlet_alpha, seed=cfg.seed)
        self.partition = partition_report(parts)
        if cfg.mode == "centralized":
            parts = [[ex for part in parts for ex in part]]
        self.client_items = [tokenize(p, self.tokenizer, cfg.data) for p in parts]
        self.test_items = tokenize(self.test_examples, self.tokenizer, cfg.data)
        self.local = LocalTrainer(cfg.training, self.tokenizer.pad_token_id)
        self.spec = FixedPointSpec(clip=cfg.federation.clip, value_bits=cfg.federation.value_bits,
                                   ring_bits=64, max_weight=max(1, max(len(i) for i in self.client_items)))
        self.aggregator: Any = self._make_aggregator()  # built here so that a bad aggregator config fails early

    def _make_aggregator(self) -> Any:
        fed = self.config.federation
        return make_aggregator(fed.aggregator, **dict(fed.aggregator_options))

    def close(self) -> None:
        """Release what the aggregator holds (e.g. MPC compute-party processes); :meth:`run` calls it."""
        closer = getattr(self.aggregator, "close", None)
        if callable(closer):
            closer()
        self.aggregator = None

    def _params(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def _vector(self) -> np.ndarray:
        with gathered(self._params()):
            return flatten(self.model, self.layout)

    def _load(self, vector: np.ndarray) -> None:
        with gathered(self._params(), modify=True):
            load_vector(self.model, self.layout, vector)

    def _train_in_torchrun(self, client: int, round_id: int, global_vec: np.ndarray) -> tuple[float, np.ndarray]:
        """Train ``client`` as a ``torchrun --nproc-per-node N`` DeepSpeed job (separate processes; the
        loss and batch hooks of in-process training are not available there)."""
        import subprocess
        import sys
        import tempfile

        if self.hooks.local_loss(client, self.model) is not None or self.hooks.local_batch(client) is not None:
            raise ConfigError("nproc_per_node > 1 does not support hooks that change the local loss or batches")
        with tempfile.TemporaryDirectory(prefix="fedguard-client-") as tmp:
            work = Path(tmp)
            (work / "config.json").write_text(self.config.to_json())
            np.save(work / "global.npy", global_vec)
            env = {k: v for k, v in os.environ.items()
                   if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
            env.setdefault("OMP_NUM_THREADS", "1")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={self.config.training.nproc_per_node}",
                   "-m", "fedguard_train.client_worker", "--config", str(work / "config.json"),
                   "--client", str(client), "--round", str(round_id), "--global", str(work / "global.npy"),
                   "--out", str(work / "update.npz")]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise TrainingDiverged(f"torchrun client {client} failed ({proc.returncode}): {proc.stderr[-2000:]}")
            with np.load(work / "update.npz") as data:
                ranks = int(data["world_size"])
                if ranks != self.config.training.nproc_per_node:
                    raise TrainingDiverged(f"torchrun client {client} ran {ranks} ranks, expected "
                                           f"{self.config.training.nproc_per_node}")
                return float(data["loss"]), data["delta"].astype(np.float32)

    def _evaluate(self) -> dict[str, Any]:
        with gathered(self._params()):
            return evaluate(self.model, self.tokenizer, self.test_examples, self.test_items,
                            max_new_tokens=self.config.eval.max_new_tokens)

    # -- the run ---------------------------------------------------------------------------------------
    def run(self, *, resume: bool = False, table: Any = None) -> RunResult:
        """Train all rounds (continuing from the last checkpoint with ``resume``)."""
        cfg = self.config
        if cfg.mode == "local":
            raise ConfigError("mode 'local' trains each client alone: use fedguard_train.trainers.homo.run_local")
        if self.aggregator is None:  # a second run on the same trainer
            self.aggregator = self._make_aggregator()
        try:
            return self._run(resume=resume, table=table)
        finally:
            self.close()

    def _run(self, *, resume: bool, table: Any) -> RunResult:
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        result = RunResult(run_dir=self.run_dir, trainable_share=float(self.counts["share"]))
        start_round = 1
        metrics_path = self.run_dir / "metrics.jsonl"
        checkpoint = load_latest(self.run_dir) if resume else None
        if resume and checkpoint is None:
            self._log(f"no checkpoint in {self.run_dir}: starting from round 1")
        if checkpoint is not None:
            saved = TrainConfig.from_dict(checkpoint.state["config"])
            diff = saved.differences(cfg)
            if diff:
                raise ConfigError(f"cannot resume {self.run_dir}: the config differs from the checkpoint's in {diff}")
            self._load(checkpoint.vector)
            self.hooks.load_state_dict(checkpoint.state.get("hooks", {}))
            result.baseline = checkpoint.state.get("baseline", {})
            # rebuild the history from the checkpoints themselves (metrics.jsonl may lag a killed run)
            result.history = [load_round_metrics(self.run_dir, r) for r in range(1, checkpoint.round + 1)]
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in [result.baseline, *result.history]))
            start_round = checkpoint.round + 1
            self._log(f"resuming {self.run_dir} after round {checkpoint.round}")
        else:
            (self.run_dir / "config.json").write_text(cfg.to_json())
            metrics_path.write_text("")
            result.baseline = self._evaluate()
            result.baseline["round"] = 0
            with metrics_path.open("a") as out:
                out.write(json.dumps(result.baseline) + "\n")
        self._baseline = result.baseline
        if table is not None and start_round == 1:
            table.row(result.baseline)
        for round_id in range(start_round, cfg.federation.rounds + 1):
            try:
                row = self._round(round_id)
            except BudgetExceededError as err:
                result.stopped = f"stopped before round {round_id}: {err}"
                self._log(result.stopped + f" (last checkpoint kept in {self.run_dir / 'checkpoints'})")
                break
            result.history.append(row)
            with metrics_path.open("a") as out:
                out.write(json.dumps(row) + "\n")
            if table is not None:
                table.row(row)
        return result

    def _round(self, round_id: int) -> dict[str, Any]:
        cfg = self.config
        start = time.perf_counter()
        participants = list(range(len(self.client_items)))
        self.hooks.on_round_start(round_id, participants)
        global_vec = self._vector()
        broadcast = wire.encoded_size(wire.Message(kind="global-adapter", round=round_id, stage="broadcast",
                                                   sender=wire.SERVER, recipient=wire.BROADCAST,
                                                   arrays={"theta": global_vec}))
        updates, losses = [], []
        for client in participants:
            self._load(global_vec)
            try:
                if cfg.training.nproc_per_node > 1:
                    loss, delta = self._train_in_torchrun(client, round_id, global_vec)
                else:
                    local = self.local.train(self.model, self.client_items[client],
                                             seed=_seed_of(cfg.seed, round_id, client),
                                             loss_hook=self.hooks.local_loss(client, self.model),
                                             batch_hook=self.hooks.local_batch(client), progress=self.on_step)
                    loss, delta = local.mean_loss, self._vector() - global_vec
                if not np.all(np.isfinite(delta)):
                    raise TrainingDiverged(f"client {client}'s update has non-finite values")
            except TrainingDiverged as err:
                self._load(global_vec)
                raise TrainingDiverged(f"round {round_id} aborted: client {client}: {err}; the last good "
                                       f"checkpoint in {self.run_dir / 'checkpoints'} is kept") from err
            losses.append(loss)
            updates.append(self.hooks.client_update(ClientUpdate(client, round_id, delta, len(self.client_items[client]))))
        encoding = self.hooks.ring_encoding()
        # Quantisation is seeded (the run is reproducible); the protocol's keys and masks come from OS entropy.
        outcome = aggregate_updates(updates, self.aggregator, encoding.spec if encoding else self.spec,
                                    round_id=round_id, rng=SecureRNG.for_testing(f"{cfg.seed}/aggregate/{round_id}"),
                                    protocol_rng=SecureRNG(), encoder=encoding.encode if encoding else None)
        mean = self.hooks.aggregate(round_id, outcome.mean, outcome.contributors)
        new_global = global_vec + mean
        if not np.all(np.isfinite(new_global)):
            self._load(global_vec)
            raise TrainingDiverged(f"round {round_id} aborted: the aggregated adapter is not finite")
        self._load(new_global)
        row: dict[str, Any] = {"round": round_id, "train_loss": float(np.mean(losses)),
                               "clients": len(outcome.contributors),
                               "bytes_up": outcome.traffic.bytes_up(),
                               "bytes_down": outcome.traffic.bytes_down() + broadcast * len(participants)}
        if round_id % cfg.eval.every == 0 or round_id == cfg.federation.rounds:
            row.update(self._evaluate())
        self.hooks.on_round_end(round_id, self.model, row)
        row["seconds"] = time.perf_counter() - start
        with gathered(self._params()):
            save_checkpoint(self.run_dir, round_id, self.model, new_global,
                            {"config": cfg.to_dict(), "hooks": self.hooks.state_dict(), "baseline": self._baseline,
                             "layout": json.loads(self.layout.to_json()), "metrics": row})
        return row


def run_local(config: TrainConfig, *, quiet: bool = True) -> list[dict[str, Any]]:
    """Each client alone ("Client-k" in the paper's Tables 1-2): the same number of local steps as
    it takes in the federated run, no aggregation, scored on the same test split."""
    trainer = FedHomoLLM(config, quiet=quiet)
    start = trainer._vector()
    rows = []
    for client, items in enumerate(trainer.client_items):
        trainer._load(start)
        losses = []
        for round_id in range(1, config.federation.rounds + 1):
            local = trainer.local.train(trainer.model, items, seed=_seed_of(config.seed, round_id, client))
            losses.append(local.mean_loss)
        row = {"client": client, "train_loss": float(np.mean(losses))}
        row.update(trainer._evaluate())
        rows.append(row)
    return rows

