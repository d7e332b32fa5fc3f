"""Noise calibration: certified by the accounting library, typed errors when impossible."""

from __future__ import annotations

import pytest

from fedguard.dp.calibration import calibrate_noise_multiplier, epsilon_for, max_steps
from fedguard.dp.errors import UnreachableTargetError
from fedguard.errors import ConfigError


@pytest.mark.parametrize("backend", ["rdp", "pld"])
def test_calibrated_noise_meets_the_target_and_is_nearly_minimal(backend):
    kw = dict(steps=50, sampling_rate=0.1, target_delta=1e-5, backend=backend)
    z = calibrate_noise_multiplier(target_epsilon=2.0, tol=5e-3, **kw)
    assert epsilon_for(z, **kw) <= 2.0
    assert epsilon_for(z - 0.01, **kw) > 2.0


def test_unreachable_target_is_a_typed_error_naming_the_target():
    with pytest.raises(UnreachableTargetError, match="target_epsilon=0.001"):
        calibrate_noise_multiplier(
            target_epsilon=0.001, target_delta=1e-5, steps=1000, sampling_rate=1.0, backend="rdp",
            max_noise_multiplier=4.0,
        )


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"target_epsilon": -1.0}, "target_epsilon must be a finite number > 0, got -1.0"),
        ({"sampling_rate": 0.0}, "sampling_rate must be a finite number in (0, 1], got 0.0"),
        ({"sampling_rate": 1.2}, "got 1.2"),
        ({"target_delta": 0.01, "population": 1000}, "got 0.01"),
        ({"steps": 0}, "steps must be an int >= 1, got 0"),
    ],
)
def test_bad_calibration_input_is_a_typed_error_naming_the_value(kwargs, needle):
    args = dict(target_epsilon=1.0, target_delta=1e-5, steps=10, sampling_rate=0.1, backend="rdp")
    args.update(kwargs)
    with pytest.raises(ConfigError) as err:
        calibrate_noise_multiplier(**args)
    assert needle in str(err.value)


def test_max_steps_is_the_exact_boundary():
    kw = dict(noise_multiplier=1.0, sampling_rate=0.05, target_delta=1e-5, backend="rdp")
    n = max_steps(target_epsilon=2.0, **kw)
    eps = lambda k: epsilon_for(1.0, steps=k, sampling_rate=0.05, target_delta=1e-5, backend="rdp")  # noqa: E731
    assert eps(n) <= 2.0 < eps(n + 1)
