"""Function-preserving re-parametrisation scrambles plain FedIPR bits but not invariant ones."""

from __future__ import annotations

import pytest
import torch

from fedguard.rng import SecureRNG
from fedguard.watermark import SignWatermark, make_sign_key, reparametrise_norm
from fedguard.watermark.invariant import consumer_paths
from fedguard.watermark.simulation import SimulationConfig, tiny_gpt2_lora
from fedguard.watermark.targets import base_model, norm_modules, resolve_module

# tiny models run fastest on one thread (and do not fight xdist's other worker for the 2 cores)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def embed(wms: list[SignWatermark], model: torch.nn.Module, steps: int = 40) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = sum(wm.loss() for wm in wms)
        opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        opt.step()


def thief_scales(n: int, label: str) -> torch.Tensor:
    """Random sign flips on every channel and magnitudes in [0.25, 4]: a function-preserving transform."""
    rng = SecureRNG.for_testing(label)
    signs = torch.from_numpy(rng.integers_below(n, 2).astype("float32")) * 2 - 1
    mags = torch.from_numpy((4.0 ** (2 * rng.uniform01(n) - 1)).astype("float32"))
    return signs * mags


def reparametrise_all_norms(model: torch.nn.Module, label: str) -> int:
    done = 0
    for path in norm_modules(model):
        consumers = [resolve_module(model, c) for c in consumer_paths(path)]
        if not consumers or any(c is None for c in consumers):
            continue  # the final norm feeds the tied LM head: not compensable without untying
        norm = resolve_module(model, path)
        reparametrise_norm(norm, consumers, thief_scales(norm.weight.numel(), f"{label}/{path}"))  # type: ignore[arg-type]
        done += 1
    return done


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("merged", [False, True], ids=["peft-lora-model", "merged-full-model"])
def test_gpt2_transform_keeps_function_and_invariant_watermark(merged: bool) -> None:
    model = tiny_gpt2_lora(SimulationConfig(n_layer=2), 0)
    invariant = make_sign_key(model, bits=32, alpha=1.0, rng=SecureRNG.for_testing("inv/key"))
    plain = make_sign_key(model, bits=32, mode="plain", alpha=1.0, rng=SecureRNG.for_testing("inv/plain"))
    embed([SignWatermark(invariant, model), SignWatermark(plain, model)], model)
    if merged:
        model = model.merge_and_unload()
    assert SignWatermark(invariant, model).detect().matched == 32
    assert SignWatermark(plain, model).detect().matched == 32
    ids = torch.from_numpy(SecureRNG.for_testing("inv/ids").integers_below(4 * 16, 48).astype("int64")).reshape(4, 16)
    before = logits(model, ids)

    assert reparametrise_all_norms(model, "inv/thief") == 4
    after = logits(model, ids)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)  # the function is unchanged
    gamma = base_model(model).get_submodule("transformer.h.0.ln_1").weight
    assert bool((gamma < 0).any())  # ... although norm scales changed sign

    inv = SignWatermark(invariant, model).detect()
    pln = SignWatermark(plain, model).detect()
    assert inv.matched == 32 and inv.verdict
    assert not pln.verdict and pln.matched < 28  # plain FedIPR bits are scrambled


def test_llama_rmsnorm_transform_compensated_in_q_k_v_keeps_invariant_bits() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        tie_word_embeddings=True))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    from fedguard.watermark import prepare_norm_targets

    prepare_norm_targets(model)
    # every norm, named: by default blocks read through a LoRA-adapted consumer (q_proj) come first
    norms = [f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")]
    assert {b.module for b in make_sign_key(model, bits=32, rng=SecureRNG.for_testing("x")).blocks} == set(norms[::2])
    # ... unless they lack the capacity: 2 clients x 40 bits > the 64 values of the two input norms
    wide = make_sign_key(model, bits=40, n_clients=2, rng=SecureRNG.for_testing("y"))
    assert {b.module for b in wide.blocks} == set(norms)
    key = make_sign_key(model, bits=32, alpha=1.0, modules=norms, rng=SecureRNG.for_testing("inv/llama"))
    assert {b.module.rsplit(".", 1)[1] for b in key.blocks} == {"input_layernorm", "post_attention_layernorm"}
    assert key.blocks[0].consumer == "model.layers.0.self_attn.q_proj"
    wm = SignWatermark(key, model)
    embed([wm], model)
    z_before = wm.extract()
    ids = torch.arange(24).reshape(2, 12) % 64
    before = logits(model, ids)
    assert reparametrise_all_norms(model, "inv/llama-thief") == 4
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(wm.extract()), torch.from_numpy(z_before), rtol=1e-4, atol=1e-5)
    assert wm.detect().matched == 32


def test_gram_keys_with_several_directions_are_invariant_and_round_trip(tmp_path) -> None:
    """``directions=m`` reads each block's Gram matrix along m secret directions (m·D feature values): the
    same invariances (norm fold, MLP permutation, head rotation; the residual rotation after alignment),
    a key file that round-trips, and a one-direction key that serialises and commits exactly as before."""
    import copy

    from attacks.watermark import transforms
    from fedguard.errors import ConfigError
    from fedguard.watermark import load_key, save_key
    from fedguard.watermark.calibration import check_calibration
    from tests.models import tiny_llama

    base = tiny_llama(1)
    key = make_sign_key(base, bits=200, mode="gram", directions=4, rng=SecureRNG.for_testing("dirs"))
    assert [b.feature_dim for b in key.blocks] == [128] * 4 and key.n_bits == 200  # > the 128 channels
    one = make_sign_key(base, bits=32, mode="gram", rng=SecureRNG.for_testing("dirs"))
    assert "directions" not in str(one.payload()) and "'directions': 4" in str(key.payload())
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    z = SignWatermark(key, model).extract()
    moved = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(2)
    for act in (transforms.fold_norms, transforms.permute_mlp, transforms.rotate_heads):
        act(moved, gen)
    assert abs(SignWatermark(key, moved).extract() - z).max() < 1e-4
    transforms.rotate_residual(moved, gen)
    assert abs(SignWatermark(key, moved).extract() - z).max() > 0.1  # the rotation moves the plain readout
    assert abs(SignWatermark(key, moved, align_to=base).extract() - z).max() < 1e-4
    save_key(key, tmp_path / "k.key")
    assert load_key(tmp_path / "k.key") == key and check_calibration(key, base).accepted
    with pytest.raises(ConfigError, match="directions"):
        make_sign_key(base, bits=32, mode="invariant", directions=2, rng=SecureRNG.for_testing("d"))
    with pytest.raises(ConfigError, match="free values"):
        make_sign_key(base, bits=32, mode="gram", directions=17, rng=SecureRNG.for_testing("d"))
