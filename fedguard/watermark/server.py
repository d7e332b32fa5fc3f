"""The server-side watermark component: after the (possibly DP-noised) aggregate is released, the server
re-embeds every client's watermark with a few optimiser steps on the regularisers alone.

Under client-level DP the clients' watermark pushes are clipped together with their task updates and
drowned by the Gaussian noise on the mean (13-14 of 32 bits in the private example, docs/watermark.md).
The server sees the released aggregate θ_{r+1} and can take ``steps`` Adam steps on

    Σ_k L_wm,k(θ) = Σ_k α Σ_j relu(γ0 − b_kj z_kj(θ))

over the travelling parameters. This reads no client data — only θ_{r+1}, a DP release, and the keys — so
by the post-processing property of differential privacy (Dwork and Roth 2014, Prop. 2.1) it costs no
privacy. What it costs is trust: the clients hand their keys (seeds and targets) to the server, which can
then verify — or, knowing the secret directions, try to erase — every client's watermark. The hinge is
zero once every bit clears its margin, so the steps stop early and leave a model that already verifies
untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedguard.errors import ConfigError
from fedguard.watermark.sign import SignWatermark


def server_embed(model: torch.nn.Module, marks: Sequence[SignWatermark], steps: int, lr: float) -> int:
    """``steps`` Adam steps (learning rate ``lr``) on ``Σ_k L_wm,k`` over the parameters of ``model`` that
    require grad; stops as soon as every hinge is zero. Returns the number of steps taken."""
    if steps < 0 or not lr > 0:
        raise ConfigError(f"server-side embedding needs steps >= 0 and lr > 0, got {steps}, {lr}")
    params = [p for p in model.parameters() if p.requires_grad]
    if steps and not params:
        raise ConfigError("server-side embedding: the model has no trainable parameters")
    opt = torch.optim.Adam(params, lr=lr)
    was = model.training
    model.train()
    taken = 0
    try:
        for _ in range(steps):
            loss = sum((m.loss() for m in marks), torch.zeros(()))
            if float(loss.detach()) == 0.0:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            taken += 1
    finally:
        opt.zero_grad(set_to_none=True)
        model.train(was)
    return taken
