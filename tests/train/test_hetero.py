"""FedHeteroLLM (trainer: hetero) end to end on tiny random models of several families and two tokenisers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedguard.errors import ConfigError
from fedguard_train.checkpoint import load_latest
from fedguard_train.config import TrainConfig
from fedguard_train.trainers.hetero import FedHeteroLLM, drop_layers, load_model
from tests.train.conftest import UpdateNorms, tiny_config

pytestmark = pytest.mark.deepspeed


def hetero_config(tmp_path: Path, task: Path, **overrides: Any) -> TrainConfig:
    """Mentee: tiny GPT-2 with GPT-2's BPE; client 0: a tiny Qwen2 teacher with the same tokeniser,
    fine-tuned locally; client 1: a tiny Llama teacher with the byte tokeniser (cross-tokeniser path)."""
    hetero: dict[str, Any] = {
        "teachers": {"client0": {"source": "tiny:qwen2", "tokenizer": "gpt2", "finetune_steps": 3,
                                 "finetune_lr": 0.01},
                     "client1": {"source": "tiny:llama", "tokenizer": "own"}},
        "mentee_tokenizer": "gpt2", "lam": 1.0, "temperature": 2.0, "top_k": 4, "alignment": "dtw",
    }
    hetero.update(overrides.pop("hetero", {}))
    return tiny_config(tmp_path, task, trainer="hetero", hetero=hetero, **overrides)


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDGUARD_CACHE", str(tmp_path / "cache"))  # the vocabulary map's cache


def test_two_tokenisers_masking_rounds_report_kd_and_keep_teachers_local(tmp_path: Path, task: Path) -> None:
    config = hetero_config(tmp_path, task, federation={"clients": 2, "rounds": 2, "aggregator": "masking"})
    trainer = FedHeteroLLM(config, quiet=True)
    descriptions = trainer.teacher_descriptions()
    assert "fine-tuned on client 0's data for 3 steps" in descriptions[0] and "same as the mentee" in descriptions[0]
    assert "different from the mentee" in descriptions[1] and "not fine-tuned" in descriptions[1]
    teacher_values = {k: sum(p.numel() for p in t.model.parameters()) for k, t in enumerate(trainer.teachers)}
    result = trainer.run()
    assert len(result.history) == 2
    for row in result.history:
        assert np.isfinite(row["lm_loss"]) and row["kd_loss"] > 0
        counts = row["alignment"]
        assert counts["one_to_one"] > 0 and counts["mentee_tokens"] >= counts["one_to_one"]
    # a GPT-2 mentee token covers several of the byte teacher's tokens: one-to-many (the last one is used)
    assert result.history[0]["alignment"]["one_to_many"] > 0
    # nothing of a teacher travels or is stored: the update is the mentee's adapter only
    ckpt = load_latest(Path(config.run_dir))
    assert ckpt is not None and ckpt.vector.size == trainer.layout.size and not ckpt.arrays
    assert trainer.layout.size < min(teacher_values.values())
    per_value = result.history[0]["bytes_up"] / (2 * trainer.layout.size)
    assert per_value < 40  # masked ring elements of the adapter's values, not the teachers' weights
    stored = sum(f.stat().st_size for f in (Path(config.run_dir) / "checkpoints").rglob("*") if f.is_file())
    assert stored < 4 * min(teacher_values.values())  # a teacher's float32 weights would not fit
    names = {n for n, _ in trainer.model.named_parameters()}
    for t in trainer.teachers:
        assert not any(p.requires_grad for p in t.model.parameters())
        assert all(id(p) not in {id(q) for q in trainer.model.parameters()} for p in t.model.parameters())
    assert names  # the mentee exists
    # the vocabulary map was cached for the cross-tokeniser pair
    assert list((tmp_path / "cache" / "vocab-maps").glob("vocab-map-*.npz"))
    report = (Path(config.run_dir) / "hetero.md").read_text()
    assert "fine-tuned on client 0" in report and "| 2 |" in report


def test_kd_changes_the_update_and_lam_zero_is_plain_lm(tmp_path: Path, task: Path) -> None:
    vectors = {}
    for lam in (0.0, 1.0):
        config = hetero_config(tmp_path / f"lam{lam}", task, hetero={"lam": lam},
                               federation={"clients": 2, "rounds": 1})
        trainer = FedHeteroLLM(config, quiet=True)
        result = trainer.run()
        vectors[lam] = load_latest(Path(config.run_dir)).vector  # type: ignore[union-attr]
        assert ("kd_loss" in result.history[0]) == (lam > 0)
    assert not np.array_equal(vectors[0.0], vectors[1.0])


def test_resume_after_round_one_is_bit_identical(tmp_path: Path, task: Path) -> None:
    full = hetero_config(tmp_path / "a", task, hetero={"direction": "reverse", "alignment": "boundary"})
    FedHeteroLLM(full, quiet=True).run()
    first = hetero_config(tmp_path / "b", task, hetero={"direction": "reverse", "alignment": "boundary"},
                          federation={"clients": 2, "rounds": 1})
    FedHeteroLLM(first, quiet=True).run()
    resumed = hetero_config(tmp_path / "b", task, hetero={"direction": "reverse", "alignment": "boundary"})
    FedHeteroLLM(resumed, quiet=True).run(resume=True)
    a, b = load_latest(Path(full.run_dir)), load_latest(Path(resumed.run_dir))
    assert a is not None and b is not None and a.round == b.round == 2
    np.testing.assert_array_equal(a.vector, b.vector)


def test_layer_drop_keeps_evenly_spaced_blocks() -> None:
    model, _ = load_model("tiny:llama", "auto", "own", seed=0)
    from fedguard_train.emulator import decoder_blocks
    from fedguard_train.models import family_of

    assert drop_layers(model, None) is model
    one = drop_layers(model, 1)
    assert len(decoder_blocks(one, family_of(one))) == 1
    np.testing.assert_array_equal(one.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy(),
                                  model.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy())
    with pytest.raises(ConfigError):
        load_model("smollm2", "auto", "gpt2", seed=0)


def test_bad_hetero_configs_are_refused(tmp_path: Path, task: Path) -> None:
    with pytest.raises(ConfigError, match="exactly"):
        hetero_config(tmp_path, task, hetero={"teachers": {"client0": {"source": "tiny:llama"}}})
    with pytest.raises(ConfigError, match="did you mean 'layers'"):
        hetero_config(tmp_path, task, hetero={"teachers": {"client0": {"source": "tiny:llama", "layer": 1},
                                                           "client1": {"source": "tiny:llama"}}})
    with pytest.raises(ConfigError, match="in-process"):
        hetero_config(tmp_path, task, training={"local_steps": 1, "batch_size": 4, "nproc_per_node": 2})
    with pytest.raises(ConfigError, match="hetero: section"):
        tiny_config(tmp_path, task, trainer="hetero")
    with pytest.raises(ConfigError, match="applies to trainer 'hetero' only"):
        tiny_config(tmp_path, task, hetero={"teachers": {"client0": {"source": "tiny:llama"},
                                                         "client1": {"source": "tiny:llama"}}})
    with pytest.raises(ConfigError) as err:
        hetero_config(tmp_path, task, hetero={"top_k": 0, "temperature": 0, "direction": "both", "lam": -1})
    text = str(err.value)
    assert "direction" in text
    with pytest.raises(ConfigError) as err2:
        hetero_config(tmp_path, task, hetero={"top_k": 0, "temperature": 0, "lam": -1})
    assert all(k in str(err2.value) for k in ("top_k", "temperature", "lam"))


@pytest.mark.parametrize("method", ["p-tuning-v2", "prompt-tuning", "bottleneck"])
def test_every_peft_method_of_the_mentee_trains_with_kd(tmp_path: Path, task: Path, method: str) -> None:
    """The issue's mentee adapters beyond LoRA: the KD term must line up with the mentee's own positions even
    when the method prepends virtual tokens (prompt tuning), and change the travelling vector."""
    config = hetero_config(tmp_path, task, adapter={"method": method, "pre_seq_len": 4},
                           federation={"clients": 2, "rounds": 1})
    trainer = FedHeteroLLM(config, quiet=True)
    start = trainer.global_vector().copy()
    result = trainer.run()
    row = result.history[-1]
    assert row["kd_loss"] > 0 and np.isfinite(row["kd_loss"]) and np.isfinite(row["lm_loss"])
    assert not np.array_equal(load_latest(Path(config.run_dir)).vector, start)  # type: ignore[union-attr]


def test_client_level_dp_clips_the_mentee_update_and_accounts(tmp_path: Path, task: Path) -> None:
    """The DP hook sees FedHeteroLLM's client update like FedHomoLLM's: the mentee adapter's vector, clipped
    to the bound, with the accountant's epsilon in the round's row (the teacher's KD is part of the local loss,
    before the clip)."""
    from fedguard_train.privacy import hooks_from_config

    config = hetero_config(tmp_path, task, dp={"clip_norm": 0.05, "noise_multiplier": 1.0, "target_delta": 1e-3},
                           federation={"clients": 2, "rounds": 1})
    norms = UpdateNorms()
    trainer = FedHeteroLLM(config, hooks=[*hooks_from_config(config), norms], quiet=True)
    result = trainer.run()
    assert result.history[0]["epsilon"] > 0 and result.history[0]["kd_loss"] > 0
    assert len(norms.seen) == 2
    assert all(size == trainer.layout.size and norm <= 0.05 * (1 + 1e-4) for size, norm in norms.seen)


def test_each_clients_watermark_verifies_after_kd_rounds(tmp_path: Path, task: Path) -> None:
    """The watermark hook's loss is chained after the KD term: every client's mark is embedded in the mentee
    adapter through federated KD rounds (chance: 12 of 24 bits)."""
    from fedguard.rng import SecureRNG
    from fedguard_train.watermarking import WatermarkHook

    config = hetero_config(tmp_path, task, watermark={"bits": 24, "alpha": 0.1},
                           federation={"clients": 2, "rounds": 2},
                           training={"local_steps": 8, "batch_size": 4, "lr": 0.003})
    hook = WatermarkHook(config.watermark or {}, config=config, rng=SecureRNG.for_testing("wm-hetero"))
    trainer = FedHeteroLLM(config, hooks=[hook], quiet=True)
    last = trainer.run().history[-1]
    assert last["kd_loss"] > 0
    assert all(m >= 18 for m in last["watermark_matched"]), last
    assert last["watermark_max_p"] < 0.02, last
