"""Client-level DP over a network: the DP hook's client half in each worker, its server half in the ServerApp.

In one process :class:`~fedguard_train.privacy.ClientDPHook` does both halves of DP-FedAvg (McMahan et al.,
ICLR 2018; FATE-LLM §3 "privacy-preserving" federated fine-tuning) in the same object. Over Flower they
run on different machines, with the same code and the same ε:

* **server** (the coordinator's hook, unchanged): the accountant and its write-ahead ledger, the budget stop
  (``on_round_start`` before any message leaves), adaptive clip-norm tracking, and — central placement —
  the Gaussian noise ``N(0, (z·S)²)`` added to the decoded mean (``aggregate``). ε is therefore computed by
  exactly the in-process accountant from exactly the same events.
* **client** (each worker, :func:`client_hooks`): clipping ``Δ_k ← Δ_k · min(1, C_r/‖Δ_k‖)`` (both
  placements) and — distributed placement (Kairouz, Liu, Steinke, ICML 2021) — its share of the discrete
  Gaussian noise added in the aggregator's ring before the secure aggregator sees the input. The worker's
  hook has no accountant and no ledger: it never decides whether a round may run.

What crosses the network: the first stage of a round carries the round's clip norm ``C_r``
(:func:`round_parameters`), because adaptive clipping (Andrew et al. 2021) moves it on the server after
every release. A worker checks it (:func:`begin_client_round`): with a fixed clip norm it must equal the
configured one, and with distributed placement it must always equal it — the noise each client adds is
calibrated to the configured ``C`` in integer ring units, so an untrusted server that raised ``C`` would
shrink the relative noise; the worker refuses such a round (:class:`~fedguard.errors.MessageError`, the
client drops out of that stage) instead of under-noising.

Why the worker and not a Flower client mod: a Flower mod sees the Flower message around the ClientApp,
and fedguard's ClientApp only relays wire bytes. Clipping and distributed noise must happen on ``Δ_k``
*before* it is quantised, noised in the ring and masked/encrypted by the secure aggregator; after the
worker, the reply is a masked ring vector that no mod can clip. Flower's own DP mods clip plaintext
``ArrayRecord`` parameters, which would require sending them unprotected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

from fedguard.errors import MessageError
from fedguard_train.config import TrainConfig
from fedguard_train.hooks import TrainerHook

CLIP_KEY: Final[str] = "dp_clip_norm"
"""Header key of the round's clip norm in the first stage's message."""


def _dp_hooks(hooks: Any) -> list[Any]:
    from fedguard_train.privacy import ClientDPHook

    members = getattr(hooks, "hooks", hooks)
    return [h for h in members if isinstance(h, ClientDPHook)]


def round_parameters(hooks: Any) -> dict[str, float]:
    """What the server's hooks tell every client at a round's first stage: the DP clip norm ``C_r``."""
    found = _dp_hooks(hooks)
    return {CLIP_KEY: float(found[0].dp.clip_norm)} if found else {}


def extra_coordinates(hooks: Any) -> int:
    """Values the DP hook's ``client_update`` appends to ``Δ_k``: 1 (the clipped-count bit) under adaptive
    clipping, else 0; the server sizes the round's ring vector with it."""
    return sum(1 for h in _dp_hooks(hooks) if h.dp.config.adaptive is not None)


def client_hooks(config: TrainConfig) -> list[TrainerHook]:
    """The run's hooks as a worker runs them: the DP hook without accountant or ledger (the server's)."""
    from fedguard_train.privacy import hooks_from_config

    hooks = hooks_from_config(config)
    for hook in _dp_hooks(hooks):
        hook.ledger = None
        hook.dp.accountant = None
    return hooks


def begin_client_round(hooks: Sequence[TrainerHook] | Any, round_id: int, header: Mapping[str, Any]) -> None:
    """Open round ``round_id`` on the worker's DP hook with the server's clip norm (checked, see the module
    doc). Raises :class:`MessageError` for a missing or refused clip norm."""
    for hook in _dp_hooks(hooks):
        dp = hook.dp
        configured = float(dp.config.clip_norm)
        value = header.get(CLIP_KEY)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise MessageError(f"round {round_id}: the first stage must carry a positive {CLIP_KEY}, got {value!r}")
        adaptive = dp.config.adaptive is not None and dp.config.placement == "central"
        if not adaptive and float(value) != configured:
            raise MessageError(f"round {round_id}: the server asks for clip norm {value!r}, the run's dp.clip_norm is "
                               f"{configured!r}" + (" (distributed noise is calibrated to it: refusing to under-noise)"
                                                    if dp.config.placement == "distributed" else ""))
        dp.abandon_round()  # whatever the previous round left open on this side
        dp.clip_norm = float(value)
        dp.begin_round(round_id, dimension=hook._dimension if hook.distributed else None)
