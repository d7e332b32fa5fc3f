"""Message-passing federation runtime: aggregation protocols as stage machines, transports, FedAvg."""

from fedguard.federation.fedavg import FedAvgOutcome, RingEncoder, aggregate_updates
from fedguard.federation.plaintext import PlaintextAggregator, PlaintextOptions
from fedguard.federation.protocol import (
    AggregateResult,
    Aggregator,
    AggregatorOptions,
    ClientSide,
    Outbox,
    RoundSpec,
    ServerSide,
)
from fedguard.federation.registry import (
    aggregator_options,
    available_aggregators,
    make_aggregator,
    options_class,
    register_aggregator,
)
from fedguard.federation.transport import InProcessTransport, RoundOutcome, TrafficLog

__all__ = [
    "AggregateResult",
    "Aggregator",
    "AggregatorOptions",
    "ClientSide",
    "FedAvgOutcome",
    "InProcessTransport",
    "Outbox",
    "PlaintextAggregator",
    "PlaintextOptions",
    "RingEncoder",
    "RoundOutcome",
    "RoundSpec",
    "ServerSide",
    "TrafficLog",
    "aggregate_updates",
    "aggregator_options",
    "available_aggregators",
    "make_aggregator",
    "options_class",
    "register_aggregator",
]
