"""Removal by fine-tuning: the attacker keeps training the released model on its own data.

Same-task fine-tuning with AdamW at learning rate ``lr`` for up to ``max(steps)`` steps on ``data``
(the attacker's data source: the task's data, or text sampled from the model itself), training the
parameters that require grad (``params="released"``: a peft adapter and the norms that travelled), every
parameter (``"all"``), or a fresh LoRA adapter on the merged model with everything else frozen
(``"new-lora"``: the common way to fine-tune a released model). Measured after each count in ``steps``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from attacks.watermark.result import AttackResult, measure, seeded_loss, task_loss
from fedguard.errors import ConfigError
from fedguard.watermark.keys import SignKey


def finetune(model: torch.nn.Module, keys: Sequence[SignKey], data: torch.Tensor, *, steps: Sequence[int],
             lr: float = 5e-3, batch_size: int = 16, params: Literal["released", "all", "new-lora"] = "released",
             seed: int = 0, lora_rank: int = 8, eval_data: torch.Tensor | None = None) -> list[AttackResult]:
    """Fine-tune ``model`` (in place, except ``"new-lora"``, which merges a copy and wraps it); one result
    per entry of ``steps`` (increasing step counts). The task loss is scored on ``eval_data`` (held-out
    sequences) if given, else on the attacker's ``data``."""
    counts = sorted(set(int(s) for s in steps))
    if not counts or counts[0] < 0 or not lr > 0:
        raise ConfigError(f"fine-tuning needs step counts >= 0 and lr > 0, got {list(steps)}, {lr}")
    if params == "new-lora":
        model = _fresh_lora(model, lora_rank)
    elif params == "all":
        for p in model.parameters():
            p.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("no trainable parameters to fine-tune (params='released' on a frozen model)")
    scored = data if eval_data is None else eval_data
    base_loss = task_loss(model, scored)
    opt = torch.optim.AdamW(trainable, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    dropout = torch.Generator().manual_seed(seed)
    out, done = [], 0
    for target in counts:
        model.train()
        while done < target:
            idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen)
            loss = seeded_loss(model, data[idx], dropout)  # dropout masks from ``seed`` too
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
        out.append(measure(model, keys, scored, attack=f"finetune ({params}, lr={lr:g})", strength=float(target),
                           label=f"{target} steps", reference_loss=base_loss))
    return out


def _fresh_lora(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    """A merged copy of ``model`` with every weight frozen and a new LoRA adapter of ``rank`` on its
    linear layers (GPT-2: c_attn, c_proj, c_fc; Llama-style: q/k/v/o and gate/up/down projections)."""
    import copy

    from peft import LoraConfig, get_peft_model

    from attacks.watermark.transforms import merged

    full = merged(copy.deepcopy(model))
    for p in full.parameters():
        p.requires_grad_(False)
    names = {n.rsplit(".", 1)[-1] for n, m in full.named_modules()
             if type(m).__name__ in ("Conv1D", "Linear") and (".h." in f".{n}" or ".layers." in f".{n}")}
    names = {n for n in names if not n.isdigit() and n not in ("lm_head",)}
    if not names:
        raise ConfigError("no linear layers found for a fresh LoRA adapter")
    conv = any(type(m).__name__ == "Conv1D" for m in full.modules())
    cfg = LoraConfig(r=rank, lora_alpha=4 * rank, lora_dropout=0.0, target_modules=sorted(names),
                     fan_in_fan_out=conv, task_type="CAUSAL_LM")
    return get_peft_model(full, cfg)
