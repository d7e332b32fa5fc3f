"""What the server of one real FedSGD round sees: run the round through fedguard's protocol and capture it.

The leakage table's masked and DP rows must attack the server's *real* view, not a model of it. This
module drives one round of :func:`fedguard.federation.round.run_round` — the same function every
trainer runs — with:

* a client step that computes the client's single-step gradient ``g_k`` on its batch at ``θ_r`` and
  returns the FedSGD update ``Δ_k = −η g_k`` (weight 1);
* the real aggregator (``plaintext``, ``masking``, ...) wrapped by the server-view capture of
  :mod:`fedguard_train.capture` (every accepted reply stored byte for byte, the decoded mean);
* optionally the real client-level DP hook (:class:`fedguard_train.privacy.ClientDPHook`, distributed
  placement: each client clips to ``C`` and adds its share of discrete Gaussian noise inside the ring, so
  the server only ever decodes a noised sum).

It then reads the capture back as the server would: each client's input-stage message decoded with the
round's public fixed-point encoding (for masking, a uniformly masked vector; with DP, the clipped update
plus the client's noise share, then masked), and the decoded mean. The attacks
(:mod:`attacks.inversion`, :mod:`attacks.optimisation`) run on these arrays.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedguard.encoding import FixedPointSpec, dequantize, from_ring
from fedguard.errors import ConfigError
from fedguard.wire import decode

SPEC = FixedPointSpec(clip=1.0, value_bits=24, ring_bits=64, max_weight=16)
"""The fixed-point encoding of the rounds without DP (gradient entries of the tiny models are well below 1)."""


@dataclass(frozen=True, slots=True)
class RoundView:
    """The captured view of one round, decoded: per-client input-stage vectors and the mean, as named
    arrays; ``noise_std``: the public per-entry quantisation step of one client's vector (DAGER's noise
    floor); ``directory``: the captured round on disk."""

    clients: dict[int, dict[str, np.ndarray]]
    mean: dict[str, np.ndarray]
    contributors: tuple[int, ...]
    noise_std: float
    aggregator: str
    dp: bool
    directory: Path


class _Start:
    """What :class:`fedguard_train.capture.ServerViewHook` reads of a trainer: ``θ_r``."""

    def __init__(self, vector: np.ndarray) -> None:
        self.vector = vector

    def global_vector(self) -> np.ndarray:
        return self.vector


def _named(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for n, shape in shapes.items():
        size = int(np.prod(shape))
        out[n] = np.asarray(vector[at:at + size], dtype=np.float64).reshape(shape)
        at += size
    return out


def fedsgd_round(model: torch.nn.Module, batches: Sequence[Sequence[Sequence[int]]], names: Sequence[str], root: Path,
                 *, aggregator: str = "masking", aggregator_options: Mapping[str, Any] | None = None,
                 dp: Mapping[str, Any] | None = None, lr: float = 1.0, seed: int = 0) -> RoundView:
    """One FedSGD round of ``len(batches)`` clients (client ``k`` trains on ``batches[k]``) through the real
    protocol, its server view captured under ``root``; returns the view decoded.

    ``names``: the travelling parameters (their gradients form each update, flattened in this order).
    ``dp``: a ``dp:`` section (e.g. ``{"placement": "distributed", "clip_norm": 1.0, "noise_multiplier":
    1.0, "min_survivors": 3, "target_delta": 1e-3}``) run through :class:`ClientDPHook`, or ``None``.
    ``seed``: quantisation, masks and the DP noise are drawn from seeded test streams (a simulation: a real
    deployment draws masks and noise from OS entropy)."""
    from attacks.inversion import batch_gradient
    from fedguard.federation.registry import make_aggregator
    from fedguard.federation.round import ClientResult, run_round
    from fedguard.rng import SecureRNG
    from fedguard_train.capture import VIEW_DIR, CapturingAggregator, ServerView, ServerViewHook
    from fedguard_train.hooks import HookList, TrainerHook

    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ConfigError(f"the model has no parameters {unknown}")
    if not batches or any(not b for b in batches):
        raise ConfigError("fedsgd_round needs one non-empty batch per client")
    shapes = {n: tuple(params[n].shape) for n in names}
    dimension = int(sum(int(np.prod(s)) for s in shapes.values()))
    theta = np.zeros(dimension, dtype=np.float32)  # θ_r as the update's origin (the model holds the weights)
    inner = make_aggregator(aggregator, dict(aggregator_options or {}))
    view_root = Path(root) / VIEW_DIR
    view = ServerView(view_root, inner)
    hooks: list[TrainerHook] = [ServerViewHook(_Start(theta), view)]  # type: ignore[arg-type]
    dp_hook = None
    if dp is not None:
        from fedguard_train.privacy import ClientDPHook

        dp_hook = ClientDPHook(dict(dp), n_clients=len(batches), aggregator=aggregator,
                               aggregator_options=dict(aggregator_options or {}),
                               noise_rng=lambda client: SecureRNG.for_testing(f"leakage-dp/{seed}/{client}"))
        dp_hook.check_aggregator(inner, len(batches))
        hooks.append(dp_hook)
    hook = HookList(hooks)
    hook.on_layout(dimension)
    hook.on_encoding(SPEC, dimension)

    def client_step(client: int, _: np.ndarray) -> ClientResult:
        g = batch_gradient(model, batches[client], list(names))
        delta = np.concatenate([(-lr * g[n]).numpy().ravel() for n in names]).astype(np.float32)
        return ClientResult(delta, 1, 0.0)

    run_round(1, theta, range(len(batches)),
              client_step, CapturingAggregator(inner, view), SPEC, hooks=hook,
              rng=SecureRNG.for_testing(f"leakage-q/{seed}"), protocol_rng=SecureRNG.for_testing(f"leakage-p/{seed}"),
              min_contributors=hook.min_contributors)
    directory = view_root / "round_0001"
    doc = json.loads((directory / "view.json").read_text())
    spec = dp_hook.dp.fixed_point_spec() if dp_hook is not None else SPEC
    clients: dict[int, dict[str, np.ndarray]] = {}
    for entry in doc["payloads"]:
        if entry["stage"] != doc["input_stage"]:
            continue
        msg = decode((directory / entry["file"]).read_bytes())
        if "x" not in msg.arrays:
            raise ConfigError(f"aggregator {aggregator!r}: the server holds {msg.kind!r}, not a ring vector")
        signed = from_ring(np.asarray(msg.arrays["x"], dtype=np.uint64), spec.ring_bits)
        weight = int(signed[-1])
        divisor = weight if 1 <= weight <= spec.max_weight else 1
        clients[int(entry["client"])] = _named(dequantize(signed[:-1], spec, divisor=divisor), shapes)
    with np.load(directory / "aggregate.npz") as data:
        mean, contributors = np.asarray(data["mean"]), tuple(int(c) for c in data["contributors"])
    return RoundView(clients, _named(mean, shapes), contributors, 1.0 / spec.scale, aggregator, dp is not None,
                     directory)
