"""The sign-flip (randomisation) test of ``Σ b_j z_j``: exact on the grid, conservative off it, calibrated
under H0 (random keys on a model they were not embedded into), and more powerful than the sign count when
the projections carry Gaussian-like perturbations (the overwriting attacker's regime)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fedguard.errors import ConfigError
from fedguard.rng import SecureRNG
from fedguard.watermark import SignWatermark, binomial_p_value, make_sign_key
from fedguard.watermark.simulation import SimulationConfig, tiny_gpt2_lora
from fedguard.watermark.verify import sign_flip_p_value

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _enumerated(a: np.ndarray) -> float:
    """``P[Σ ε_j |a_j| ≥ Σ a_j]`` by listing all 2^N sign vectors."""
    w, s = np.abs(a), a.sum()
    signs = np.array(list(itertools.product((-1.0, 1.0), repeat=len(a))))
    return float(np.mean(signs @ w >= s - 1e-9))


def test_exact_when_the_weights_lie_on_the_grid() -> None:
    gen = np.random.default_rng(1)
    for _ in range(5):
        w = gen.integers(1, 65, 13).astype(np.float64)
        w[0] = 64.0  # the largest weight sets the grid step: 64 / 64 = 1, every weight on it
        a = w * gen.choice((-1.0, 1.0), 13, p=(0.3, 0.7))
        assert sign_flip_p_value(a, resolution=64) == pytest.approx(_enumerated(a), rel=1e-12)


def test_conservative_and_tight_off_the_grid() -> None:
    gen = np.random.default_rng(2)
    for _ in range(8):
        a = gen.normal(0.4, 1.0, 14)
        exact = _enumerated(a)
        p = sign_flip_p_value(a)
        assert exact <= p <= exact + 0.01
        assert sign_flip_p_value(a, resolution=8) >= p - 1e-12  # a coarser grid only loosens the bound


def test_extremes_and_erased_bits() -> None:
    assert sign_flip_p_value(np.ones(64)) == pytest.approx(2.0**-64)
    assert sign_flip_p_value(-np.ones(8)) == 1.0 and sign_flip_p_value(np.zeros(8)) == 1.0
    a = np.random.default_rng(3).normal(1.0, 1.0, 20)
    padded = np.concatenate([a, np.full(10, 1e-9), np.zeros(5)])
    assert sign_flip_p_value(padded, erased=1e-6) == pytest.approx(sign_flip_p_value(a))


def test_calibrated_under_the_null() -> None:
    """Fixed magnitudes, fair random signs: P[p <= t] <= t (up to sampling error) at every t."""
    gen = np.random.default_rng(4)
    w = np.abs(gen.normal(size=24)) + 0.05
    ps = np.array([sign_flip_p_value(w * gen.choice((-1.0, 1.0), 24), resolution=256) for _ in range(3000)])
    for t in (0.01, 0.05, 0.2):
        assert np.mean(ps <= t) <= t + 3 * np.sqrt(t * (1 - t) / len(ps)), t


def test_more_powerful_than_the_sign_count_under_gaussian_perturbations() -> None:
    """z_j = b_j·μ + N(0, 1), μ = 0.5, N = 64: the median log p of the sign-flip test is below the
    binomial count's (Pitman efficiency π/2 in the exponent)."""
    gen = np.random.default_rng(5)
    flip, count = [], []
    for _ in range(200):
        a = 0.5 + gen.normal(size=64)  # agreements b_j z_j
        flip.append(np.log(sign_flip_p_value(a, resolution=512)))
        count.append(np.log(binomial_p_value(int((a > 0).sum()), 64)))
    assert np.median(flip) < np.median(count) - 0.5


def test_on_a_model_the_test_claims_for_the_owner_only() -> None:
    model = tiny_gpt2_lora(SimulationConfig(n_layer=2), 0)
    key = make_sign_key(model, bits=64, alpha=1.0, mode="gram", rng=SecureRNG.for_testing("flip/owner"))
    wm = SignWatermark(key, model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(40):
        loss = wm.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    d = wm.detect(test="sign-flip")
    assert d.verdict and d.test == "sign-flip" and d.to_json()["test"] == "sign-flip"
    assert wm.detect().test == "binomial" and d.matched == wm.detect().matched
    strangers = [SignWatermark(make_sign_key(model, bits=64, mode="gram", rng=SecureRNG.for_testing(f"flip/s{i}")),
                               model).detect(test="sign-flip").p_value for i in range(60)]
    assert min(strangers) > 1e-6  # 60 keys at 1e-6: P[any false claim] <= 6e-5
    assert np.mean(np.array(strangers) <= 0.1) <= 0.3


def test_bad_input_is_a_config_error() -> None:
    model = tiny_gpt2_lora(SimulationConfig(n_layer=2), 0)
    wm = SignWatermark(make_sign_key(model, bits=32, rng=SecureRNG.for_testing("flip/bad")), model)
    with pytest.raises(ConfigError, match="unknown test"):
        wm.detect(test="t-test")
    with pytest.raises(ConfigError, match="finite"):
        sign_flip_p_value(np.array([1.0, np.nan]))
    with pytest.raises(ConfigError, match="non-empty"):
        sign_flip_p_value(np.array([]))
    with pytest.raises(ConfigError, match="resolution"):
        sign_flip_p_value(np.ones(3), resolution=0)
