"""The decision rule: exact binomial tail under fair coins, verdict at the significance level."""

from __future__ import annotations

import math

import pytest
from scipy.stats import binom

from fedguard.errors import ConfigError
from fedguard.watermark import binomial_p_value
from fedguard.watermark.verify import detection


def test_p_value_is_the_exact_upper_tail() -> None:
    assert binomial_p_value(64, 64) == pytest.approx(2.0**-64)
    assert binomial_p_value(0, 64) == 1.0
    assert binomial_p_value(40, 64) == pytest.approx(float(binom.sf(39, 64, 0.5)))
    assert binomial_p_value(32, 64) > 0.5
    assert binomial_p_value(1, 16, 1e-7) == pytest.approx(1 - (1 - 1e-7) ** 16)


def test_verdict_flips_exactly_at_the_significance() -> None:
    # 20/20 bits: p = 2^-20 = 9.5e-7 <= 1e-6 -> claim; 19/19: p = 1.9e-6 -> no claim.
    yes = detection(key_id="k", owner="a", scheme="sign", bits=20, matched=20)
    no = detection(key_id="k", owner="a", scheme="sign", bits=19, matched=19)
    assert yes.verdict and not no.verdict
    assert yes.bit_error_rate == 0.0
    # 64 bits: the smallest count that claims at 1e-6
    threshold = next(m for m in range(65) if binomial_p_value(m, 64) <= 1e-6)
    assert binom.sf(threshold - 1, 64, 0.5) <= 1e-6 < binom.sf(threshold - 2, 64, 0.5)
    assert detection(key_id="k", owner="", scheme="sign", bits=64, matched=threshold).verdict
    assert not detection(key_id="k", owner="", scheme="sign", bits=64, matched=threshold - 1).verdict


def test_detection_serialises_its_decision() -> None:
    d = detection(key_id="k", owner="a", scheme="sign", bits=32, matched=30, significance=1e-3)
    js = d.to_json()
    assert js["verdict"] is True and math.isclose(js["bit_error_rate"], 2 / 32)
    assert "30/32 bits matched" in d.summary()


@pytest.mark.parametrize("bad", [0.0, 1.0, -1e-6, 2, True, math.nan, "0.01"])
def test_bad_significance_is_refused(bad: float) -> None:
    with pytest.raises(ConfigError, match="significance"):
        detection(key_id="k", owner="", scheme="sign", bits=20, matched=20, significance=bad)


def test_inconsistent_counts_are_refused() -> None:
    with pytest.raises(ConfigError, match="matched=21"):
        binomial_p_value(21, 20)


def test_a_bottleneck_adapter_checkpoint_loads_for_verification(tmp_path) -> None:
    """Houlsby adapters (fedguard_train.bottleneck, peft_type FEDGUARD_BOTTLENECK) with watermarked norm
    scales saved beside them: load_model restores both and the owner's key verifies, the base does not."""
    from fedguard.watermark import SignWatermark
    from fedguard.watermark.loading import load_base, load_model
    from tests.watermark.embedding import watermarked_bottleneck

    _, key = watermarked_bottleneck(tmp_path, "bottleneck")
    from fedguard.errors import ConfigError
    from fedguard.watermark import loading
    from fedguard_train.bottleneck import PEFT_TYPE, load_adapter

    loading._ADAPTER_LOADERS.pop(PEFT_TYPE, None)
    with pytest.raises(ConfigError, match="no loader is registered"):  # the library never imports the trainer
        load_model(tmp_path / "adapter")
    loading.register_adapter_loader(PEFT_TYPE, load_adapter)  # as the audit and the attack CLI do
    loaded = load_model(tmp_path / "adapter")
    assert type(loaded).__name__ == "BottleneckModel"
    assert SignWatermark(key, loaded).detect().matched == 32
    reference = load_base(tmp_path / "adapter")
    assert reference is not None and not SignWatermark(key, reference).detect().verdict
