"""The trainer's default ``watermark:`` section reaches an ownership claim in a small run on a tiny model
(issue 14: with the former defaults, 32 bits and alpha 3e-3, such a run ended at 20-24 of 24 bits)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedguard.rng import SecureRNG
from fedguard_train.config import WatermarkSection
from fedguard_train.trainers.homo import FedHomoLLM
from fedguard_train.watermarking import WatermarkHook
from tests.train.conftest import tiny_config, write_task

pytestmark = [pytest.mark.deepspeed, pytest.mark.usefixtures("one_torch_thread")]


def test_the_default_section_claims_for_every_client_after_three_short_rounds(tmp_path: Path) -> None:
    defaults = WatermarkSection()
    assert (defaults.bits, defaults.alpha, defaults.mode, defaults.target) == (64, 0.03, "gram", "norm")
    task = write_task(tmp_path / "task.jsonl")
    config = tiny_config(tmp_path, task, watermark={}, federation={"clients": 2, "rounds": 3},
                         data__partition="iid", training={"local_steps": 8, "batch_size": 4, "lr": 0.003})
    hook = WatermarkHook(config.watermark or {}, config=config, rng=SecureRNG.for_testing("default-claims"))
    result = FedHomoLLM(config, hooks=[hook], quiet=True).run()
    last = result.history[-1]
    # 2 clients x 64 bits on a 2-layer model with hidden size 32: the bits go to the two norms read through
    # LoRA-adapted layers when they fit, else to all four (here all four: 128 constraints on 128 values)
    assert last["watermark_bits"] == 64
    assert last["watermark_verified"] == 2 and last["watermark_max_p"] <= 1e-6, last
