"""FedOST (trainer: ost): emulator construction for every family, the no-dropped-weights property,
plug-in, checkpoints with recipe, resume, secure aggregation, distillation, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedguard.errors import ConfigError
from fedguard_train.checkpoint import load_latest
from fedguard_train.config import ModelConfig, TrainConfig
from fedguard_train.emulator import (
    ADAPTER_FILE,
    EmulatorModel,
    adapter_state,
    build_emulator,
    decoder_blocks,
    distilled_emulator,
    emulator_from_payload,
    load_plugged_model,
    load_server_model,
    make_recipe,
    middle_nmse,
    payload,
    plan_blocks,
    plug,
    text_chunks,
)
from fedguard_train.models import FAMILIES, byte_tokenizer
from fedguard_train.trainers.ost import FedOST
from tests.train.conftest import UpdateNorms, tiny_config

HUB = ["llama", "gpt2", "bloom", "opt", "qwen2"]


def _smollm2_shaped(n_layers: int = 8) -> torch.nn.Module:
    """A tiny Llama with SmolLM2-135M's shape traits: tied embeddings, 9 query heads over 3 KV heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=36, intermediate_size=96, num_hidden_layers=n_layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


def _full(family: str, n_layers: int = 8) -> torch.nn.Module:
    if family == "smollm2-shape":
        return _smollm2_shaped(n_layers)
    model, _ = load_server_model(ModelConfig(name_or_path=f"tiny:{family}:{n_layers}"))
    return model.eval()


def test_layer_drop_keeps_the_adapter_and_evenly_spaced_middle_blocks() -> None:
    kept = plan_blocks(30, 2, 2, 0.5)
    assert kept[:2] == (0, 1) and kept[-2:] == (28, 29)
    middle = kept[2:-2]
    assert len(middle) == 13 and middle[0] == 2 and middle[-1] == 27  # 26 middle blocks, 13 dropped
    gaps = np.diff(middle)
    assert gaps.min() >= 2 and gaps.max() <= 3  # evenly spread
    assert len(plan_blocks(30, 2, 2, 0.25)) == 4 + 26 - 7 and plan_blocks(8, 1, 1, 0.0) == tuple(range(8))
    with pytest.raises(ConfigError, match="leaves no middle"):
        plan_blocks(4, 2, 2, 0.5)
    with pytest.raises(ConfigError, match=r"drop must be in \[0, 1\)"):
        plan_blocks(8, 2, 2, 1.0)


@pytest.mark.parametrize("family", ["smollm2-shape", *HUB])
def test_no_client_side_tensor_is_a_dropped_block(family: str) -> None:
    """The client's emulator, rebuilt from the bytes the server sends, holds nothing of a dropped block:
    no tensor shares storage with, or equals, any dropped block's tensor; the kept blocks are exact."""
    full = _full(family)
    fam = FAMILIES["llama" if family == "smollm2-shape" else family]
    recipe = make_recipe(full, fam, bottom=2, top=2, drop=0.5)
    assert len(recipe.dropped) == 2 and set(recipe.dropped).isdisjoint(recipe.adapter_blocks)
    sent = payload(build_emulator(full, recipe))
    client = EmulatorModel(emulator_from_payload(sent), recipe)
    assert len(decoder_blocks(client.emulator, fam)) == 6
    blocks = decoder_blocks(full, fam)
    dropped = [t for i in recipe.dropped for t in blocks[i].state_dict().values()
               if t.numel() > 1 and float(t.float().std()) > 0]  # random tensors (not constant norm inits)
    assert dropped
    client_tensors = [*client.state_dict().values(), *(p for p in client.parameters())]
    for secret in dropped:
        for tensor in client_tensors:
            assert tensor.data_ptr() != secret.data_ptr()
            assert not (tensor.shape == secret.shape and torch.equal(tensor, secret))
    # what the client holds of the kept blocks is the full model's, bit for bit
    for mine, original in zip(decoder_blocks(client.emulator, fam), [blocks[i] for i in recipe.kept]):
        for (_, a), (_, b) in zip(mine.state_dict().items(), original.state_dict().items()):
            assert torch.equal(a, b)
    # only the adapter blocks train
    trainable = {n for n, p in client.named_parameters() if p.requires_grad}
    assert trainable == set(client.adapter_names())
    adapter_ids = {recipe.kept.index(i) for i in recipe.adapter_blocks}
    prefix = "emulator." + {"gpt2": "transformer.h", "bloom": "transformer.h", "opt": "model.decoder.layers"}.get(
        fam.name, "model.layers")
    assert {int(n[len(prefix) + 1:].split(".")[0]) for n in trainable} == adapter_ids


@pytest.mark.parametrize("family", ["smollm2-shape", *HUB])
def test_adapters_trained_on_the_emulator_plug_into_the_full_model(family: str) -> None:
    full = _full(family)
    fam = FAMILIES["llama" if family == "smollm2-shape" else family]
    recipe = make_recipe(full, fam, bottom=1, top=2, drop=0.5)
    client = EmulatorModel(emulator_from_payload(payload(build_emulator(full, recipe))), recipe)
    ids = torch.randint(0, 250, (2, 12))
    with torch.no_grad():
        before = full(input_ids=ids).logits
    opt = torch.optim.SGD([p for p in client.parameters() if p.requires_grad], lr=0.5)
    client.train()
    for _ in range(3):
        opt.zero_grad()
        client(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    plug(full, client.emulator, recipe)
    trained = adapter_state(client.emulator, recipe)
    own = full.state_dict()
    assert trained and all(torch.equal(own[name], t) for name, t in trained.items())
    with torch.no_grad():
        assert not torch.allclose(full(input_ids=ids).logits, before)
    out = client.generate(input_ids=ids[:1], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 14)


def test_distillation_lowers_the_middles_nmse_and_is_cached(tmp_path: Path) -> None:
    full = _full("llama", 8)
    tok = byte_tokenizer()
    recipe = make_recipe(full, FAMILIES["llama"], bottom=2, top=2, drop=0.5)
    kwargs = {"source": "common-licenses", "seq_len": 32, "max_tokens": 6000, "batch_size": 4, "lr": 3e-3,
              "seed": 0, "progress": False, "cache": tmp_path}
    emulator, distilled = distilled_emulator(full, recipe, tok, **kwargs)  # type: ignore[arg-type]
    assert distilled.distill is not None and distilled.distill["nmse"] < distilled.distill["nmse_before"]
    held = text_chunks(["Public text the distillation never saw: " * 40], tok, 32, 10_000)
    plain = build_emulator(full, recipe)
    assert middle_nmse(full, emulator, recipe, held) < middle_nmse(full, plain, recipe, held)
    cached = list(tmp_path.iterdir())
    assert len(cached) == 1 and (cached[0] / "middle.safetensors").is_file()
    again, recipe2 = distilled_emulator(full, recipe, tok, **kwargs)  # type: ignore[arg-type]
    assert recipe2.distill == distilled.distill
    for a, b in zip(again.state_dict().values(), emulator.state_dict().values()):
        assert torch.equal(a, b)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="cannot be read"):
        distilled_emulator(full, recipe, tok, **{**kwargs, "source": str(tmp_path / "missing")})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="holds no text"):
        distilled_emulator(full, recipe, tok, **{**kwargs, "source": str(tmp_path / "empty")})  # type: ignore[arg-type]


def _ost_config(tmp_path: Path, task: Path, **overrides: object) -> TrainConfig:
    raw: dict[str, object] = {"trainer": "ost", "model": {"name_or_path": "tiny:llama:6"},
                              "ost": {"bottom": 1, "top": 2, "drop": 0.5}}
    return tiny_config(tmp_path, task, **{**raw, **overrides})


@pytest.mark.deepspeed
def test_fedost_runs_over_masking_and_the_server_reloads_the_plugged_model(tmp_path: Path, task: Path) -> None:
    config = _ost_config(tmp_path, task, federation={"clients": 2, "rounds": 2, "aggregator": "masking"})
    trainer = FedOST(config, quiet=True)
    assert trainer.adapter_label.startswith("offsite blocks (bottom ")  # the header names what travels, not LoRA
    emulated = dict(trainer.model.named_parameters())
    assert len(decoder_blocks(trainer.model.emulator, FAMILIES["llama"])) == 4  # type: ignore[arg-type]
    result = trainer.run()
    last = result.history[-1]
    for key in ("rougeL", "bleu4", "perplexity"):
        assert {key, f"emulator_{key}", f"zeroshot_{key}"} <= set(last)
    assert last["setup_bytes_down"] == 2 * trainer.setup_bytes_per_client > 0
    assert last["bytes_up"] > 0 and last["zeroshot_perplexity"] == result.baseline["perplexity"]
    assert last["perplexity"] != result.baseline["perplexity"]  # the plugged adapter changed the full model
    run = Path(config.run_dir)
    ckpt = load_latest(run)
    assert ckpt is not None and ckpt.round == 2
    adapter_dir = ckpt.path / "adapter"
    meta = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert meta["fedguard_ost"]["recipe"]["kept"] == [0, 2, 4, 5]
    from safetensors.torch import load_file

    saved = load_file(adapter_dir / ADAPTER_FILE)
    adapter_names = {n for n, p in emulated.items() if p.requires_grad}
    assert set(saved) == adapter_names  # the adapter only: no frozen emulator weight is in the checkpoint
    plugged, _ = load_plugged_model(adapter_dir, config.model, seed=config.seed)
    ids = torch.randint(0, 250, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(plugged.eval()(input_ids=ids).logits, trainer.server_model.eval()(input_ids=ids).logits)
    other = ModelConfig(name_or_path="tiny:llama:6")
    with pytest.raises(ConfigError, match="fingerprint differs"):
        load_plugged_model(adapter_dir, other, seed=config.seed + 1)


@pytest.mark.deepspeed
def test_fedost_resume_is_bit_identical(tmp_path: Path, task: Path) -> None:
    full = _ost_config(tmp_path / "a", task)
    FedOST(full, quiet=True).run()
    FedOST(_ost_config(tmp_path / "b", task, federation={"clients": 2, "rounds": 1}), quiet=True).run()
    resumed = FedOST(_ost_config(tmp_path / "b", task), quiet=True).run(resume=True)
    assert [r["round"] for r in resumed.history] == [1, 2]
    a, b = load_latest(Path(full.run_dir)), load_latest(tmp_path / "b" / "run")
    assert a is not None and b is not None
    np.testing.assert_array_equal(a.vector, b.vector)


def test_bad_ost_configs_are_refused(tmp_path: Path, task: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'ost.botom'; did you mean 'bottom'"):
        _ost_config(tmp_path, task, ost={"botom": 1})
    with pytest.raises(ConfigError, match="ost.drop must be in"):
        _ost_config(tmp_path, task, ost={"drop": 1.5})
    with pytest.raises(ConfigError, match="applies to trainer 'ost' only"):
        tiny_config(tmp_path, task, ost={"bottom": 1})
    with pytest.raises(ConfigError, match="leaves no middle"):
        FedOST(_ost_config(tmp_path, task, ost={"bottom": 3, "top": 3}), quiet=True)
    with pytest.raises(ConfigError, match="block count"):
        FedOST(_ost_config(tmp_path, task, model={"name_or_path": "tiny:llama:x"}), quiet=True)


def test_the_smollm2_example_config_loads() -> None:
    config = TrainConfig.from_yaml(Path(__file__).resolve().parents[2] / "examples" / "ost_smollm2.yaml")
    assert config.trainer == "ost" and config.ost is not None and config.ost.drop == 0.5
    assert config.federation.aggregator == "masking"


@pytest.mark.deepspeed
def test_client_level_dp_clips_and_accounts_the_adapter_vector(tmp_path: Path, task: Path) -> None:
    """The DP hook sees FedOST's update like any other: the adapter blocks' vector, clipped to clip_norm."""
    from fedguard_train.privacy import hooks_from_config

    config = _ost_config(tmp_path, task, dp={"clip_norm": 0.05, "noise_multiplier": 1.0, "target_delta": 1e-3},
                         federation={"clients": 2, "rounds": 1})
    norms = UpdateNorms()
    trainer = FedOST(config, hooks=[*hooks_from_config(config), norms], quiet=True)
    result = trainer.run()
    assert result.history[0]["epsilon"] > 0
    assert len(norms.seen) == 2
    assert all(size == trainer.layout.size and norm <= 0.05 * (1 + 1e-4) for size, norm in norms.seen)
