"""The model hub: every family with every PEFT method on a tiny model, and peft-format round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel

from fedguard.errors import ConfigError
from fedguard.params import flatten, layout_of, load_vector
from fedguard.rng import SecureRNG
from fedguard_train.config import AdapterConfig, ModelConfig
from fedguard_train.models import FAMILIES, attach_adapter, family_of, load_base_model


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", ["lora", "p-tuning-v2", "prompt-tuning", "bottleneck"])
def test_every_family_trains_and_generates_with_every_method(family: str, method: str) -> None:
    base, tok = load_base_model(ModelConfig(name_or_path=f"tiny:{family}"))
    assert family_of(base).name == family
    model = attach_adapter(base, FAMILIES[family], AdapterConfig(method=method, r=2, pre_seq_len=3, num_virtual_tokens=3))
    layout = layout_of(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(layout.names) == trainable
    assert layout.size < 0.2 * sum(p.numel() for p in model.parameters())
    if method == "lora":
        targets = FAMILIES[family].lora_targets
        assert all(any(t in n for t in targets) for n in layout.names)
    ids = tok(["abc"], return_tensors="pt")
    loss = model(**ids, labels=ids["input_ids"]).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    out = model.generate(**ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, ids["input_ids"].shape[1] + 2)


@pytest.mark.parametrize("method", ["lora", "p-tuning-v2"])
def test_adapters_round_trip_through_peft_save_and_load(tmp_path: Path, method: str) -> None:
    base, _ = load_base_model(ModelConfig(name_or_path="tiny:llama"), seed=1)
    model = attach_adapter(base, FAMILIES["llama"], AdapterConfig(method=method, pre_seq_len=4))
    layout = layout_of(model)
    vec = np.random.default_rng(0).standard_normal(layout.size).astype(np.float32)
    load_vector(model, layout, vec)
    model.save_pretrained(tmp_path / "adapter")
    fresh, _ = load_base_model(ModelConfig(name_or_path="tiny:llama"), seed=1)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    np.testing.assert_array_equal(flatten(loaded, layout), vec)
    ids = torch.tensor([[5, 6, 7]])
    model.eval()  # LoRA dropout off
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


@pytest.mark.parametrize("method", ["lora", "p-tuning-v2"])
def test_norm_scales_trained_beside_the_adapter_are_saved_and_restored_by_peft(tmp_path: Path, method: str) -> None:
    from fedguard.watermark import SignWatermark, make_sign_key, prepare_norm_targets
    from fedguard.watermark.loading import load_model
    from fedguard_train.checkpoint import save_adapter

    base, _ = load_base_model(ModelConfig(name_or_path="tiny:llama"), seed=1)
    model = attach_adapter(base, FAMILIES["llama"], AdapterConfig(method=method, pre_seq_len=4))
    marked = prepare_norm_targets(model)
    key = make_sign_key(model, bits=24, alpha=1.0, rng=SecureRNG.for_testing(f"ckpt/{method}"))
    wm = SignWatermark(key, model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(80):  # embed the watermark: the norm scales move away from the base model's
        opt.zero_grad()
        wm.loss().backward()
        opt.step()
    trained = wm.detect()
    assert trained.verdict
    added = save_adapter(model, tmp_path / "adapter")
    assert sorted(added) == sorted(marked)
    fresh, _ = load_base_model(ModelConfig(name_or_path="tiny:llama"), seed=1)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")  # plain peft, no fedguard
    ids = torch.tensor([[5, 6, 7]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    base_dir = tmp_path / "base"
    load_base_model(ModelConfig(name_or_path="tiny:llama"), seed=1)[0].save_pretrained(base_dir)
    again = SignWatermark(key, load_model(tmp_path / "adapter", base=base_dir)).detect()
    assert again.matched == trained.matched and again.verdict  # the verifier sees the trained scales


def test_target_modules_override_and_bad_targets() -> None:
    base, _ = load_base_model(ModelConfig(name_or_path="tiny:opt"))
    model = attach_adapter(base, FAMILIES["opt"], AdapterConfig(target_modules=("fc1",)))
    assert all(".fc1." in n for n in layout_of(model).names)
    base, _ = load_base_model(ModelConfig(name_or_path="tiny:opt"))
    with pytest.raises(ConfigError, match="cannot attach lora to a opt model"):
        attach_adapter(base, FAMILIES["opt"], AdapterConfig(target_modules=("c_attn",)))


def test_missing_model_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="never downloaded at run time"):
        load_base_model(ModelConfig(name_or_path=str(tmp_path / "nothing")))
    with pytest.raises(ConfigError, match="unknown model family 'gpt5'"):
        load_base_model(ModelConfig(name_or_path="tiny:gpt5"))


def test_local_directory_models_load_offline(tmp_path: Path) -> None:
    base, tok = load_base_model(ModelConfig(name_or_path="tiny:qwen2"))
    base.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again, tok2 = load_base_model(ModelConfig(name_or_path=str(tmp_path / "m")))
    assert family_of(again).name == "qwen2"
    assert tok2("abc")["input_ids"] == tok("abc")["input_ids"]
    assert not any(p.requires_grad for p in again.parameters())
