"""Houlsby bottleneck adapters (`adapter.method: bottleneck`): every family, the math, save/load, the trainer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedguard.errors import ConfigError
from fedguard.params import flatten, layout_of, load_vector
from fedguard_train.bottleneck import PEFT_TYPE, BottleneckAdapter, BottleneckModel, load_adapter
from fedguard_train.config import AdapterConfig, ModelConfig, TrainConfig
from fedguard_train.models import FAMILIES, attach_adapter, load_base_model
from tests.train.conftest import tiny_config

SIZE = 4


def _bottleneck(family: str, seed: int = 0) -> BottleneckModel:
    base, _ = load_base_model(ModelConfig(name_or_path=f"tiny:{family}"), seed=seed)
    model = attach_adapter(base, FAMILIES[family], AdapterConfig(method="bottleneck", bottleneck_size=SIZE))
    assert isinstance(model, BottleneckModel)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_adapters_per_block_only_they_train_and_zero_adapters_are_the_identity(family: str) -> None:
    model = _bottleneck(family)
    layout = layout_of(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(layout.names) == trainable and all(".bottleneck." in n for n in trainable)
    blocks, d = 2, 32  # the tiny configs: 2 layers of width 32
    assert len(model.adapted) == 2 * blocks  # after attention and after the feed-forward sublayer
    assert layout.size == 2 * blocks * (2 * d * SIZE + d + SIZE)
    ids = torch.tensor([[5, 6, 7, 8]])
    base, _ = load_base_model(ModelConfig(name_or_path=f"tiny:{family}"), seed=0)
    base.eval()  # dropout off in both
    model.eval()
    with torch.no_grad():
        reference = base(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        assert not torch.equal(adapted, reference)  # the hooks are live
        for n, p in model.named_parameters():
            if ".bottleneck.up." in n:
                p.zero_()  # up = 0: A(h) = h
        torch.testing.assert_close(model(input_ids=ids).logits, reference, rtol=0, atol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_trains_and_generates_with_bottleneck_adapters(family: str) -> None:
    model = _bottleneck(family)
    ids = torch.tensor([[5, 6, 7]])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (1, 5)


def test_adapter_computes_houlsby_formula() -> None:
    torch.manual_seed(0)
    adapter = BottleneckAdapter(6, 3)
    h = torch.randn(2, 5, 6)
    expected = h + torch.nn.functional.gelu(h @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T \
        + adapter.up.bias
    torch.testing.assert_close(adapter(h), expected)


@pytest.mark.parametrize("family", ["gpt2", "bloom"])
def test_saved_adapter_reloads_on_a_fresh_base_model(tmp_path: Path, family: str) -> None:
    from fedguard_train.checkpoint import save_adapter

    model = _bottleneck(family, seed=1)
    layout = layout_of(model)
    vec = np.random.default_rng(0).standard_normal(layout.size).astype(np.float32) * 0.1
    load_vector(model, layout, vec)
    save_adapter(model, tmp_path / "adapter")  # what the trainer's checkpoint writes
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_TYPE and config["bottleneck_size"] == SIZE
    fresh, _ = load_base_model(ModelConfig(name_or_path=f"tiny:{family}"), seed=1)
    loaded = load_adapter(fresh, tmp_path / "adapter")
    assert isinstance(loaded, BottleneckModel)
    np.testing.assert_array_equal(flatten(loaded, layout), vec)
    ids = torch.tensor([[5, 6, 7]])
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, loaded(input_ids=ids).logits, rtol=0, atol=0)


def test_bad_configs_and_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bottleneck_size must be >= 1"):
        TrainConfig.from_dict({"adapter": {"method": "bottleneck", "bottleneck_size": 0}})
    base, _ = load_base_model(ModelConfig(name_or_path="tiny:opt"))
    with pytest.raises(ConfigError, match="cannot attach bottleneck adapters to a opt model: no module"):
        attach_adapter(base, FAMILIES["opt"], AdapterConfig(method="bottleneck", target_modules=("c_proj",)))
    with pytest.raises(ConfigError, match="is not a linear map"):
        attach_adapter(base, FAMILIES["opt"], AdapterConfig(method="bottleneck", target_modules=("self_attn",)))
    lora_base, _ = load_base_model(ModelConfig(name_or_path="tiny:llama"))
    attach_adapter(lora_base, FAMILIES["llama"], AdapterConfig(method="lora")).save_pretrained(tmp_path / "lora")
    with pytest.raises(ConfigError, match="not a fedguard bottleneck adapter"):
        BottleneckModel.from_pretrained(load_base_model(ModelConfig(name_or_path="tiny:llama"))[0], tmp_path / "lora")
    model = _bottleneck("gpt2")
    model.save_pretrained(tmp_path / "bn")
    with pytest.raises(ConfigError, match="no module of the model matches target_modules"):  # gpt2's, onto bloom
        load_adapter(load_base_model(ModelConfig(name_or_path="tiny:bloom"))[0], tmp_path / "bn")
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "bn" / "adapter_model.safetensors")
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, tmp_path / "bn" / "adapter_model.safetensors")
    with pytest.raises(ConfigError, match="does not fit the model: unknown \\[\\], missing"):
        load_adapter(load_base_model(ModelConfig(name_or_path="tiny:gpt2"))[0], tmp_path / "bn")


@pytest.mark.deepspeed
def test_bottleneck_adapters_travel_through_the_trainer_and_the_checkpoint_reloads(tmp_path: Path, task: Path) -> None:
    from fedguard_train.trainers.homo import FedHomoLLM

    adapter = {"method": "bottleneck", "bottleneck_size": SIZE, "dropout": 0.0}
    config = tiny_config(tmp_path, task, adapter=adapter, federation={"clients": 2, "rounds": 1})
    trainer = FedHomoLLM(config, quiet=True)
    assert trainer.layout.names and all(".bottleneck." in n for n in trainer.layout.names)
    before = flatten(trainer.model, trainer.layout).copy()
    result = trainer.run()
    assert result.history[0]["clients"] == 2
    after = flatten(trainer.model, trainer.layout)
    assert not np.array_equal(before, after)  # the global adapters moved
    base, _ = load_base_model(ModelConfig(name_or_path="tiny:gpt2"), seed=config.seed)
    loaded = load_adapter(base, Path(config.run_dir) / "checkpoints" / "round-0001" / "adapter")
    np.testing.assert_array_equal(flatten(loaded, trainer.layout), after)
