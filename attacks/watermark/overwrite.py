"""Removal by overwriting: the attacker embeds watermarks of its own into the released model.

The attacker knows the scheme and the targets (they are public in any key file) but not the owners'
seeds. It draws ``k`` fresh keys calibrated on the released model, and trains with the task loss plus
its ``k`` regularisers (FedIPR's objective, with the owners' α) for ``steps`` steps, hoping the new
constraints push the owners' bits over. Measured for each ``k`` on a fresh copy of the model.

``k = 0`` is the control: the same fine-tuning without attacker keys. With ``seed`` every ``k`` sees the
same batches, so ``loss(k) − loss(0)`` is what writing ``k`` keys cost the attacker in task loss;
``eval_data`` (held-out sequences) prices it on data the attacker did not train on.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from attacks.watermark.result import AttackResult, measure, seeded_loss, task_loss
from fedguard.errors import ConfigError
from fedguard.rng import SecureRNG
from fedguard.watermark.keys import SignKey
from fedguard.watermark.sign import SignWatermark, make_sign_key


def overwrite(model: torch.nn.Module, keys: Sequence[SignKey], data: torch.Tensor, *, attacker_keys: Sequence[int],
              steps: int = 200, lr: float = 5e-3, alpha: float | None = None, batch_size: int = 16,
              rng: SecureRNG | None = None, seed: int | None = None,
              eval_data: torch.Tensor | None = None) -> list[AttackResult]:
    """One result per count in ``attacker_keys`` (0 = fine-tuning alone); ``model`` itself is left as it
    was. ``alpha``: the attacker's regulariser weight (default: the owners', read from their key);
    ``seed``: batch order shared by every count (default: one order per count)."""
    if not keys:
        raise ConfigError("overwrite needs the owners' keys to measure")
    if steps < 1 or any(k < 0 for k in attacker_keys):
        raise ConfigError(f"overwrite needs steps >= 1 and attacker key counts >= 0, got {steps}, {list(attacker_keys)}")
    if alpha is not None and not alpha > 0:
        raise ConfigError(f"the attacker's alpha must be > 0, got {alpha}")
    rng = rng or SecureRNG()
    scored = data if eval_data is None else eval_data
    base_loss = task_loss(model, scored)
    template = keys[0]
    out = []
    for k in attacker_keys:
        victim = copy.deepcopy(model)
        mine = [make_sign_key(victim, like=template, owner=f"attacker-{i}", rng=rng.spawn(f"attacker/{k}/{i}"))
                for i in range(k)]
        marks = [SignWatermark(key if alpha is None else _with_alpha(key, alpha), victim) for key in mine]
        for key in mine:  # the attacker trains the same targets the owners did
            for block in key.blocks:
                for name in block.params:
                    victim.get_submodule(_base_path(victim, block.module)).get_parameter(name).requires_grad_(True)
        trainable = [p for p in victim.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=lr)
        gen = torch.Generator().manual_seed(k if seed is None else seed)
        dropout = torch.Generator().manual_seed(k if seed is None else seed)
        victim.train()
        for _ in range(steps):
            idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen)
            loss = seeded_loss(victim, data[idx], dropout) + sum(m.loss() for m in marks)  # masks shared like the batches
            opt.zero_grad()
            loss.backward()
            opt.step()
        label = (f"{k} attacker key(s), attacker bits >= {min(m.detect().matched for m in marks)}" if marks
                 else "0 attacker keys (fine-tuning control)")
        out.append(measure(victim, keys, scored, attack=f"overwrite ({steps} steps)", strength=float(k),
                           label=label, reference_loss=base_loss))
    return out


def _with_alpha(key: SignKey, alpha: float) -> SignKey:
    from dataclasses import replace

    return replace(key, alpha=alpha)


def _base_path(model: torch.nn.Module, path: str) -> str:
    """``path`` (a base-model module path) as a path in ``model`` (a peft wrapper adds a prefix)."""
    get = getattr(model, "get_base_model", None)
    if callable(get):
        for name, module in model.named_modules():
            if module is get().get_submodule(path):
                return name
    return path
