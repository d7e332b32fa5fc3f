"""Where privacy components attach to the round loop, without editing its body.

A :class:`TrainerHook` extends the core's :class:`fedguard.federation.round.RoundHooks` (the seams of
:func:`~fedguard.federation.round.run_round`) with the seams that need a model; it sees every seam of a
round of any trainer (DESIGN.md §3):

==========================  ================================================================
``prepare_model``           once, after the adapter is attached and before the travelling layout
                            is fixed; e.g. marking norm scales trainable to carry a watermark
``on_layout``               once, with the length of the travelling vector (the update dimension)
``on_round_start``          before any client trains; e.g. an accountant refusing a round that
                            would overspend (raise ``BudgetExceededError``)
``local_loss``              wraps each local loss; it sees the batch and the model outputs
                            (logits) too (:class:`LocalLoss`); e.g. a FedIPR watermark
                            regulariser, or a distillation term
``local_batch``             rewrites each local micro-batch; e.g. backdoor-watermark triggers
``client_update``           transforms a client's update before aggregation; e.g. DP clipping
``ring_encoding``           replaces the fixed-point encoding of client updates (at most one hook);
                            e.g. the client's share of distributed DP noise, added inside the ring
``aggregate``               transforms the aggregated mean; e.g. central DP noise
``on_round_end``            after the global model is updated; adds metrics (epsilon, watermark
                            bits) to the round's row
``state_dict`` / ``load``   hook state saved with every checkpoint and restored on ``--resume``
                            (e.g. the privacy ledger)
==========================  ================================================================

Every method has a do-nothing default, so a hook overrides only what it needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from fedguard.encoding import FixedPointSpec
from fedguard.errors import ConfigError
from fedguard.federation.protocol import Aggregator
from fedguard.federation.round import RingEncoding, RoundHooks
from fedguard.updates import ClientUpdate

Items = list[dict[str, list[int]]]


@dataclass(frozen=True, slots=True)
class LocalLoss:
    """One local micro-batch's loss with what produced it, as a ``local_loss`` hook sees it.

    ``loss``: the (possibly already transformed) scalar to minimise; ``batch``: the model inputs
    (``input_ids``, ``attention_mask``, ``labels``); ``outputs``: the model's outputs (``outputs.logits``),
    e.g. for a knowledge-distillation term against a teacher's logits.
    """

    loss: torch.Tensor
    batch: Mapping[str, torch.Tensor]
    outputs: Any

    def with_loss(self, loss: torch.Tensor) -> LocalLoss:
        return replace(self, loss=loss)


LossFn = Callable[[LocalLoss], torch.Tensor]
"""A ``local_loss`` hook's function: ``LocalLoss -> the new loss``."""


class TrainerHook(RoundHooks):
    """Base class with no-op defaults. ``name`` keys the hook's state in checkpoints."""

    name = "hook"

    def prepare_model(self, model: torch.nn.Module) -> None:
        """Called once before the travelling layout is computed."""

    def on_layout(self, dimension: int) -> None:
        """Called once with the number of values each client update carries."""

    def check_aggregator(self, aggregator: Aggregator, n_clients: int) -> None:
        """Called at construction, before any model loads: raise ``ConfigError`` to refuse the aggregator
        (e.g. DP's release guard: a reveal threshold below ``min_survivors``)."""

    def on_encoding(self, spec: FixedPointSpec, dimension: int) -> None:
        """Called once with the fixed-point encoding of the updates (e.g. central DP calibrates its noise
        to the post-quantisation sensitivity)."""

    @property
    def min_contributors(self) -> int:
        """The fewest clients whose inputs may be in a revealed sum (the round's
        ``RoundSpec.min_contributors``); 1 by default."""
        return 1

    def on_round_aborted(self, round_id: int, error: BaseException) -> None:
        """Called when a round ends with ``ProtocolAbort`` or a diverged client, before the error propagates
        (e.g. DP takes back a write-ahead record that provably released nothing)."""

    def local_loss(self, client_id: int, model: torch.nn.Module) -> LossFn | None:
        """A function ``LocalLoss -> loss'`` applied to every local loss of ``client_id``, or None."""
        return None

    def local_batch(self, client_id: int) -> Callable[[Items], Items] | None:
        """A function rewriting the client's micro-batches, or None."""
        return None

    def on_round_end(self, round_id: int, model: torch.nn.Module, metrics: dict[str, Any]) -> None:
        """May add entries to ``metrics`` (they appear in metrics.jsonl and the report)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class HookList(TrainerHook):
    """Applies several hooks in order (loss and batch functions compose left to right)."""

    name = "hooks"

    def __init__(self, hooks: Sequence[TrainerHook] = ()) -> None:
        self.hooks = list(hooks)

    def prepare_model(self, model: torch.nn.Module) -> None:
        for h in self.hooks:
            h.prepare_model(model)

    def on_layout(self, dimension: int) -> None:
        for h in self.hooks:
            h.on_layout(dimension)

    def on_round_start(self, round_id: int, participants: Sequence[int]) -> None:
        for h in self.hooks:
            h.on_round_start(round_id, participants)

    def check_aggregator(self, aggregator: Aggregator, n_clients: int) -> None:
        for h in self.hooks:
            h.check_aggregator(aggregator, n_clients)

    def on_encoding(self, spec: FixedPointSpec, dimension: int) -> None:
        for h in self.hooks:
            h.on_encoding(spec, dimension)

    @property
    def min_contributors(self) -> int:
        return max([h.min_contributors for h in self.hooks] + [1])

    def on_round_aborted(self, round_id: int, error: BaseException) -> None:
        for h in self.hooks:
            h.on_round_aborted(round_id, error)

    def local_loss(self, client_id: int, model: torch.nn.Module) -> LossFn | None:
        fns = [f for h in self.hooks if (f := h.local_loss(client_id, model)) is not None]
        if not fns:
            return None

        def apply(step: LocalLoss) -> torch.Tensor:
            for f in fns:
                step = step.with_loss(f(step))
            return step.loss

        return apply

    def local_batch(self, client_id: int) -> Callable[[Items], Items] | None:
        fns = [f for h in self.hooks if (f := h.local_batch(client_id)) is not None]
        if not fns:
            return None

        def apply(items: Items) -> Items:
            for f in fns:
                items = f(items)
            return items

        return apply

    def client_update(self, update: ClientUpdate) -> ClientUpdate:
        for h in self.hooks:
            update = h.client_update(update)
        return update

    def ring_encoding(self) -> RingEncoding | None:
        encodings = [(h.name, e) for h in self.hooks if (e := h.ring_encoding()) is not None]
        if len(encodings) > 1:
            raise ConfigError(f"hooks {[n for n, _ in encodings]} each replace the ring encoding; at most one may")
        return encodings[0][1] if encodings else None

    def aggregate(self, round_id: int, mean: np.ndarray, contributors: Sequence[int]) -> np.ndarray:
        for h in self.hooks:
            mean = h.aggregate(round_id, mean, contributors)
        return mean

    def on_round_end(self, round_id: int, model: torch.nn.Module, metrics: dict[str, Any]) -> None:
        for h in self.hooks:
            h.on_round_end(round_id, model, metrics)

    def state_dict(self) -> dict[str, Any]:
        return {h.name: h.state_dict() for h in self.hooks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for h in self.hooks:
            h.load_state_dict(state.get(h.name, {}))
