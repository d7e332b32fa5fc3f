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
from fedguard.federation.round import ClientResult, RingEncoding, RoundHooks, RoundResult, run_round
from fedguard.federation.transport import InProcessTransport, RoundOutcome, TrafficLog

__all__ = [
    "ClientResult",
    "RingEncoding",
    "RoundHooks",
    "RoundResult",
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
    "run_round",
    "aggregator_options",
    "available_aggregators",
    "make_aggregator",
    "options_class",
    "register_aggregator",
]
