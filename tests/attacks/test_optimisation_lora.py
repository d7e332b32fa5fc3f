"""LAMP/TAG-style inversion of a LoRA client's single-step gradient: the server receives every adapter
tensor (A and B of each block's attention projection), and LAMP recovers the client's text from it at B=1
— where DAGER's span check on A fails unless the rank exceeds the tokens (docs/results.md, "Leakage")."""

from __future__ import annotations

import pytest
import torch

from attacks.inversion import score_recovery
from attacks.optimisation import LampConfig, lamp, observed_gradient
from tests.attacks.test_optimisation import EOS, VOCAB, batch, gpt2_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lora_model(rank: int) -> torch.nn.Module:
    """The tests' width-128 GPT-2 with a LoRA adapter on ``c_attn``, B drawn away from zero (as after a first
    round: at B = 0 the gradient of A vanishes)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(gpt2_model(), LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                    target_modules=["c_attn"], fan_in_fan_out=True))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model


def test_lora_single_step_gradient_is_inverted() -> None:
    model = lora_model(64)
    adapter = [n for n, p in model.named_parameters() if p.requires_grad]
    truth = batch(1)
    observed = observed_gradient(model, truth, adapter)
    assert set(observed) == set(adapter)  # only what travels: the adapter
    out = lamp(model, observed, [len(s) for s in truth], config=LampConfig(eos_id=EOS, steps=300, restarts=1, seed=0))
    score = score_recovery(truth, out.sequences, vocab_size=VOCAB)
    assert score.token_accuracy >= 0.8 and score.rouge1 >= 80
    assert score.rouge1 > score.chance_rouge1 + 50
    assert out.final_distance < 0.1
