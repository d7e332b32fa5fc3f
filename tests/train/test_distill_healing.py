"""Healing a layer-dropped model by distillation from the full model (fedguard_train/healing.py), its cache,
the WordNet pairs no run can draw, and the healed mentee / small model in FedHeteroLLM and FedCoLLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedguard.errors import ConfigError
from fedguard_train.config import HealSection, ModelConfig, TrainConfig
from fedguard_train.emulator import load_server_model, windows
from fedguard_train.healing import even_blocks, heal_stream, healed_model
from tests.train.conftest import tiny_config

SMALL = HealSection(steps=30, batch_size=4, seq_len=32, lr=2e-3, data="common-licenses")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDGUARD_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def full() -> tuple[torch.nn.Module, object]:
    return load_server_model(ModelConfig(name_or_path="tiny:llama:6"), seed=0)


@torch.no_grad()
def _kl(full: torch.nn.Module, small: torch.nn.Module, chunks: list[list[int]]) -> float:
    ids = torch.tensor(chunks)
    log_p = torch.log_softmax(full(input_ids=ids).logits.float(), -1)
    log_q = torch.log_softmax(small(input_ids=ids).logits.float(), -1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def test_healing_brings_the_dropped_model_towards_the_full_one_on_held_out_text(full: tuple, tmp_path: Path) -> None:
    model, tokenizer = full
    from fedguard_train.emulator import EmulatorRecipe, build_emulator, fingerprint

    kept = even_blocks(6, 2)
    assert kept == (0, 5)
    dropped = build_emulator(model, EmulatorRecipe("llama", 6, 0, 0, 0.0, kept, fingerprint(model)))
    healed, info = healed_model(model, tokenizer, 2, SMALL, progress=False)
    stream = heal_stream("common-licenses", tokenizer, 32 * (SMALL.steps * SMALL.batch_size + 64))
    held_out = windows(stream, 32)[-8:]  # the windows healing holds out (the last tenth)
    before, after = _kl(model, dropped, held_out), _kl(model, healed, held_out)
    assert after < 0.8 * before, (before, after)
    assert info.loss_last < info.loss_first and not info.cached and info.kept == kept
    # only the kept blocks and the final norm moved: the (tied) embeddings are the full model's
    assert torch.equal(healed.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert len(healed.model.layers) == 2 and not any(p.requires_grad for p in healed.parameters())
    assert "2 of 6 blocks [0, 5], healed by distillation" in info.describe()


def test_the_cache_returns_the_same_weights_without_training_and_the_key_follows_the_recipe(full: tuple,
                                                                                              tmp_path: Path) -> None:
    model, tokenizer = full
    first, info = healed_model(model, tokenizer, 2, SMALL, progress=False)
    again, cached = healed_model(model, tokenizer, 2, SMALL, progress=False)
    assert cached.cached and cached.seconds == 0.0 and cached.key == info.key
    assert cached.ppl_after == info.ppl_after
    for (name, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    other, info_other = healed_model(model, tokenizer, 2, HealSection(**{**SMALL.__dict__, "lr": 1e-3}),
                                     progress=False)
    assert info_other.key != info.key and not info_other.cached
    assert len(list((tmp_path / "cache" / "healed").iterdir())) == 2
    # a cache that does not fit this model is refused, not silently loaded
    directory = tmp_path / "cache" / "healed" / info.key[:32]
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "blocks.safetensors")
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(directory / "blocks.safetensors"))
    with pytest.raises(ConfigError, match="does not fit"):
        healed_model(model, tokenizer, 2, SMALL, progress=False)


def test_healing_refuses_a_model_it_would_not_drop_and_bad_settings(full: tuple) -> None:
    model, tokenizer = full
    with pytest.raises(ConfigError, match="drop none"):
        healed_model(model, tokenizer, 6, SMALL, progress=False)
    with pytest.raises(ConfigError) as err:
        HealSection(steps=0, lr=-1.0, kd_weight=0.0, hidden_weight=0.0)
    assert "steps must be >= 1" in str(err.value) and "lr must be > 0" in str(err.value)
    assert "not both 0" in str(err.value)


def test_unused_wordnet_pairs_share_no_lemma_and_no_definition_with_any_run() -> None:
    from fedguard_train.data import WORDNET_ROOT, load_wordnet
    from fedguard_train.public_data import lemma_of, unused_wordnet_pairs

    if not (WORDNET_ROOT / "data.noun").is_file():
        pytest.skip("WordNet (wordnet-base) is not installed")
    unused = unused_wordnet_pairs()
    pool = load_wordnet(max_examples=10**7, seed=0)  # every example any run can draw, whatever its seed
    assert len(unused) > 1000 and len(pool) > 1000
    lemmas, definitions = {lemma_of(e.prompt) for e in pool}, {e.response for e in pool}
    assert not [e for e in unused if lemma_of(e.prompt) in lemmas or e.response in definitions]


@pytest.mark.deepspeed
def test_hetero_heals_the_mentee_caches_teachers_and_scores_them(tmp_path: Path, task: Path) -> None:
    from fedguard_train.trainers.hetero import FedHeteroLLM

    heal = {"steps": 4, "batch_size": 2, "seq_len": 16, "lr": 1e-3, "data": "mixed"}
    hetero = {"teachers": {"client0": {"source": "tiny:llama", "finetune_steps": 3, "finetune_lr": 0.01},
                           "client1": {"source": "tiny:llama", "layers": 1, "finetune_steps": 2, "finetune_lr": 0.01,
                                       "heal": {"steps": 2, "batch_size": 2, "seq_len": 16}}},
              "lam": 1.0, "top_k": 4, "mentee_layers": 1, "mentee_heal": heal}
    config = tiny_config(tmp_path, task, trainer="hetero", hetero=hetero, model={"name_or_path": "tiny:llama"},
                         federation={"clients": 2, "rounds": 1})
    trainer = FedHeteroLLM(config, quiet=True)
    assert trainer.heal_info is not None and trainer.heal_info.kept == (0,)
    trainer.run()
    report = (Path(config.run_dir) / "hetero.md").read_text()
    assert "mentee healing: 1 of 2 blocks [0], healed by distillation" in report
    assert "## Teachers on the held-out split" in report
    assert "1 of 2 blocks, layer-dropped; healed: held-out perplexity" in trainer.teacher_descriptions()[1]
    extra = json.loads((Path(config.run_dir) / "hetero.json").read_text())
    assert len(extra["teachers"]) == 2 and all(t["perplexity"] > 0 for t in extra["teachers"])
    teachers = sorted((tmp_path / "cache" / "teachers").iterdir())
    assert len(teachers) == 2  # one per (teacher, client data)
    # a second set-up loads both fine-tuned teachers from the cache: the same weights, no fine-tuning
    again = FedHeteroLLM(TrainConfig.from_dict({**config.to_dict(), "run_dir": str(tmp_path / "run2")}), quiet=True)
    assert again.heal_info is not None and again.heal_info.cached
    for a, b in zip(trainer.teachers, again.teachers, strict=True):
        for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
            assert torch.equal(x, y), name
    assert again.teacher_descriptions() == trainer.teacher_descriptions()
    assert sorted((tmp_path / "cache" / "teachers").iterdir()) == teachers


def test_heal_needs_a_layer_count(tmp_path: Path, task: Path) -> None:
    from fedguard_train.trainers.co import FedCoLLM
    from fedguard_train.trainers.hetero import FedHeteroLLM

    hetero = {"teachers": {"client0": {"source": "tiny:llama"}, "client1": {"source": "tiny:llama"}},
              "mentee_heal": {"steps": 1}}
    config = tiny_config(tmp_path, task, trainer="hetero", hetero=hetero)
    with pytest.raises(ConfigError, match="set hetero.mentee_layers"):
        FedHeteroLLM(config, quiet=True)
    with pytest.raises(ConfigError, match="needs teachers.client0.layers"):
        tiny_config(tmp_path, task, trainer="hetero",
                    hetero={**hetero, "teachers": {"client0": {"source": "tiny:llama", "heal": {"steps": 1}}}})
    with pytest.raises(ConfigError, match="teachers.client0.heal: .*steps must be >= 1"):
        tiny_config(tmp_path, task, trainer="hetero",
                    hetero={**hetero, "teachers": {"client0": {"source": "tiny:llama", "layers": 1,
                                                               "heal": {"steps": 0}}}})
    config = tiny_config(tmp_path, task, trainer="co", co={"server_model": "tiny:llama:4", "small_heal": {"steps": 1}})
    with pytest.raises(ConfigError, match="set co.small_layers"):
        FedCoLLM(config, quiet=True)
    with pytest.raises(ConfigError, match="small_heal"):
        tiny_config(tmp_path, task, trainer="co", co={"small_heal": {"stepz": 1}})


@pytest.mark.deepspeed
def test_co_heals_the_small_model_before_round_one(tmp_path: Path, task: Path) -> None:
    from fedguard_train.trainers.co import FedCoLLM

    co = {"server_model": "tiny:llama:4", "small_layers": 1, "public_examples": 8, "public_seq_len": 16,
          "server_steps": 1, "small_heal": {"steps": 3, "batch_size": 2, "seq_len": 16, "data": "common-licenses"}}
    config = tiny_config(tmp_path, task, trainer="co", co=co, model={"name_or_path": "tiny:llama"},
                         federation={"clients": 2, "rounds": 1})
    trainer = FedCoLLM(config, quiet=True)
    trainer.run()
    meta = json.loads((Path(config.run_dir) / "heal.json").read_text())
    assert meta["kept"] == [0] and meta["settings"]["steps"] == 3 and meta["ppl_after"] > 0


CPU_RECIPE = HealSection(steps=30, batch_size=4, seq_len=32, lr=2e-3, data="common-licenses", kd_positions=8,
                         teacher_precision="bfloat16")


def test_the_cheaper_cpu_recipe_still_brings_the_dropped_model_towards_the_full_one(full: tuple) -> None:
    """The examples' CPU recipe computes the logit KD on a few sampled positions per window and the full model's
    forward in bfloat16: the dropped model must still move towards the full one on held-out windows."""
    model, tokenizer = full
    from fedguard_train.emulator import EmulatorRecipe, build_emulator, fingerprint

    kept = even_blocks(6, 2)
    dropped = build_emulator(model, EmulatorRecipe("llama", 6, 0, 0, 0.0, kept, fingerprint(model)))
    healed, info = healed_model(model, tokenizer, 2, CPU_RECIPE, progress=False)
    stream = heal_stream("common-licenses", tokenizer, 32 * (CPU_RECIPE.steps * CPU_RECIPE.batch_size + 64))
    held_out = windows(stream, 32)[-8:]
    before, after = _kl(model, dropped, held_out), _kl(model, healed, held_out)
    assert after < 0.8 * before, (before, after)
    assert info.ppl_after < info.ppl_before and info.loss_last < info.loss_first
    assert "KD on 8 of 32 positions, teacher forward in bfloat16" in info.describe()
    # the full model itself is untouched (its forward ran under autocast only)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_the_new_settings_keep_the_keys_of_healings_cached_before_them(full: tuple) -> None:
    """kd_positions/teacher_precision at their old behaviour leave the cache key as it was (so a cache made
    before they existed still loads); any other value makes a new key."""
    import dataclasses
    import hashlib

    from fedguard_train.healing import _key

    old_settings = {k: v for k, v in dataclasses.asdict(SMALL).items() if k not in ("kd_positions", "teacher_precision")}
    raw = {"fingerprint": "f", "kept": [0, 5], "settings": old_settings, "text": "t", "version": 1}
    assert _key("f", (0, 5), SMALL, "t") == hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
    assert _key("f", (0, 5), dataclasses.replace(SMALL, kd_positions=8), "t") != _key("f", (0, 5), SMALL, "t")
    assert _key("f", (0, 5), dataclasses.replace(SMALL, teacher_precision="bfloat16"), "t") != _key("f", (0, 5), SMALL,
                                                                                                      "t")


def test_bad_cheap_settings_are_refused() -> None:
    with pytest.raises(ConfigError) as err:
        HealSection(seq_len=32, kd_positions=33, teacher_precision="float16")  # type: ignore[arg-type]
    assert "kd_positions must be in [0, seq_len=32]" in str(err.value)
    assert "teacher_precision must be 'float32' or 'bfloat16'" in str(err.value)
