"""The plaintext aggregator: the reference every secure aggregator must match exactly.

One stage. The server asks each participant for its input; each client sends its ring vector in the
clear; the server sums the vectors it received modulo ``2^k``. The server sees every individual update,
so this protocol protects nothing: it exists as the reference implementation for the contract test and
for runs where secure aggregation is switched off.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fedguard.checks import int_problem
from fedguard.encoding import ring_sum, to_wire
from fedguard.errors import ConfigError, InvalidUpdateError, MessageError
from fedguard.federation.protocol import (
    AggregateResult,
    Aggregator,
    AggregatorOptions,
    ClientSide,
    Outbox,
    RoundSpec,
    ServerSide,
    check_ring_vector,
    ring_input_schema,
    too_few_contributors,
)
from fedguard.rng import SecureRNG
from fedguard.wire import Message, MessageSchema

_INPUT = "input"
_REQUEST = MessageSchema(kind="plaintext/request", meta={"vector_length": int, "ring_bits": int})
_REPLY = ring_input_schema("plaintext/input")


class _PlaintextServer(ServerSide):
    stages = (_INPUT,)

    def _open(self) -> Outbox:
        meta = {"vector_length": self.spec.vector_length, "ring_bits": self.spec.ring_bits}
        return {c: self._message(_INPUT, c, kind=_REQUEST.kind, meta=meta) for c in self.spec.participants}

    def _schema(self, stage: str) -> MessageSchema:
        return ring_input_schema(_REPLY.kind, ring_bits=self.spec.ring_bits)

    def _check_reply(self, stage: str, msg: Message) -> None:
        check_ring_vector(msg.arrays["x"], self.spec, f"input of client {msg.sender}")  # the round's wire type

    def _close(self, stage: str, replies: dict[int, Message]) -> AggregateResult:
        abort = too_few_contributors(self.spec, len(replies), stage=stage)
        if abort is not None:  # refuse to sum fewer inputs than the round allows
            raise abort
        total = ring_sum([replies[c].arrays["x"] for c in sorted(replies)], self.spec.ring_bits)
        return self._result(total, set(replies))


class _PlaintextClient(ClientSide):
    stages = (_INPUT,)

    def __init__(self, spec: RoundSpec, client_id: int, ring_input: np.ndarray) -> None:
        super().__init__(spec, client_id)
        self._x = check_ring_vector(ring_input, spec, f"ring input of client {client_id}", error=InvalidUpdateError)

    def _respond(self, stage: str, msg: Message) -> bytes:
        _REQUEST.validate(msg)
        mine = {"vector_length": self.spec.vector_length, "ring_bits": self.spec.ring_bits}
        if dict(msg.meta) != mine:
            raise MessageError(f"client {self.client_id} expects a request for {mine}, got {dict(msg.meta)}")
        return self._reply(kind=_REPLY.kind, arrays={"x": to_wire(self._x, self.spec.ring_bits)})


@dataclass(frozen=True, kw_only=True)
class PlaintextOptions(AggregatorOptions):
    """Options of ``aggregator: plaintext``.

    Attributes:
        min_clients: the fewest inputs the server will aggregate (>= 1).
    """

    min_clients: int = 1

    def _problems(self) -> list[str]:
        return [p for p in (int_problem("min_clients", self.min_clients, low=1),) if p]


class PlaintextAggregator(Aggregator):
    """Sum in the clear (no privacy). Options: :class:`PlaintextOptions` (or its fields as keywords)."""

    name: ClassVar[str] = "plaintext"
    stages: ClassVar[tuple[str, ...]] = (_INPUT,)
    input_stage: ClassVar[str] = _INPUT

    def __init__(self, options: PlaintextOptions | Mapping[str, Any] | None = None, **fields: Any) -> None:
        self.options: PlaintextOptions = PlaintextOptions.build(options, fields)
        self.min_clients = self.options.min_clients

    def __repr__(self) -> str:
        return f"PlaintextAggregator(min_clients={self.min_clients})"

    def threshold(self, n_clients: int) -> int:
        return min(self.min_clients, n_clients)

    def check_clients(self, n_clients: int) -> None:
        super().check_clients(n_clients)
        if self.min_clients > n_clients:
            raise ConfigError(f"aggregator 'plaintext' needs at least min_clients={self.min_clients} clients, "
                              f"got {n_clients}: lower aggregator_options.min_clients or add clients")

    def server(self, spec: RoundSpec, *, rng: SecureRNG | None = None) -> ServerSide:
        if self.min_clients > spec.n_clients:
            raise ConfigError(f"min_clients={self.min_clients} exceeds the {spec.n_clients} participants")
        return _PlaintextServer(spec, self.threshold(spec.n_clients))

    def client(
        self, spec: RoundSpec, client_id: int, ring_input: np.ndarray, *, rng: SecureRNG | None = None
    ) -> ClientSide:
        return _PlaintextClient(spec, client_id, ring_input)
