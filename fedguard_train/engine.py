"""Local training of one client on DeepSpeed.

Each client-round builds a fresh DeepSpeed engine over the shared model (a new torch AdamW optimiser
state per round, as in FedAvg, where optimiser state does not travel), runs ``local_steps`` optimiser steps
of ``batch_size * grad_accum`` examples, and releases the engine. ZeRO stage 0, 2 or 3 comes from the
config; precision fp32 on CPU, bf16/fp16 where a GPU is present.

On CPU, DeepSpeed picks its CPU accelerator and the gloo backend by itself; without a launcher this
module sets ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` for a single process.
A client can also run as ``torchrun --nproc-per-node N`` ranks (``fedguard_train.client_worker``): each
rank then draws its micro-batches from its own shard and DeepSpeed averages the gradients.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedguard.errors import FedGuardError
from fedguard_train.config import TrainingConfig
from fedguard_train.data import collate
from fedguard_train.hooks import LocalLoss, LossFn

BatchHook = Callable[[list[dict[str, list[int]]]], list[dict[str, list[int]]]]


class TrainingDiverged(FedGuardError):
    """A loss or an update became NaN/inf: the round is aborted and the last good checkpoint kept."""


@dataclass(frozen=True, slots=True)
class LocalResult:
    mean_loss: float
    steps: int
    examples_seen: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_distributed_env() -> None:
    """Single-process defaults for the variables DeepSpeed reads when no launcher set them."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if os.environ["WORLD_SIZE"] == "1":
        # DeepSpeed JIT-compiles a shared-memory op for intra-node collectives on CPU (tens of seconds
        # on first use); one process has no collectives to speed up, so mark the op unavailable.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_config(training: TrainingConfig, *, world_size: int = 1) -> dict[str, Any]:
    """The DeepSpeed JSON config of a local training run."""
    return {
        "train_micro_batch_size_per_gpu": training.batch_size,
        "gradient_accumulation_steps": training.grad_accum,
        "train_batch_size": training.batch_size * training.grad_accum * world_size,
        "optimizer": {"type": "AdamW", "params": {"lr": training.lr, "weight_decay": training.weight_decay,
                                                  "torch_adam": True}},
        "gradient_clipping": training.max_grad_norm,
        "zero_optimization": {"stage": training.zero_stage},
        "bf16": {"enabled": training.precision == "bf16"},
        "fp16": {"enabled": training.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def gathered(params: Sequence[torch.nn.Parameter], *, modify: bool = False) -> contextlib.AbstractContextManager[Any]:
    """Full values of ZeRO-3-partitioned parameters inside the context (a no-op for stages 0 and 2)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=0 if modify else None)
    return contextlib.nullcontext()


def _batches(items: Sequence[dict[str, list[int]]], size: int, generator: torch.Generator, rank: int,
             world: int) -> Iterator[list[dict[str, list[int]]]]:
    shard = list(items[rank::world]) or list(items)
    while True:
        order = torch.randperm(len(shard), generator=generator).tolist()
        for start in range(0, len(order) - size + 1 if len(order) >= size else 1, size):
            yield [shard[i] for i in order[start : start + size]]


class LocalTrainer:
    """Trains the adapter of a (shared) peft model on one client's examples with DeepSpeed."""

    def __init__(self, training: TrainingConfig, pad_id: int) -> None:
        self.training = training
        self.pad_id = pad_id

    def train(
        self,
        model: torch.nn.Module,
        items: Sequence[dict[str, list[int]]],
        *,
        seed: int,
        loss_hook: LossFn | None = None,
        batch_hook: BatchHook | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> LocalResult:
        """``local_steps`` optimiser steps; raises :class:`TrainingDiverged` on a non-finite loss.

        ``loss_hook`` sees each micro-batch's :class:`~fedguard_train.hooks.LocalLoss` (loss, batch and
        model outputs) and returns the loss to minimise."""
        import deepspeed

        ensure_distributed_env()
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        torch.manual_seed(seed + rank)  # dropout masks: reproducible per client-round
        generator = torch.Generator().manual_seed(seed)
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable,
                                          config=deepspeed_config(self.training, world_size=world))
        engine.train()
        losses: list[float] = []
        batches = _batches(items, self.training.batch_size, generator, rank, world)
        try:
            for _ in range(self.training.local_steps):
                for _ in range(self.training.grad_accum):
                    batch_items = next(batches)
                    if batch_hook is not None:
                        batch_items = batch_hook(batch_items)
                    batch = collate(batch_items, self.pad_id)
                    outputs = engine(**batch)
                    loss = outputs.loss
                    if loss_hook is not None:
                        loss = loss_hook(LocalLoss(loss, batch, outputs))
                    if not bool(torch.isfinite(loss)):
                        raise TrainingDiverged(f"local loss became {float(loss)} after {len(losses)} micro-batches")
                    engine.backward(loss)
                    engine.step()
                    losses.append(float(loss.detach()))
                if progress is not None:
                    progress(losses[-1])
        finally:
            engine.destroy()
        n = self.training.local_steps * self.training.grad_accum * self.training.batch_size
        return LocalResult(sum(losses) / len(losses), self.training.local_steps, n)
