"""The plaintext reference aggregator passes the aggregator contract."""

from __future__ import annotations

import pytest

from fedguard.errors import ConfigError
from fedguard.federation import PlaintextAggregator, make_aggregator
from fedguard.federation.protocol import Aggregator
from fedguard.testing.aggregator_contract import AggregatorContract


class TestPlaintextContract(AggregatorContract):
    def make_aggregator(self, n_clients: int) -> Aggregator:
        return PlaintextAggregator(min_clients=2)


class TestPlaintextSmallRing(AggregatorContract):
    ring_bits = 20
    vector_length = 5

    def make_aggregator(self, n_clients: int) -> Aggregator:
        return PlaintextAggregator(min_clients=n_clients - 1)


def test_registry_builds_plaintext_and_names_the_nearest_unknown() -> None:
    assert isinstance(make_aggregator("plaintext", min_clients=2), PlaintextAggregator)
    with pytest.raises(ConfigError, match="did you mean 'plaintext'"):
        make_aggregator("plaintex")


def test_min_clients_is_validated() -> None:
    with pytest.raises(ConfigError, match="min_clients must be an int >= 1, got 0"):
        PlaintextAggregator(min_clients=0)
