"""Metrics come from rouge-score and sacrebleu; check known answers and perplexity's definition."""

from __future__ import annotations

import math

import pytest
import torch

from fedguard_train.config import DataConfig, ModelConfig
from fedguard_train.data import Example, tokenize
from fedguard_train.metrics import perplexity, text_scores
from fedguard_train.models import load_base_model


def test_identical_texts_score_100_and_disjoint_texts_score_0() -> None:
    refs = ["a sheltered port where ships can take on cargo", "domesticated ox having a humped back"]
    same = text_scores(refs, refs)
    assert same["rouge1"] == pytest.approx(100) and same["rougeL"] == pytest.approx(100)
    assert same["bleu4"] == pytest.approx(100)
    other = text_scores(["zzz qqq", "xxx yyy"], refs)
    assert other["rouge1"] == 0 and other["rouge2"] == 0 and other["bleu4"] == pytest.approx(0, abs=1e-6)


def test_rouge_partial_overlap_known_value() -> None:
    # unigram overlap 2 of 4 (pred) and 2 of 2... F1 = 2PR/(P+R) with P=0.5, R=1 -> 0.667
    scores = text_scores(["the cat sat down"], ["cat sat"])
    assert scores["rouge1"] == pytest.approx(100 * 2 * 0.5 * 1 / 1.5, rel=1e-6)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size() -> None:
    base, tok = load_base_model(ModelConfig(name_or_path="tiny:llama"))
    with torch.no_grad():
        for p in base.lm_head.parameters():
            p.zero_()  # all logits 0: a uniform distribution over the vocabulary
    items = tokenize([Example("abc", "hello"), Example("x", "yz")], tok, DataConfig())
    assert perplexity(base, items, tok.pad_token_id) == pytest.approx(base.config.vocab_size, rel=1e-4)
    assert math.isfinite(perplexity(base, items[:1], tok.pad_token_id))


def test_generation_uses_the_learned_prefix_of_prompt_learning_adapters() -> None:
    import numpy as np

    from fedguard.params import layout_of, load_vector
    from fedguard_train.config import AdapterConfig
    from fedguard_train.metrics import generate_responses
    from fedguard_train.models import attach_adapter, family_of

    base, tok = load_base_model(ModelConfig(name_or_path="tiny:llama"))
    model = attach_adapter(base, family_of(base), AdapterConfig(method="p-tuning-v2", pre_seq_len=4))
    layout = layout_of(model)
    prompts = [Example("hello", ""), Example("abc", "")]
    outs = []
    for seed in (0, 1):
        load_vector(model, layout, np.random.default_rng(seed).standard_normal(layout.size).astype(np.float32) * 3)
        outs.append(generate_responses(model, tok, prompts, max_new_tokens=6))
    assert outs[0] != outs[1]  # a different prefix changes what the model says


def test_uncached_greedy_decoding_matches_generate_for_lora() -> None:
    from fedguard_train.config import AdapterConfig
    from fedguard_train.data import format_prompt
    from fedguard_train.metrics import _greedy_without_cache, generate_responses
    from fedguard_train.models import attach_adapter, family_of

    base, tok = load_base_model(ModelConfig(name_or_path="tiny:llama"), seed=2)
    model = attach_adapter(base, family_of(base), AdapterConfig())
    model.eval()
    ex = Example("hello there", "")
    prompt = tok(format_prompt(tok, ex.prompt), add_special_tokens=False)["input_ids"]
    manual = tok.decode(_greedy_without_cache(model, tok, prompt, 8), skip_special_tokens=True).strip()
    assert manual == generate_responses(model, tok, [ex], max_new_tokens=8)[0]
