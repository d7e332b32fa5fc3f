"""The paper's metrics (FATE-LLM §4, Tables 1-2): ROUGE-1/2/L and BLEU-4 on generated responses, plus
perplexity on the reference responses.

Scores come from the reference implementations, not hand-written scorers: ``rouge-score`` (F-measure,
Porter stemming) and ``sacrebleu`` (corpus BLEU-4 with its default 13a tokenisation), both reported
x100 as in the paper. Generation is greedy (deterministic) so scores are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fedguard_train.data import Example, collate, format_prompt


def text_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 and corpus BLEU-4, all x100."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need equally many predictions and references, got {len(predictions)} and {len(references)}")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)
        for key in totals:
            totals[key] += scores[key].fmeasure
    out = {key: 100.0 * value / len(predictions) for key, value in totals.items()}
    out["bleu4"] = float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)
    return out


def _is_prompt_learning(model: Any) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


@torch.no_grad()
def _greedy_without_cache(model: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding by repeated full forward passes (one example, no padding).

    Used for peft's prompt-learning methods (P-Tuning-v2 / prefix and prompt tuning): with transformers 5
    and peft 0.21, ``generate`` on a prefix-tuned model ignores the learned prefix (its output equals the
    base model's, while ``forward`` uses the prefix), so the metrics would score the base model.
    """
    ids = list(prompt_ids)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
        token = int(logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        generated.append(token)
        ids.append(token)
    return generated


@torch.no_grad()
def generate_responses(model: Any, tokenizer: Any, examples: Sequence[Example], *, max_new_tokens: int,
                       batch_size: int = 8) -> list[str]:
    """Greedy generations for the prompts of ``examples`` (left-padded batches; prompt-learning adapters
    decode one example at a time, see :func:`_greedy_without_cache`)."""
    model.eval()
    outputs: list[str] = []
    if _is_prompt_learning(model):
        for ex in examples:
            prompt = tokenizer(format_prompt(tokenizer, ex.prompt), add_special_tokens=False)["input_ids"]
            tokens = _greedy_without_cache(model, tokenizer, prompt, max_new_tokens)
            outputs.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
        return outputs
    pad = tokenizer.pad_token_id
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [tokenizer(format_prompt(tokenizer, ex.prompt), add_special_tokens=False)["input_ids"]
                   for ex in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for row in generated[:, width:]:
            outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return outputs


@torch.no_grad()
def perplexity(model: Any, items: Sequence[dict[str, list[int]]], pad_id: int, *, batch_size: int = 8) -> float:
    """exp(mean negative log-likelihood per response token)."""
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(items), batch_size):
        batch = collate(items[start : start + batch_size], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        # peft prompt methods prepend virtual tokens to the logits: keep the last positions only
        logits = logits[:, -labels.shape[1]:, :]
        shift_logits, shift_labels = logits[:, :-1, :], labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]).float(),
                                                shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
        total_nll += float(nll)
        total_tokens += int((shift_labels != -100).sum())
    return math.exp(total_nll / max(1, total_tokens))


def evaluate(model: Any, tokenizer: Any, examples: Sequence[Example], items: Sequence[dict[str, list[int]]],
             *, max_new_tokens: int) -> dict[str, Any]:
    """All metrics on a test split, plus a few sample generations for the report."""
    predictions = generate_responses(model, tokenizer, examples, max_new_tokens=max_new_tokens)
    scores: dict[str, Any] = dict(text_scores(predictions, [ex.response for ex in examples]))
    scores["perplexity"] = perplexity(model, items, tokenizer.pad_token_id)
    scores["samples"] = [{"prompt": ex.prompt, "reference": ex.response, "generated": pred}
                         for ex, pred in list(zip(examples, predictions))[:3]]
    return scores
