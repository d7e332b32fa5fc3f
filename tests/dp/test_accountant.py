"""The accountant: epsilon delegated to dp_accounting, budget refused before release, ledger resumable."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
from dp_accounting.pld import PLDAccountant

from fedguard.dp.accountant import PrivacyAccountant
from fedguard.dp.errors import UnsupportedEventError
from fedguard.dp.events import (
    ComposedEvent,
    DistributedDiscreteGaussianEvent,
    GaussianEvent,
    NonPrivateEvent,
    PoissonSampledEvent,
    SelfComposedEvent,
    ZCDPEvent,
    event_from_dict,
    event_to_dict,
)
from fedguard.errors import BudgetExceededError, ConfigError

GRID = [  # (sigma, q, steps, delta)
    (0.8, 0.02, 300, 1e-5),
    (1.0, 0.05, 100, 1e-6),
    (2.0, 1.0, 10, 1e-5),
    (1.5, 0.1, 50, 1e-4),
]


def _reference_pld(sigma: float, q: float, steps: int, delta: float) -> float:
    inner = GaussianDpEvent(sigma)
    event = inner if q == 1 else PoissonSampledDpEvent(q, inner)
    return PLDAccountant().compose(SelfComposedDpEvent(event, steps)).get_epsilon(delta)


def _event(sigma: float, q: float):
    g = GaussianEvent(sigma)
    return g if q == 1 else PoissonSampledEvent(q, g)


@pytest.mark.parametrize("sigma,q,steps,delta", GRID)
def test_pld_backend_never_below_and_within_one_percent_of_dp_accounting_pld(sigma, q, steps, delta):
    acc = PrivacyAccountant(target_delta=delta, backend="pld")
    acc.record(_event(sigma, q), steps // 2)
    acc.record(_event(sigma, q), steps - steps // 2)  # split recording composes to the same thing
    ref = _reference_pld(sigma, q, steps, delta)
    eps = acc.epsilon()
    assert eps >= ref
    assert eps <= ref * 1.01


@pytest.mark.parametrize("sigma,q,steps,delta", GRID)
def test_rdp_backend_is_an_upper_bound_on_pld(sigma, q, steps, delta):
    acc = PrivacyAccountant(target_delta=delta, backend="rdp")
    acc.record(_event(sigma, q), steps)
    assert acc.epsilon() >= _reference_pld(sigma, q, steps, delta)


def test_prv_backend_is_an_upper_bound_on_pld():
    sigma, q, steps, delta = 1.0, 0.05, 20, 1e-5
    acc = PrivacyAccountant(target_delta=delta, backend="prv")
    acc.record(_event(sigma, q), steps)
    ref = _reference_pld(sigma, q, steps, delta)
    assert ref * 0.99 <= acc.epsilon() <= ref * 1.05


def test_spend_refuses_before_recording_when_budget_would_be_exceeded():
    acc = PrivacyAccountant(target_delta=1e-5, epsilon_budget=3.0, backend="rdp")
    event = PoissonSampledEvent(0.05, GaussianEvent(1.0))
    fits = acc.affordable(event)
    assert fits > 0
    acc.spend(event, fits)
    assert acc.epsilon() <= 3.0
    assert acc.would_exceed(event)
    before = acc.to_json()
    with pytest.raises(BudgetExceededError, match="nothing was released"):
        acc.spend(event)
    assert acc.to_json() == before
    # and the boundary is tight: one more step really exceeds the budget
    assert acc.epsilon_if(event, 1) > 3.0


def test_affordable_count_is_the_exact_boundary():
    acc = PrivacyAccountant(target_delta=1e-5, epsilon_budget=2.0, backend="rdp")
    acc.record(GaussianEvent(5.0), 3)
    event = PoissonSampledEvent(0.02, GaussianEvent(0.9))
    k = acc.affordable(event)
    assert acc.epsilon_if(event, k) <= 2.0 < acc.epsilon_if(event, k + 1)


def test_resumed_ledger_gives_the_same_epsilon_as_an_uninterrupted_one(tmp_path):
    event = PoissonSampledEvent(0.05, GaussianEvent(1.1))
    straight = PrivacyAccountant(target_delta=1e-5, epsilon_budget=None)
    for r in range(4):
        straight.spend(event, label=f"round {r}")
    first = PrivacyAccountant(target_delta=1e-5, epsilon_budget=None)
    for r in range(2):
        first.spend(event, label=f"round {r}")
    path = first.save(tmp_path / "ckpt" / "ledger.json")
    resumed = PrivacyAccountant.load(path)
    for r in range(2, 4):
        resumed.spend(event, label=f"round {r}")
    assert resumed.ledger == straight.ledger
    assert resumed.epsilon() == straight.epsilon()
    assert json.loads(resumed.to_json()) == json.loads(straight.to_json())


def test_identical_consecutive_steps_are_run_length_encoded():
    acc = PrivacyAccountant(target_delta=1e-5)
    for _ in range(100):
        acc.record(PoissonSampledEvent(0.01, GaussianEvent(1.0)), label="dp-sgd step")
    assert len(acc.ledger) == 1 and acc.steps == 100


def test_non_private_event_makes_epsilon_infinite():
    acc = PrivacyAccountant(target_delta=1e-5)
    acc.record(NonPrivateEvent())
    assert math.isinf(acc.epsilon())


def test_pld_backend_rejects_zcdp_events_with_a_typed_error_naming_the_fix():
    acc = PrivacyAccountant(target_delta=1e-5, backend="pld")
    with pytest.raises(UnsupportedEventError, match="backend='rdp'"):
        acc.record(ZCDPEvent(0.1))
    assert acc.ledger == ()
    ddg = DistributedDiscreteGaussianEvent(100.0, 10, 300.0, 9e4, 50)
    with pytest.raises(UnsupportedEventError):
        acc.would_exceed(ddg)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"target_delta": 0.0}, "target_delta must be a finite number in (0, 1), got 0.0"),
        ({"target_delta": 1e-3, "population": 10000}, "got 0.001"),
        ({"target_delta": 1e-5, "epsilon_budget": -1.0}, "got -1.0"),
        ({"target_delta": 1e-5, "backend": "gdp"}, "'gdp'"),
    ],
)
def test_bad_configuration_is_a_typed_error_naming_the_value(kwargs, needle):
    with pytest.raises(ConfigError) as err:
        PrivacyAccountant(**kwargs)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda: GaussianEvent(0.0), "noise_multiplier must be a finite number > 0, got 0.0"),
        (lambda: GaussianEvent(-1.0), "got -1.0"),
        (lambda: PoissonSampledEvent(1.5, GaussianEvent(1.0)), "sampling_probability must be a finite number in (0, 1], got 1.5"),
        (lambda: PoissonSampledEvent(0.0, GaussianEvent(1.0)), "got 0.0"),
        (lambda: SelfComposedEvent(GaussianEvent(1.0), 0), "count must be an int >= 1, got 0"),
    ],
)
def test_bad_events_are_typed_errors_naming_the_value(make, needle):
    with pytest.raises(ConfigError) as err:
        make()
    assert needle in str(err.value)


def test_numpy_scalars_are_accepted_and_stored_as_python_numbers_but_bools_are_not():
    e = SelfComposedEvent(PoissonSampledEvent(np.float32(0.5), GaussianEvent(np.float64(1.5))), np.int64(3))
    assert type(e.count) is int and type(e.event.sampling_probability) is float
    assert e == SelfComposedEvent(PoissonSampledEvent(0.5, GaussianEvent(1.5)), 3)
    assert event_from_dict(json.loads(json.dumps(event_to_dict(e)))) == e
    acc = PrivacyAccountant(target_delta=np.float64(1e-5), population=np.int64(1000))
    acc.record(GaussianEvent(1.0), np.int32(2))
    assert acc.steps == 2 and type(acc.ledger[0].count) is int and type(acc.population) is int
    assert json.loads(acc.to_json())["population"] == 1000
    for make in (lambda: GaussianEvent(True), lambda: SelfComposedEvent(GaussianEvent(1.0), True),
                 lambda: acc.record(GaussianEvent(1.0), True)):
        with pytest.raises(ConfigError, match="got True"):
            make()


def test_an_infinite_budget_is_still_accepted_and_never_binds():
    acc = PrivacyAccountant(target_delta=1e-5, epsilon_budget=math.inf, backend="rdp")
    acc.spend(GaussianEvent(0.5), 100)  # epsilon in the hundreds: no finite budget would allow it
    assert acc.remaining() == math.inf
    with pytest.raises(ConfigError, match="epsilon_budget"):
        PrivacyAccountant(target_delta=1e-5, epsilon_budget=math.nan)


def test_events_round_trip_through_json_and_unknown_keys_are_named():
    e = ComposedEvent((
        SelfComposedEvent(PoissonSampledEvent(0.1, GaussianEvent(1.2)), 7),
        DistributedDiscreteGaussianEvent(50.0, 8, 200.0, 4e4, 100),
        ZCDPEvent(0.2, 0.01),
        NonPrivateEvent(),
    ))
    assert event_from_dict(json.loads(json.dumps(event_to_dict(e)))) == e
    with pytest.raises(ConfigError, match="sigma"):
        event_from_dict({"type": "gaussian", "noise_multiplier": 1.0, "sigma": 2})
    with pytest.raises(ConfigError, match="'laplace'"):
        event_from_dict({"type": "laplace"})


def test_tampered_ledger_is_refused():
    acc = PrivacyAccountant(target_delta=1e-5)
    acc.record(GaussianEvent(1.0))
    data = acc.to_dict()
    data["ledger"][0]["count"] = -3
    with pytest.raises(ConfigError, match="-3"):
        PrivacyAccountant.from_dict(data)
