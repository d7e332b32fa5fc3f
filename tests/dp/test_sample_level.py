"""Example-level DP-SGD on peft adapters through Opacus: per-example gradients, accumulation, traps."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from scipy import stats

pytest.importorskip("opacus")
from peft import LoraConfig, PrefixTuningConfig, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from fedguard.dp.accountant import PrivacyAccountant  # noqa: E402
from fedguard.dp.errors import UnsupportedModelError  # noqa: E402
from fedguard.dp.sample_level import DPSGDConfig, PrivateAdapterTrainer  # noqa: E402
from fedguard.errors import BudgetExceededError, ConfigError  # noqa: E402
from fedguard.rng import SecureRNG  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)
V, T = 96, 12


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=V, n_positions=64, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def _lora(model):
    return get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0,
                                            init_lora_weights=False))


def _trainable(m) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in m.parameters() if p.requires_grad])


def _config(**kw) -> DPSGDConfig:
    args = dict(noise_multiplier=1.0, max_grad_norm=0.05, sampling_rate=0.25, dataset_size=64,
                max_physical_batch_size=32, grad_sample_mode="hooks")
    args.update(kw)
    return DPSGDConfig(**args)


def _data(n: int = 13) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, V, (n, T), generator=g)}


@pytest.mark.parametrize("adapter", ["lora", "prefix"])
def test_per_example_gradients_equal_individually_computed_ones(adapter):
    model = _gpt2()
    if adapter == "lora":
        model = _lora(model)
    else:
        model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    trainer = PrivateAdapterTrainer(model, opt, _config(), rng=SecureRNG.for_testing("psg"))
    batch = trainer._prepare(_data(4))
    trainer._forward_backward(dict(batch))
    params = [p for p in model.parameters() if p.requires_grad]
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    for i in range(4):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        labels = one.pop("labels")
        reference.zero_grad()
        out = reference(**one)
        PrivateAdapterTrainer._per_example_token_loss(out.logits, labels).backward()
        for p, rp in zip(params, ref_params, strict=True):
            torch.testing.assert_close(p.grad_sample[i], rp.grad, rtol=1e-4, atol=1e-6)
    trainer.unwrap()


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_gradient_accumulation_gives_the_same_step_as_one_batch(mode):
    base = _lora(_gpt2())
    results = []
    for phys in (32, 4):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        acc = PrivacyAccountant(target_delta=1e-3, backend="rdp")
        trainer = PrivateAdapterTrainer(model, opt, _config(max_physical_batch_size=phys, grad_sample_mode=mode),
                                        accountant=acc, rng=SecureRNG.for_testing("accumulate"))
        step = trainer.step(_data(13))
        assert step.micro_batches == (1 if phys == 32 else 4)
        assert acc.steps == 1  # one event per logical batch, not per micro-batch
        results.append(_trainable(model))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-6)
    assert not torch.equal(results[0], _trainable(base))


def test_empty_poisson_batch_still_adds_noise_and_is_accounted():
    model = _lora(_gpt2())
    before = _trainable(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    acc = PrivacyAccountant(target_delta=1e-3, backend="rdp")
    cfg = _config()
    trainer = PrivateAdapterTrainer(model, opt, cfg, accountant=acc, rng=SecureRNG.for_testing("empty"))
    step = trainer.step(_data(0))
    assert step.batch_size == 0 and acc.steps == 1
    noise = -(_trainable(model) - before).double() * cfg.expected_batch_size  # SGD with lr 1: p -= noise/(qN)
    z = (noise / (cfg.noise_multiplier * cfg.max_grad_norm)).numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3  # fixed significance, fixed seed
    assert stats.kstest(z / 1.15, "norm").pvalue < 1e-3  # and the test has power against a wrong scale


def test_gpt2_batches_get_explicit_per_example_position_ids():
    model = _lora(_gpt2())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    trainer = PrivateAdapterTrainer(model, opt, _config())
    prepared = trainer._prepare(_data(5))
    assert prepared["position_ids"].shape == (5, T)


def test_llama_lora_trains_with_poisson_batches_and_accounts_every_step():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                              lora_dropout=0.0))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    acc = PrivacyAccountant(target_delta=1e-3, backend="rdp")
    trainer = PrivateAdapterTrainer(model, opt, _config(sampling_rate=0.1, max_physical_batch_size=4),
                                    accountant=acc, rng=SecureRNG.for_testing("llama"))
    results = trainer.train(_data(64), steps=2)
    assert len(results) == 2 and acc.steps == 2
    assert trainer.epsilon() > 0


def test_budget_refuses_the_step_and_leaves_the_model_unchanged():
    model = _lora(_gpt2())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    acc = PrivacyAccountant(target_delta=1e-3, epsilon_budget=2.0, backend="rdp")
    trainer = PrivateAdapterTrainer(model, opt, _config(noise_multiplier=1.0, sampling_rate=0.5),
                                    accountant=acc, rng=SecureRNG.for_testing("budget"))
    with pytest.raises(BudgetExceededError, match="the model is unchanged"):
        for _ in range(50):
            before = _trainable(model)
            trainer.step(_data(8))
    assert torch.equal(before, _trainable(model))
    assert acc.epsilon() <= 2.0


def test_unsupported_trainable_module_is_a_typed_error_naming_it():
    class Scale(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.gain

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), Scale())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UnsupportedModelError, match="1.gain"):
        PrivateAdapterTrainer(model, opt, _config())


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier must be a finite number > 0, got 0.0"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be a finite number > 0, got -1.0"),
        ({"sampling_rate": 2.0}, "sampling_rate must be a finite number in (0, 1], got 2.0"),
        ({"grad_sample_mode": "ew"}, "'ew'"),
    ],
)
def test_bad_dpsgd_config_is_a_typed_error_naming_the_value(kw, needle):
    with pytest.raises(ConfigError) as err:
        _config(**kw)
    assert needle in str(err.value)
