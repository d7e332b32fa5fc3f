"""Removal by fine-tuning: the attacker keeps training the released model on its own data.

Same-task fine-tuning with AdamW at learning rate ``lr`` for up to ``max(steps)`` steps on ``data``
(the attacker's data source: the task's data, or text sampled from the model itself), training the
parameters that require grad (``params="released"``: a peft adapter and the norms that travelled) or every
parameter (``"all"``). Measured after each count in ``steps``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from attacks.watermark.result import AttackResult, measure, task_loss
from fedguard.errors import ConfigError
from fedguard.watermark.keys import SignKey


def finetune(model: torch.nn.Module, keys: Sequence[SignKey], data: torch.Tensor, *, steps: Sequence[int],
             lr: float = 5e-3, batch_size: int = 16, params: Literal["released", "all"] = "released",
             seed: int = 0) -> list[AttackResult]:
    """Fine-tune ``model`` in place; one result per entry of ``steps`` (increasing step counts)."""
    counts = sorted(set(int(s) for s in steps))
    if not counts or counts[0] < 0 or not lr > 0:
        raise ConfigError(f"fine-tuning needs step counts >= 0 and lr > 0, got {list(steps)}, {lr}")
    if params == "all":
        for p in model.parameters():
            p.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("no trainable parameters to fine-tune (params='released' on a frozen model)")
    base_loss = task_loss(model, data)
    opt = torch.optim.AdamW(trainable, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    out, done = [], 0
    for target in counts:
        model.train()
        while done < target:
            idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen)
            loss = model(input_ids=data[idx], labels=data[idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
        out.append(measure(model, keys, data, attack=f"finetune ({params}, lr={lr:g})", strength=float(target),
                           label=f"{target} steps", reference_loss=base_loss))
    return out
