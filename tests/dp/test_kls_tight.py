"""The distributed discrete Gaussian is accounted with the minimum of KLS Proposition 14's forms at each
Rényi order: epsilon never increases against the previous single-form accounting (the form smallest at
order 32), and decreases where the forms cross (small local scales, where τ does not underflow)."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest

from fedguard.dp import PrivacyAccountant
from fedguard.dp.events import DistributedDiscreteGaussianEvent


def _single_form_epsilon(event: DistributedDiscreteGaussianEvent, count: int, delta: float) -> float:
    acc = dp_accounting.rdp.RdpAccountant()
    bound = event.zcdp_bound()
    acc.compose(dp_accounting.ZCDpEvent(rho=bound.rho, xi=bound.xi), count)
    return float(acc.get_epsilon(delta))


def test_epsilon_never_increases_and_is_tighter_where_the_forms_cross() -> None:
    rnd = np.random.default_rng(13)
    tighter = 0
    for _ in range(60):
        s = float(rnd.uniform(0.5, 3.0))
        n = int(rnd.integers(2, 12))
        d = int(rnd.integers(10, 5000))
        l2 = float(rnd.uniform(0.5, 4.0)) * s
        event = DistributedDiscreteGaussianEvent(s, n, l2, min(l2 * l2, np.sqrt(d) * l2), d)
        count = int(rnd.integers(1, 50))
        acc = PrivacyAccountant(target_delta=1e-5, backend="rdp")
        acc.record(event, count)
        new, old = acc.epsilon(), _single_form_epsilon(event, count, 1e-5)
        assert new <= old * (1 + 1e-12)
        tighter += new < old * (1 - 1e-6)
    assert tighter > 0


def test_the_per_order_curve_is_the_minimum_of_the_three_forms() -> None:
    event = DistributedDiscreteGaussianEvent(0.8, 5, 2.0, 4.0, 200)
    orders = [1.5, 2.0, 8.0, 32.0, 256.0]
    curve = event.rdp(orders)
    for alpha, value in zip(orders, curve, strict=True):
        candidates = [xi + rho * alpha for rho, xi in event.forms()]
        assert value == min(candidates)
        assert value <= event.zcdp_bound().xi + event.zcdp_bound().rho * alpha


def test_large_scales_are_unchanged() -> None:
    event = DistributedDiscreteGaussianEvent(50.0, 4, 100.0, 1000.0, 10_000)  # τ underflows: forms coincide
    acc = PrivacyAccountant(target_delta=1e-5, backend="rdp")
    acc.record(event, 10)
    assert acc.epsilon() == pytest.approx(_single_form_epsilon(event, 10, 1e-5), rel=1e-12)
