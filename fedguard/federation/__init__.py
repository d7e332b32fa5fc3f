"""Message-passing federation runtime: aggregation protocols as stage machines, transports, FedAvg."""

from fedguard.federation.fedavg import FedAvgOutcome, RingEncoder, aggregate_updates
from fedguard.federation.plaintext import PlaintextAggregator
from fedguard.federation.protocol import (
    AggregateResult,
    Aggregator,
    ClientSide,
    Outbox,
    RoundSpec,
    ServerSide,
)
from fedguard.federation.registry import available_aggregators, make_aggregator, register_aggregator
from fedguard.federation.transport import InProcessTransport, RoundOutcome, TrafficLog

__all__ = [
    "AggregateResult",
    "Aggregator",
    "ClientSide",
    "FedAvgOutcome",
    "InProcessTransport",
    "Outbox",
    "PlaintextAggregator",
    "RingEncoder",
    "RoundOutcome",
    "RoundSpec",
    "ServerSide",
    "TrafficLog",
    "aggregate_updates",
    "available_aggregators",
    "make_aggregator",
    "register_aggregator",
]
