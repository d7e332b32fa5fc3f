"""One federated round, written once: what the demo, the watermark simulation and every trainer run.

FATE-LLM §3 (Figure 3): in round ``r`` the server holds the global travelling vector ``θ_r`` (the
adapter, or whatever a trainer lets travel). Each participant ``k`` starts from ``θ_r``, trains
locally and returns ``Δ_k = θ_k − θ_r`` with weight ``n_k``; the aggregator computes the weighted
mean over the clients that survive its protocol, and

    θ_{r+1} = θ_r + A(Σ_k n_k Δ_k / Σ_k n_k)

where ``A`` is whatever the hooks do to the mean (e.g. central DP noise). :func:`run_round` is that
step with the seams of :class:`RoundHooks` in place:

1. ``on_round_start`` may refuse the round (e.g. an accountant that would overspend) before any client
   trains;
2. ``client_step(k, θ_r)`` trains client ``k`` (the caller's code: DeepSpeed, a plain torch loop, ...);
   ``client_update`` transforms each update (e.g. DP clipping);
3. the updates go through the aggregator as real serialised messages over a transport
   (:func:`fedguard.federation.fedavg.aggregate_updates`; ``ring_encoding`` may replace the fixed-point
   encoding, e.g. distributed DP noise added inside the ring);
4. ``aggregate`` transforms the mean; ``θ_{r+1}`` is checked to be finite.

Whatever happens — a client that diverges, a protocol that aborts, a hook that refuses — ``load``
(the caller's way of writing a vector into its model) leaves the model holding ``θ_r`` when the round
fails, and ``θ_{r+1}`` when it succeeds: never one client's local state.

The core never imports a trainer: hooks that need the model (local losses, batches, metrics) are the
trainer's (``fedguard_train.hooks.TrainerHook`` extends :class:`RoundHooks`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedguard import wire
from fedguard.encoding import FixedPointSpec, Rounding
from fedguard.errors import InvalidUpdateError
from fedguard.federation.fedavg import FedAvgOutcome, RingEncoder, aggregate_updates
from fedguard.federation.protocol import Aggregator
from fedguard.federation.transport import InProcessTransport
from fedguard.quantise import UploadPlan
from fedguard.rng import SecureRNG
from fedguard.updates import ClientUpdate

__all__ = ["ClientResult", "ClientStep", "RingEncoding", "RoundHooks", "RoundResult", "broadcast_size", "run_round"]


@dataclass(frozen=True, slots=True)
class RingEncoding:
    """How client updates enter the secure aggregator: the fixed-point ``spec`` the server decodes with
    and the client-side ``encode`` function (see :data:`fedguard.federation.fedavg.RingEncoder`)."""

    spec: FixedPointSpec
    encode: RingEncoder


class RoundHooks:
    """The seams of one round, each a no-op by default; a hook overrides what it needs.

    ``name`` keys a hook's state where a trainer checkpoints it.
    """

    name = "hook"

    def on_round_start(self, round_id: int, participants: Sequence[int]) -> None:
        """Called before any client trains; raise (e.g. ``BudgetExceededError``) to refuse the round."""

    def client_update(self, update: ClientUpdate) -> ClientUpdate:
        """Transform one client's update before it is encoded (e.g. clip it)."""
        return update

    def ring_encoding(self) -> RingEncoding | None:
        """The encoding of this round's updates into the ring, or ``None`` for the default."""
        return None

    def aggregate(self, round_id: int, mean: np.ndarray, contributors: Sequence[int]) -> np.ndarray:
        """Transform the aggregated mean (e.g. add central DP noise)."""
        return mean


@dataclass(frozen=True, slots=True)
class ClientResult:
    """What one client's local step returns: ``delta = θ_k − θ_r`` (float32), the FedAvg weight ``n_k``
    (its number of training examples) and its mean local loss."""

    delta: np.ndarray
    weight: int
    loss: float


ClientStep = Callable[[int, np.ndarray], ClientResult]
"""``(client_id, θ_r) -> ClientResult``: one client's local training from the global vector."""


@dataclass(frozen=True, slots=True)
class RoundResult:
    """The new global vector and what the round cost."""

    round_id: int
    global_vector: np.ndarray
    mean: np.ndarray
    losses: Mapping[int, float]
    aggregation: FedAvgOutcome
    broadcast_bytes: int
    participants: tuple[int, ...]
    clipped: Mapping[int, int] = field(default_factory=dict)
    """Per client, how many of its uploaded values lay outside the encoding's ``[-clip, clip]`` and were
    clipped (:meth:`FixedPointSpec.clipped`); empty where the clients ran elsewhere (a remote round)."""

    @property
    def contributors(self) -> tuple[int, ...]:
        return self.aggregation.contributors

    @property
    def mean_loss(self) -> float:
        return float(np.mean(list(self.losses.values())))

    @property
    def bytes_up(self) -> int:
        return self.aggregation.traffic.bytes_up()

    @property
    def bytes_down(self) -> int:
        """The protocol's downstream bytes plus the broadcast of ``θ_r`` to every participant."""
        return self.aggregation.traffic.bytes_down() + self.broadcast_bytes * len(self.participants)


def broadcast_size(round_id: int, vector: np.ndarray) -> int:
    """Bytes of the server's broadcast of the global vector, as a real :mod:`fedguard.wire` message."""
    return wire.encoded_size(wire.Message(kind="global-adapter", round=round_id, stage="broadcast",
                                          sender=wire.SERVER, recipient=wire.BROADCAST, arrays={"theta": vector}))


def run_round(
    round_id: int,
    global_vector: np.ndarray,
    participants: Sequence[int],
    client_step: ClientStep,
    aggregator: Aggregator,
    spec: FixedPointSpec,
    *,
    hooks: RoundHooks | None = None,
    load: Callable[[np.ndarray], None] | None = None,
    rng: SecureRNG | None = None,
    protocol_rng: SecureRNG | None = None,
    drop_at: Mapping[int, str] | None = None,
    transport: InProcessTransport | None = None,
    rounding: Rounding = "stochastic",
    min_contributors: int = 1,
    upload: UploadPlan | None = None,
) -> RoundResult:
    """Run round ``round_id`` from ``θ_r = global_vector`` and return ``θ_{r+1}`` (see the module doc).

    Args:
        client_step: trains one client from ``θ_r`` (it loads ``θ_r`` into its model itself).
        spec: the fixed-point encoding, unless a hook's ``ring_encoding`` replaces it.
        hooks: the seams (a :class:`RoundHooks`, e.g. a trainer's hook list).
        load: writes a vector into the caller's model; called with ``θ_{r+1}`` on success and with
            ``θ_r`` on any failure after ``on_round_start`` (a diverged client, a protocol abort, a
            non-finite result), so the model never keeps one client's local state.
        rng: drives quantisation (seed it for a reproducible run); ``protocol_rng``: keys, masks and
            obfuscators (default: OS entropy — a seed the server knows would protect nothing).
        drop_at: ``{client: stage}`` — clients that go silent from that protocol stage on.
        min_contributors: the round's ``RoundSpec.min_contributors`` (e.g. DP's ``min_survivors``): the
            aggregator aborts before decoding a sum of fewer clients' inputs.
        upload: the run's :class:`~fedguard.quantise.UploadPlan` (rotation, equal weights): applied to each
            update after ``client_update`` (e.g. after DP clipping) and, inverted, to the decoded mean before
            ``aggregate`` (e.g. before central DP noise). ``spec`` should be ``upload.spec``.
    Raises whatever ``on_round_start`` or ``client_step`` raise, :class:`~fedguard.errors.ProtocolAbort`
    when too few clients survive, and :class:`~fedguard.errors.InvalidUpdateError` for a non-finite
    update or result.
    """
    hooks = hooks if hooks is not None else RoundHooks()
    participants = tuple(participants)
    global_vector = np.asarray(global_vector, dtype=np.float32)
    hooks.on_round_start(round_id, participants)
    try:
        updates: list[ClientUpdate] = []
        losses: dict[int, float] = {}
        for client in participants:
            local = client_step(client, global_vector)
            losses[client] = float(local.loss)
            update = hooks.client_update(ClientUpdate(client, round_id, local.delta, local.weight))
            updates.append(upload.forward(update) if upload is not None else update)
        encoding = hooks.ring_encoding()
        used = encoding.spec if encoding is not None else spec
        clipped = {u.client_id: used.clipped(u.vector) for u in updates}
        outcome = aggregate_updates(
            updates, aggregator, used, round_id=round_id, rng=rng,
            protocol_rng=protocol_rng if protocol_rng is not None else SecureRNG(), drop_at=drop_at,
            transport=transport, rounding=rounding, encoder=encoding.encode if encoding is not None else None,
            min_contributors=min_contributors,
        )
        decoded = upload.inverse(outcome.mean, round_id) if upload is not None else outcome.mean
        mean = hooks.aggregate(round_id, decoded, outcome.contributors)
        new_global = global_vector + mean
        if not np.all(np.isfinite(new_global)):
            raise InvalidUpdateError(f"round {round_id}: the aggregated global vector is not finite")
    except BaseException:
        if load is not None:
            load(global_vector)
        raise
    if load is not None:
        load(new_global)
    return RoundResult(round_id, new_global, mean, losses, outcome, broadcast_size(round_id, global_vector),
                       participants, clipped)
