"""FFA-LoRA (`adapter.freeze_lora_a`): A stays at its seeded initialisation, only B trains and travels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from fedguard.errors import ConfigError
from fedguard_train.config import ModelConfig, TrainConfig
from fedguard_train.models import load_base_model
from fedguard_train.trainers.homo import FedHomoLLM
from tests.train.conftest import tiny_config

pytestmark = pytest.mark.deepspeed


def _lora_a(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}


def test_only_b_travels_a_never_moves_and_the_checkpoint_loads_with_peft(tmp_path: Path, task: Path) -> None:
    adapter = {"method": "lora", "r": 4, "dropout": 0.0, "freeze_lora_a": True}
    config = tiny_config(tmp_path, task, adapter=adapter, federation={"clients": 2, "rounds": 1})
    trainer = FedHomoLLM(config, quiet=True)
    plain = FedHomoLLM(tiny_config(tmp_path / "plain", task, federation={"clients": 2, "rounds": 1}), quiet=True)
    assert trainer.layout.names and all("lora_B" in n for n in trainer.layout.names)
    b_values = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_B" in n)
    assert trainer.layout.size == b_values < plain.layout.size
    before = _lora_a(trainer.model)
    assert before and _lora_a(plain.model).keys() == before.keys()
    for name, value in _lora_a(plain.model).items():  # the same seeded A as plain LoRA: every client shares it
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    result = trainer.run()
    assert result.history[0]["clients"] == 2
    for name, value in _lora_a(trainer.model).items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    base, _ = load_base_model(ModelConfig(name_or_path="tiny:gpt2"), seed=config.seed)
    loaded = PeftModel.from_pretrained(base, Path(config.run_dir) / "checkpoints" / "round-0001" / "adapter")
    for name, param in loaded.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param, dict(trainer.model.named_parameters())[name], rtol=0, atol=0)


def test_freeze_lora_a_needs_lora() -> None:
    with pytest.raises(ConfigError, match="freeze_lora_a applies to method 'lora' only"):
        TrainConfig.from_dict({"adapter": {"method": "p-tuning-v2", "freeze_lora_a": True}})
