"""Running one aggregation round: the in-process transport.

:class:`InProcessTransport` plays N clients and a server inside one process, passing the *serialised*
messages between them exactly as a network transport would, so byte counts are the real message sizes.
It can drop any client at any stage (the client stops replying from that stage on: a crash, a timeout,
a lost connection), and it records bytes up and down per stage and per client.

A reply the server refuses (:class:`~fedguard.errors.ProtocolViolation` or
:class:`~fedguard.errors.MessageError`) is recorded in :attr:`RoundOutcome.rejected`, and its sender
counts as dropped for that stage; the round goes on with everybody else. Likewise a client that refuses
the server's message (e.g. a malformed or foreign-round message) stays silent, and the refusal is
recorded the same way: one party's error never ends the round for the others. Every such refusal is
logged (logger ``fedguard.federation.transport``, level WARNING) naming the client, the stage and the
reason: ``client 12 dropped at stage 'mask': its reply was refused: ...``.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from fedguard.errors import ConfigError, MessageError, ProtocolViolation
from fedguard.federation.protocol import AggregateResult, ClientSide, ServerSide

_LOG = logging.getLogger(__name__)

Direction = Literal["up", "down"]
Tamper = Callable[[str, int, bytes], bytes]
"""``tamper(stage, client_id, reply) -> reply'``: lets tests corrupt or replace a client's reply."""


@dataclass(frozen=True, slots=True)
class TrafficRecord:
    stage: str
    client: int
    direction: Direction
    nbytes: int


@dataclass(slots=True)
class TrafficLog:
    """Bytes on the wire, per stage, client and direction (up: client -> server)."""

    records: list[TrafficRecord] = field(default_factory=list)

    def add(self, stage: str, client: int, direction: Direction, nbytes: int) -> None:
        self.records.append(TrafficRecord(stage, client, direction, nbytes))

    def total(self, direction: Direction, *, client: int | None = None, stage: str | None = None) -> int:
        return sum(
            r.nbytes
            for r in self.records
            if r.direction == direction and (client is None or r.client == client) and (stage is None or r.stage == stage)
        )

    def bytes_up(self, *, client: int | None = None, stage: str | None = None) -> int:
        return self.total("up", client=client, stage=stage)

    def bytes_down(self, *, client: int | None = None, stage: str | None = None) -> int:
        return self.total("down", client=client, stage=stage)

    def per_stage(self) -> dict[str, dict[str, int]]:
        """``{stage: {"up": bytes, "down": bytes}}`` in stage order."""
        out: dict[str, dict[str, int]] = defaultdict(lambda: {"up": 0, "down": 0})
        for r in self.records:
            out[r.stage][r.direction] += r.nbytes
        return dict(out)


@dataclass(frozen=True, slots=True)
class RoundOutcome:
    result: AggregateResult
    traffic: TrafficLog
    rejected: tuple[tuple[int, str, Exception], ...]
    seconds: float


class InProcessTransport:
    """Runs a server side and its client sides in this process, over serialised messages."""

    def run(
        self,
        server: ServerSide,
        clients: Mapping[int, ClientSide],
        *,
        drop_at: Mapping[int, str] | None = None,
        tamper: Tamper | None = None,
    ) -> RoundOutcome:
        """Run the round to its end and return the outcome.

        Args:
            drop_at: ``{client_id: stage}``: the client goes silent from that stage on.
            tamper: optional hook applied to each client reply before the server sees it.

        Raises:
            ProtocolAbort: too many clients dropped (or were refused) at some stage.
        """
        drop_at = dict(drop_at or {})
        stages = list(server.stages)
        for cid, stage in drop_at.items():
            if cid not in clients:
                raise ConfigError(f"drop_at names client {cid}, which is not in this round")
            if stage not in stages:
                raise ConfigError(f"drop_at stage for client {cid} must be one of {stages}, got {stage!r}")
        missing = set(server.spec.participants) - set(clients)
        if missing:
            raise ConfigError(f"no client side for participant(s) {sorted(missing)}")

        traffic = TrafficLog()
        rejected: list[tuple[int, str, Exception]] = []
        start = time.perf_counter()
        outbox = server.open()
        while True:
            stage = server.stage
            index = stages.index(stage)
            for cid in sorted(outbox):
                payload = outbox[cid]
                traffic.add(stage, cid, "down", len(payload))
                if cid in drop_at and stages.index(drop_at[cid]) <= index:
                    continue
                try:
                    reply = clients[cid].handle(payload)
                except (ProtocolViolation, MessageError) as err:
                    rejected.append((cid, stage, err))
                    _LOG.warning("client %d dropped at stage %r: it refused the server's message: %s", cid, stage, err)
                    continue
                if tamper is not None:
                    reply = tamper(stage, cid, reply)
                traffic.add(stage, cid, "up", len(reply))
                try:
                    server.accept(cid, reply)
                except (ProtocolViolation, MessageError) as err:
                    rejected.append((cid, stage, err))
                    _LOG.warning("client %d dropped at stage %r: its reply was refused: %s", cid, stage, err)
            step = server.close_stage()
            if isinstance(step, AggregateResult):
                return RoundOutcome(step, traffic, tuple(rejected), time.perf_counter() - start)
            outbox = step
