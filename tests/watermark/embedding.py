"""Shared set-up for watermark tests: embed a key's regulariser alone, and a watermarked Houlsby-adapter model."""

from __future__ import annotations

from pathlib import Path

import torch

from fedguard.rng import SecureRNG
from fedguard.watermark import SignKey, SignWatermark, make_sign_key, prepare_norm_targets


def embed_until_margins_hold(wm: SignWatermark, model: torch.nn.Module, max_steps: int = 300,
                             lr: float = 1e-2) -> None:
    """Adam on the regulariser alone (it needs no data) until it is exactly 0 (every bit's margin holds)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(max_steps):
        loss = wm.loss()
        if float(loss.detach()) == 0.0:
            return
        opt.zero_grad()
        loss.backward()
        opt.step()


def watermarked_bottleneck(tmp_path: Path, label: str, owner: str = "") -> tuple[torch.nn.Module, SignKey]:
    """A tiny GPT-2 base saved at ``tmp_path/base`` and a bottleneck-adapter model over it whose norm scales
    carry a 32-bit gram key (``label`` seeds the key), saved at ``tmp_path/adapter``."""
    from fedguard_train.bottleneck import BottleneckModel
    from tests.models import tiny_gpt2

    tiny_gpt2(4).save_pretrained(tmp_path / "base")
    model = BottleneckModel(tiny_gpt2(4), target_modules=["attn.c_proj", "mlp.c_proj"], bottleneck_size=4)
    model.base_model.config.name_or_path = str(tmp_path / "base")
    prepare_norm_targets(model)
    key = make_sign_key(model, bits=32, mode="gram", alpha=1.0, owner=owner, rng=SecureRNG.for_testing(label))
    embed_until_margins_hold(SignWatermark(key, model), model)
    model.save_pretrained(tmp_path / "adapter")
    return model, key
