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


def test_server_side_embedding_under_central_dp_restores_the_claims(tmp_path: Path) -> None:
    """Client-level DP (clip 0.1, z = 0.5, as in the private example) drowns two local steps of embedding;
    the server-side component (post-processing of the noised release, keys held by the server) brings every
    client's claim back, and the checkpoint holds the re-embedded vector that the next round starts from."""
    import numpy as np

    from fedguard.params import flatten
    from fedguard_train.privacy import hooks_from_config

    task = write_task(tmp_path / "task.jsonl")
    rows = {}
    for steps in (0, 60):
        config = tiny_config(tmp_path / str(steps), task, federation={"clients": 2, "rounds": 2},
                             data__partition="iid", training={"local_steps": 2, "batch_size": 4, "lr": 0.003},
                             watermark={"server_embed_steps": steps},
                             dp={"clip_norm": 0.1, "noise_multiplier": 0.5, "target_delta": 1e-3})
        hooks = hooks_from_config(config)
        assert [h.name for h in hooks][-1] == "watermark"  # after the DP hook: it sees the noised mean
        trainer = FedHomoLLM(config, hooks=hooks, quiet=True)
        rows[steps] = trainer.run().history[-1]
        if steps:
            saved = sorted((Path(config.run_dir) / "checkpoints").rglob("*.npy"))
            assert saved and np.array_equal(np.load(saved[-1]), flatten(trainer.model, trainer.layout))
    assert rows[0]["watermark_verified"] == 0, rows[0]
    assert rows[60]["watermark_verified"] == 2 and 0 < rows[60]["watermark_server_steps"] <= 60, rows[60]
    assert rows[60]["epsilon"] == rows[0]["epsilon"]  # post-processing: the same privacy spent


def test_the_section_passes_directions_to_the_keys_and_refuses_stored_keys_with_others(tmp_path: Path) -> None:
    from fedguard.errors import ConfigError
    from fedguard.watermark.simulation import SimulationConfig, tiny_gpt2_lora

    task = write_task(tmp_path / "task.jsonl")

    def prepared(directions: int) -> WatermarkHook:
        config = tiny_config(tmp_path, task, watermark={"bits": 40, "directions": directions,
                                                        "key_dir": str(tmp_path / "keys")})
        hook = WatermarkHook(config.watermark or {}, config=config, rng=SecureRNG.for_testing("dirs"))
        hook.prepare_model(tiny_gpt2_lora(SimulationConfig(n_layer=2), 0))
        return hook

    hook = prepared(4)
    assert {b.directions for m in hook.marks for b in m.key.blocks} == {4}
    with pytest.raises(ConfigError, match="directions is 4, the config says 2"):
        prepared(2)
    with pytest.raises(ConfigError, match="directions > 1 needs mode 'gram'"):
        WatermarkSection(directions=2, mode="invariant")
