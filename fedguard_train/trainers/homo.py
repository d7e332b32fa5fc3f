"""FedHomoLLM: clients that own the same base model fine-tune it together; only adapters travel.

FATE-LLM §3.1, Figure 3(a). Round ``r`` (the skeleton is :class:`~fedguard_train.trainers.base.Trainer`):
every client loads the global adapter ``θ_r`` into the shared base model, trains ``local_steps`` on
DeepSpeed (hooks may add a loss term or rewrite batches) and sends ``Δ_k = θ_k − θ_r`` with weight
``n_k`` (its number of training examples); the configured ``fedguard`` aggregator computes
``Σ n_k Δ_k / Σ n_k`` over the real serialised protocol; the server has no model step of its own.

Simulation keeps ONE copy of the frozen base weights in memory: clients differ only in the adapter
vector loaded into it. With ``training.nproc_per_node > 1`` each client instead trains as a
``torchrun --nproc-per-node N`` DeepSpeed job (:mod:`fedguard_train.client_worker`).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from fedguard.errors import ConfigError
from fedguard_train.engine import LocalTrainer, TrainingDiverged
from fedguard_train.models import attach_adapter, family_of, load_base_model
from fedguard_train.trainers.base import LocalOutcome, Trainer, env_without_launcher, seed_of


class FedHomoLLM(Trainer):
    """The FedHomoLLM trainer over a config; ``hooks`` attach privacy components."""

    name: ClassVar[str] = "homo"
    title: ClassVar[str] = "FedHomoLLM"

    def setup(self) -> None:
        cfg = self.config
        base, tokenizer = load_base_model(cfg.model, seed=cfg.seed)
        self.family = family_of(base, cfg.model.family)
        torch.manual_seed(seed_of(cfg.seed, "adapter-init"))  # the adapter's initial values are part of the run
        self.use_travelling_model(attach_adapter(base, self.family, cfg.adapter), tokenizer)
        self.load_federated_data(tokenizer)
        self.local = LocalTrainer(cfg.training, tokenizer.pad_token_id)

    def local_train(self, round_id: int, client: int, start: np.ndarray) -> LocalOutcome:
        items = self.client_items[client]
        if self.config.training.nproc_per_node > 1:
            loss, delta = self.train_in_torchrun(client, round_id, start)
            return LocalOutcome(start + delta, loss, len(items), delta=delta)
        local = self.local.train(self.model, items, seed=seed_of(self.config.seed, round_id, client),
                                 loss_hook=self.hooks.local_loss(client, self.model),
                                 batch_hook=self.hooks.local_batch(client),
                                 progress=self.observer.step if self.observer is not None else None)
        return LocalOutcome(self.global_vector(), local.mean_loss, len(items))

    def train_in_torchrun(self, client: int, round_id: int, global_vec: np.ndarray) -> tuple[float, np.ndarray]:
        """Train ``client`` as a ``torchrun --nproc-per-node N`` DeepSpeed job (separate processes that build
        no aggregator; the loss and batch hooks of in-process training are not available there)."""
        if self.hooks.local_loss(client, self.model) is not None or self.hooks.local_batch(client) is not None:
            raise ConfigError("nproc_per_node > 1 does not support hooks that change the local loss or batches")
        ranks = self.config.training.nproc_per_node
        with tempfile.TemporaryDirectory(prefix="fedguard-client-") as tmp:
            work = Path(tmp)
            (work / "config.json").write_text(self.config.to_json())
            np.save(work / "global.npy", global_vec)
            env = env_without_launcher()
            env.setdefault("OMP_NUM_THREADS", "1")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                   "-m", "fedguard_train.client_worker", "--config", str(work / "config.json"),
                   "--client", str(client), "--round", str(round_id), "--global", str(work / "global.npy"),
                   "--out", str(work / "update.npz")]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                log = self.run_dir / f"torchrun-client{client}-round{round_id}.log"
                log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
                raise TrainingDiverged(f"torchrun client {client} failed ({proc.returncode}; full output in {log}): "
                                       f"{proc.stderr[-2000:]}")
            with np.load(work / "update.npz") as data:
                if int(data["world_size"]) != ranks:
                    raise TrainingDiverged(f"torchrun client {client} ran {int(data['world_size'])} ranks, "
                                           f"expected {ranks}")
                return float(data["loss"]), data["delta"].astype(np.float32)
