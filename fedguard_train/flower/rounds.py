"""One federated round whose clients are elsewhere: the aggregator's stage machine driven over a network.

:func:`fedguard.federation.round.run_round` trains every client in the coordinator's process. Here the
clients are remote (Flower SuperNodes, :mod:`fedguard_train.flower.worker`), and the server only drives
the aggregator's :class:`~fedguard.federation.protocol.ServerSide` — the same stage machine, the same
:mod:`fedguard.wire` bytes — through a :data:`StageExchange`: one network round trip per protocol stage.
The first stage's messages also carry ``θ_r`` and the round's public :class:`RoundSpec`; each client
trains, encodes ``Δ_k`` into the ring and answers the first stage in the same round trip (FATE-LLM §3,
Figure 3: ``θ_{r+1} = θ_r + A(Σ_k n_k Δ_k / Σ_k n_k)`` over the clients that survive the protocol).

Dropouts come from the network: a client that does not answer a stage within its timeout (the first
stage's timeout covers local training), whose answer is a transport error (its worker refused or was
unreachable), or whose reply the server refuses (:class:`~fedguard.errors.MessageError` — e.g. garbage —
or :class:`~fedguard.errors.ProtocolViolation`) is dropped *for that stage*, exactly as
:class:`~fedguard.federation.transport.InProcessTransport` drops it; the aggregator's own threshold logic
then completes the round over the others or aborts with :class:`~fedguard.errors.ProtocolAbort` before
anything is decoded. Every drop is logged (logger ``fedguard_train.flower.rounds``) with its reason.

The hooks run where they run in process: ``on_round_start``, ``aggregate`` and ``on_round_aborted`` here
(the accountant, central noise); ``client_update`` and the loss/batch hooks in each client's worker.
``load`` gets ``θ_{r+1}`` on success and ``θ_r`` on any failure, as in ``run_round``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedguard import wire
from fedguard.encoding import FixedPointSpec, decode_weighted_mean
from fedguard.errors import InvalidUpdateError, MessageError, ProtocolViolation
from fedguard.federation.fedavg import FedAvgOutcome
from fedguard.federation.protocol import AggregateResult, Aggregator, RoundSpec
from fedguard.federation.round import RoundHooks, RoundResult, broadcast_size
from fedguard.federation.transport import TrafficLog
from fedguard.quantise import padded_length
from fedguard.rng import SecureRNG

_LOG = logging.getLogger(__name__)

BROADCAST_KIND = "global-adapter"


@dataclass(frozen=True, slots=True)
class FirstStage:
    """What the first stage's messages carry besides the protocol message: ``θ_r`` (wire bytes) and the
    round's public parameters."""

    broadcast: bytes
    spec: RoundSpec
    parameters: Mapping[str, float] = field(default_factory=dict)
    """What the server's hooks tell the clients for this round (the DP clip norm:
    :func:`fedguard_train.flower.dp_split.round_parameters`)."""


@dataclass(frozen=True, slots=True)
class StageReply:
    """One client's answer to one stage: its wire reply, and (first stage) its mean local loss."""

    protocol: bytes
    loss: float | None = None


@dataclass(frozen=True, slots=True)
class StageFailure:
    """A client's answer that is an error (its worker refused, was unreachable, or the transport failed)."""

    reason: str


class StageExchange(Protocol):
    """Sends each ``outbox`` message to its client and returns the answers that arrived within ``timeout``
    seconds, by client id (a client missing from the result did not answer in time)."""

    def __call__(self, round_id: int, stage: str, outbox: Mapping[int, bytes], first: FirstStage | None,
                 timeout: float) -> Mapping[int, StageReply | StageFailure]: ...


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds to wait for a stage's answers: ``first`` covers local training, ``stage`` every later
    stage. Both must be > 0."""

    first: float = 3600.0
    stage: float = 120.0

    def __post_init__(self) -> None:
        from fedguard.errors import ConfigError

        for name in ("first", "stage"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"timeout {name} must be a number > 0, got {value!r}")


@dataclass(slots=True)
class DropLog:
    """Who dropped where, and why (``silent``: no answer in time; otherwise the refusal)."""

    events: list[tuple[int, str, str]] = field(default_factory=list)

    def add(self, client: int, stage: str, reason: str) -> None:
        self.events.append((client, stage, reason))
        _LOG.warning("client %d dropped at stage %r: %s", client, stage, reason)


def broadcast_message(round_id: int, theta: np.ndarray) -> bytes:
    """``θ_r`` as the wire message whose size :func:`~fedguard.federation.round.broadcast_size` counts."""
    return wire.encode(wire.Message(kind=BROADCAST_KIND, round=round_id, stage="broadcast", sender=wire.SERVER,
                                    recipient=wire.BROADCAST, arrays={"theta": np.asarray(theta, np.float32)}))


def stage_request(round_id: int, stage: str, protocol: bytes,
                  first: FirstStage | None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The request for one client's stage (JSON-plain header, binary blobs): what the worker reads,
    whatever carries it (:mod:`fedguard_train.flower.messages` for Flower)."""
    header: dict[str, Any] = {"op": "stage", "round": round_id, "stage": stage}
    blobs = {"protocol": protocol}
    if first is not None:
        spec = first.spec
        header.update(participants=list(spec.participants), vector_length=spec.vector_length,
                      ring_bits=spec.ring_bits, min_contributors=spec.min_contributors,
                      fixed_point=spec.fixed_point is not None)
        blobs["broadcast"] = first.broadcast
        header.update({k: float(v) for k, v in first.parameters.items()})
    return header, blobs


def remote_round(
    round_id: int,
    global_vector: np.ndarray,
    participants: Sequence[int],
    aggregator: Aggregator,
    spec: FixedPointSpec,
    exchange: StageExchange,
    *,
    hooks: RoundHooks | None = None,
    load: Callable[[np.ndarray], None] | None = None,
    timeouts: Timeouts | None = None,
    min_contributors: int = 1,
    upload: Any = None,
    drops: DropLog | None = None,
    parameters: Mapping[str, float] | None = None,
    extra_coordinates: int = 0,
) -> RoundResult:
    """Run round ``round_id`` from ``θ_r = global_vector`` with remote clients (see the module doc).

    ``upload``: the trainer's upload plan when it has one (its ``travelling_length`` sizes the ring vector
    and ``inverse`` undoes its rotation on the decoded mean, as ``run_round`` does). Raises what
    ``on_round_start`` raises, :class:`~fedguard.errors.ProtocolAbort` when too few clients survive a
    stage, and :class:`~fedguard.errors.InvalidUpdateError` for a non-finite result. ``parameters``: the
    hooks' per-round values the first stage carries to the clients (the DP clip norm); ``extra_coordinates``:
    values the hooks' ``client_update`` appends to ``Δ_k`` (DP's adaptive clipping: the clipped-count bit),
    which the ring vector must make room for, as ``aggregate_updates`` sizes it from the updates in process."""
    hooks = hooks if hooks is not None else RoundHooks()
    timeouts = timeouts if timeouts is not None else Timeouts()
    drops = drops if drops is not None else DropLog()
    participants = tuple(participants)
    theta = np.asarray(global_vector, dtype=np.float32)
    hooks.on_round_start(round_id, participants)
    start = time.perf_counter()
    try:
        encoding = hooks.ring_encoding()
        fixed_point = encoding.spec if encoding is not None else spec
        length = theta.size + int(extra_coordinates)  # what the clients' hooks hand the encoding
        width = (padded_length(length, upload.block) if upload is not None and upload.rotation else length) + 1
        round_spec = RoundSpec(round_id, participants, width, fixed_point.ring_bits,
                               fixed_point=fixed_point if encoding is None else None,
                               min_contributors=min_contributors)
        server = aggregator.server(round_spec, rng=SecureRNG().spawn("protocol/server"))
        first: FirstStage | None = FirstStage(broadcast_message(round_id, theta), round_spec, dict(parameters or {}))
        traffic = TrafficLog()
        losses: dict[int, float] = {}
        outbox = server.open()
        while True:
            stage = server.stage
            for cid in sorted(outbox):
                traffic.add(stage, cid, "down", len(outbox[cid]))
            answers = exchange(round_id, stage, outbox, first, timeouts.first if first else timeouts.stage)
            for cid in sorted(outbox):
                answer = answers.get(cid)
                if answer is None:
                    drops.add(cid, stage, "no answer within the stage timeout")
                    continue
                if isinstance(answer, StageFailure):
                    drops.add(cid, stage, f"its node answered with an error: {answer.reason}")
                    continue
                traffic.add(stage, cid, "up", len(answer.protocol))
                try:
                    server.accept(cid, answer.protocol)
                except (ProtocolViolation, MessageError) as err:
                    drops.add(cid, stage, f"its reply was refused: {err}")
                    continue
                if first is not None and answer.loss is not None:
                    losses[cid] = float(answer.loss)
            step = server.close_stage()
            first = None
            if isinstance(step, AggregateResult):
                result = step
                break
            outbox = step
        mean, total = decode_weighted_mean(result.ring_sum, fixed_point)
        decoded = upload.inverse(mean, round_id) if upload is not None else mean
        released = hooks.aggregate(round_id, decoded, result.contributors)
        new_global = theta + released
        if not np.all(np.isfinite(new_global)):
            raise InvalidUpdateError(f"round {round_id}: the aggregated global vector is not finite")
    except BaseException:
        if load is not None:
            load(theta)
        raise
    if load is not None:
        load(new_global)
    outcome = FedAvgOutcome(round_id, mean, total, result.contributors, result.dropped, traffic,
                            time.perf_counter() - start)
    return RoundResult(round_id, new_global, released, losses, outcome, broadcast_size(round_id, theta), participants)
