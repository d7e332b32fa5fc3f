"""``aggregator: mpc`` with no options means real CrypTen parties; simulated parties must be asked for by name
and say that they protect nothing. (No party process is started here.)"""

from __future__ import annotations

import pytest

from fedguard.errors import ConfigError
from fedguard.federation import aggregator_options
from fedguard.secagg.mpc import MpcAggregator, MpcOptions, SimulatedParties


def test_the_default_backend_is_real_crypten_parties() -> None:
    assert MpcOptions().backend == "crypten"
    options = aggregator_options("mpc")
    assert isinstance(options, MpcOptions) and options.backend == "crypten" and not options.simulated


def test_the_old_in_process_name_is_refused_naming_simulated() -> None:
    with pytest.raises(ConfigError, match="backend 'in-process' was renamed: use backend='simulated'"):
        aggregator_options("mpc", {"backend": "in-process"})
    with pytest.raises(ConfigError, match="use backend='simulated'"):
        MpcAggregator(backend="in-process")


def test_simulated_parties_say_they_protect_nothing() -> None:
    agg = MpcAggregator(backend="simulated")
    assert agg.simulated and isinstance(agg.parties, SimulatedParties)
    assert agg.label == "mpc (simulated parties: no protection)"
    # parties handed in are judged by what they are, not by the backend option
    assert MpcAggregator(parties=SimulatedParties(2)).label == "mpc (simulated parties: no protection)"
    assert MpcAggregator.label.fget is not None  # a property of the class, read without building parties


def test_n_parties_is_checked_per_backend() -> None:
    assert MpcOptions(backend="simulated", n_parties=5).n_parties == 5
    with pytest.raises(ConfigError, match=r"n_parties must be an int in \[2, 3\], got 5"):
        MpcOptions(n_parties=5)  # CrypTen parties: 2 or 3


def test_check_clients_names_min_clients_and_the_single_client_opt_in() -> None:
    agg = MpcAggregator(backend="simulated")
    agg.check_clients(2)
    with pytest.raises(ConfigError, match="aggregator 'mpc' needs at least min_clients=2 clients, got 1: .*"
                                          "allow_single_client"):
        agg.check_clients(1)
    with pytest.raises(ConfigError, match="needs at least min_clients=4 clients, got 3: add clients"):
        MpcAggregator(backend="simulated", min_clients=4).check_clients(3)
    MpcAggregator(backend="simulated", min_clients=1, allow_single_client=True).check_clients(1)


def test_close_leaves_parties_handed_in_alone_and_is_idempotent() -> None:
    parties = SimulatedParties(2)
    with MpcAggregator(parties=parties) as agg:
        pass
    agg.close()
    assert agg.parties is parties
