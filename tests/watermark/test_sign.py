"""The FedIPR sign watermark: the regulariser embeds, extraction verifies, on peft dirs and full models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedguard.errors import ConfigError
from fedguard.rng import SecureRNG
from fedguard.watermark import SignWatermark, make_backdoor_key, make_sign_key, verify_key
from fedguard.watermark.keys import direction, projection_matrix
from fedguard.watermark.loading import load_model
from fedguard.watermark.simulation import SimulationConfig, tiny_gpt2_lora

# tiny models run fastest on one thread (and do not fight xdist's other worker for the 2 cores)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def embed(wm: SignWatermark, model: torch.nn.Module, steps: int = 40, lr: float = 1e-2) -> None:
    """Optimise the regulariser alone (it needs no data)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = wm.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture()
def model() -> torch.nn.Module:
    return tiny_gpt2_lora(SimulationConfig(n_layer=2), 0)


def test_regulariser_embeds_every_bit_and_vanishes_once_margins_hold(model: torch.nn.Module) -> None:
    key = make_sign_key(model, bits=32, alpha=1.0, rng=SecureRNG.for_testing("sign/embed"))
    wm = SignWatermark(key, model)
    before = wm.detect()
    assert before.matched == 0 and not before.verdict  # the starting point extracts all-zero projections
    embed(wm, model)
    after = wm.detect()
    assert after.matched == 32 and after.verdict and after.p_value == pytest.approx(2.0**-32)
    assert float(wm.loss().detach()) == 0.0
    assert all(b.matched == b.bits for b in after.blocks)


def test_reference_zero_extracts_fedipr_sign_of_projection(model: torch.nn.Module) -> None:
    """Known answer: with reference='zero' and plain mode, z = E^T gamma / s block by block."""
    key = make_sign_key(model, bits=24, mode="plain", reference="zero", rng=SecureRNG.for_testing("sign/ka"))
    z = SignWatermark(key, model).extract()
    base = model.get_base_model()
    expected = []
    for i, block in enumerate(key.blocks):
        gamma = base.get_submodule(block.module).weight.detach().double().numpy()
        expected.append(gamma @ projection_matrix(key.seed, i, gamma.size, block.bits) / block.scale)
    np.testing.assert_allclose(z, np.concatenate(expected), rtol=1e-10)


def test_invariant_features_are_gamma_times_effective_weight_along_r(model: torch.nn.Module) -> None:
    key = make_sign_key(model, bits=24, reference="zero", rng=SecureRNG.for_testing("sign/inv"))
    z = SignWatermark(key, model).extract()
    base = model.get_base_model()
    block = key.blocks[0]
    gamma = base.get_submodule(block.module).weight.detach().double().numpy()
    consumer = base.get_submodule(block.consumer)
    w = consumer.get_base_layer().weight.detach().double().numpy()  # Conv1D: [in, out]; LoRA B = 0 at init
    phi = gamma * (w @ direction(key.seed, 0, w.shape[1]))
    np.testing.assert_allclose(z[: block.bits], phi @ projection_matrix(key.seed, 0, 64, block.bits) / block.scale,
                               rtol=1e-8)


def test_a_bound_watermark_follows_changes_to_the_frozen_consumer_weights(model: torch.nn.Module) -> None:
    """The cached rᵀW₀ of frozen base weights is refreshed after in-place edits and replaced parameters."""
    key = make_sign_key(model, bits=24, reference="zero", rng=SecureRNG.for_testing("sign/cache"))
    wm = SignWatermark(key, model)
    wm.loss().backward()  # fills the cache on the float32 path, as training does
    first = wm.extract()
    consumer = model.get_base_model().get_submodule(key.blocks[0].consumer).get_base_layer()
    assert not consumer.weight.requires_grad
    with torch.no_grad():
        consumer.weight.mul_(-2.0)  # in place: same storage, new version
    np.testing.assert_allclose(wm.extract(), SignWatermark(key, model).extract(), rtol=1e-12)
    assert not np.allclose(wm.extract(), first)
    consumer.weight = torch.nn.Parameter(torch.randn_like(consumer.weight), requires_grad=False)  # replaced
    np.testing.assert_allclose(wm.extract(), SignWatermark(key, model).extract(), rtol=1e-12)
    torch.testing.assert_close(wm.projections(), SignWatermark(key, model).projections())
    consumer.weight.data.mul_(0.5)  # through .data: no version bump, so the cache cannot see it ...
    wm.refresh()  # ... and refresh() is the documented way to say so
    np.testing.assert_allclose(wm.extract(), SignWatermark(key, model).extract(), rtol=1e-12)
    gamma = model.get_base_model().get_submodule(key.blocks[0].module).weight
    gamma.grad = None
    wm.loss().backward()  # a cache hit still carries the gradient to the norm scales
    assert gamma.grad is not None and bool(gamma.grad.abs().sum() > 0)


def test_unwatermarked_training_does_not_verify(model: torch.nn.Module) -> None:
    key = make_sign_key(model, bits=64, rng=SecureRNG.for_testing("sign/unmarked"))
    other = make_sign_key(model, bits=64, alpha=1.0, rng=SecureRNG.for_testing("sign/other"))
    embed(SignWatermark(other, model), model)  # the model changes, but under someone else's key
    d = SignWatermark(key, model).detect()
    assert not d.verdict and d.p_value > 1e-6


def test_lora_watermark_verifies_from_a_peft_adapter_directory(model: torch.nn.Module, tmp_path) -> None:
    model.get_base_model().save_pretrained(tmp_path / "base")
    key = make_sign_key(model, bits=32, target="lora", alpha=1.0, rng=SecureRNG.for_testing("sign/lora"))
    assert key.mode == "plain" and {b.kind for b in key.blocks} == {"lora"}
    embed(SignWatermark(key, model), model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = load_model(tmp_path / "adapter", base=tmp_path / "base")
    d = verify_key(loaded, key)
    assert d.matched == 32 and d.verdict


def test_norm_watermark_verifies_on_the_merged_full_model(model: torch.nn.Module, tmp_path) -> None:
    key = make_sign_key(model, bits=32, alpha=1.0, rng=SecureRNG.for_testing("sign/full"))
    embed(SignWatermark(key, model), model)
    model.merge_and_unload().save_pretrained(tmp_path / "full")
    d = verify_key(load_model(tmp_path / "full"), key)
    assert d.matched == 32 and d.verdict


def test_prompt_tuning_embeddings_carry_a_watermark() -> None:
    from peft import PromptTuningConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=48, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    key = make_sign_key(model, bits=32, target="prompt", alpha=1.0, rng=SecureRNG.for_testing("sign/prompt"))
    assert key.blocks[0].kind == "prompt" and key.blocks[0].shapes == ((4, 32),)
    wm = SignWatermark(key, model)
    embed(wm, model, steps=120)
    assert wm.detect().matched == 32


def test_a_backdoor_key_is_not_a_sign_key(model: torch.nn.Module) -> None:
    with pytest.raises(ConfigError, match="needs a SignKey"):
        SignWatermark(make_backdoor_key(48), model)  # type: ignore[arg-type]


def test_invariant_mode_refuses_lora_targets(model: torch.nn.Module) -> None:
    with pytest.raises(ConfigError, match="norm targets only"):
        make_sign_key(model, bits=32, target="lora", mode="invariant")
