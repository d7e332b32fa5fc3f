"""fedguard.params: trainable-parameter selection and exact flatten/unflatten on peft models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import (
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)

from fedguard.errors import ConfigError, KeyMismatchError
from fedguard.params import (
    AdapterLayout,
    check_layout,
    flatten,
    layout_of,
    load_vector,
    mark_trainable,
    named_vector,
    parameter_counts,
)
from tests.models import tiny_gpt2, tiny_llama

FAMILIES = {
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], "*.ln_f.weight"),
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"], "*.norm.weight"),
}


@st.composite
def peft_configs(draw: st.DrawFn, family: str):  # type: ignore[no-untyped-def]
    _, modules, _ = FAMILIES[family]
    kind = draw(st.sampled_from(["lora", "prefix", "prompt"]))
    if kind == "lora":
        targets = draw(st.lists(st.sampled_from(modules), min_size=1, max_size=len(modules), unique=True))
        return LoraConfig(
            r=draw(st.integers(1, 8)), lora_alpha=draw(st.sampled_from([8, 16, 32])), lora_dropout=0.0,
            target_modules=targets, fan_in_fan_out=family == "gpt2", task_type="CAUSAL_LM",
            bias=draw(st.sampled_from(["none", "lora_only"])),
        )
    if kind == "prefix":
        return PrefixTuningConfig(
            num_virtual_tokens=draw(st.integers(1, 8)), task_type="CAUSAL_LM",
            prefix_projection=draw(st.booleans()), encoder_hidden_size=16,
        )
    return PromptTuningConfig(num_virtual_tokens=draw(st.integers(1, 8)), task_type="CAUSAL_LM")


def _perturb(model: torch.nn.Module, layout: AdapterLayout, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vec = rng.standard_normal(layout.size).astype(np.float32)
    load_vector(model, layout, vec)
    return vec


@pytest.mark.parametrize("family", sorted(FAMILIES))
@settings(max_examples=12)
@given(data=st.data())
def test_flatten_load_round_trip_is_exact_for_any_peft_config(family: str, data: st.DataObject) -> None:
    build, _, norm_pattern = FAMILIES[family]
    config = data.draw(peft_configs(family), label="peft config")
    with_norm = data.draw(st.booleans(), label="extra norm scale")
    model = get_peft_model(build(), config)
    extra = [norm_pattern] if with_norm else []
    if with_norm:
        mark_trainable(model, extra)
    layout = layout_of(model, extra)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(layout.names) == trainable  # only adapters (+ the named extras) travel
    assert not any(n.endswith("base_layer.weight") for n in layout.names)  # frozen base weights stay home
    vec = _perturb(model, layout, seed=data.draw(st.integers(0, 1000)))
    np.testing.assert_array_equal(flatten(model, layout), vec)
    # a second model of the same shape receives the vector exactly
    other = get_peft_model(build(seed=1), config)
    if with_norm:
        mark_trainable(other, extra)
    load_vector(other, layout, flatten(model, layout))
    for (n, p), (_, q) in zip(model.named_parameters(), other.named_parameters()):
        if n in trainable:
            assert torch.equal(p, q)


def test_layout_json_round_trip_and_fingerprint() -> None:
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    layout = layout_of(model)
    again = AdapterLayout.from_json(layout.to_json())
    assert again == layout and again.fingerprint() == layout.fingerprint()
    parts = named_vector(layout, flatten(model, layout))
    assert list(parts) == list(layout.names)
    assert parts[layout.names[0]].shape == layout.specs[0].shape


def test_mismatched_layout_names_the_first_differing_parameter() -> None:
    gpt = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    wider = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    layout = layout_of(gpt)
    first = layout.names[0]
    with pytest.raises(KeyMismatchError, match=rf"parameter '{first}' has shape \(4, 32\) in the model but \(2, 32\)"):
        check_layout(wider, layout)
    llama = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(KeyMismatchError, match=rf"layout parameter '{first}' does not exist"):
        load_vector(llama, layout, np.zeros(layout.size, np.float32))


def test_bad_vectors_load_nothing() -> None:
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    layout = layout_of(model)
    before = flatten(model, layout)
    bad = np.ones(layout.size, np.float32)
    bad[-1] = np.nan
    with pytest.raises(KeyMismatchError, match="NaN or inf"):
        load_vector(model, layout, bad)
    with pytest.raises(KeyMismatchError, match=f"layout needs a flat vector of {layout.size}"):
        load_vector(model, layout, np.ones(layout.size + 1, np.float32))
    np.testing.assert_array_equal(flatten(model, layout), before)


def test_half_precision_parameters_round_trip_exactly() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).to(torch.bfloat16)
    layout = layout_of(model)
    assert {s.dtype for s in layout.specs} == {"bfloat16"}
    vec = flatten(model, layout)
    model2 = get_peft_model(tiny_llama(seed=3), LoraConfig(r=2, target_modules=["q_proj"])).to(torch.bfloat16)
    load_vector(model2, layout, vec)
    np.testing.assert_array_equal(flatten(model2, layout), vec)


def test_unknown_extra_pattern_and_empty_selection_are_errors() -> None:
    model = tiny_gpt2()
    with pytest.raises(KeyMismatchError, match="match no parameter"):
        layout_of(model, ["*.does_not_exist"])
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        layout_of(model)


def test_trainable_share_is_small_for_lora() -> None:
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    counts = parameter_counts(model, layout_of(model))
    assert counts["trainable"] == 2 * 2 * (32 + 96)  # 2 layers x (A: r x 32, B: 96 x r)
    assert 0 < counts["share"] < 0.1
