"""Weight transforms an attacker applies to a released model: pruning, quantisation and exact
re-parametrisations (function unchanged up to floating-point rounding).

All act in place on a *full* (merged) GPT-2 model (``transformers`` ``GPT2LMHeadModel``, Conv1D weights
``[in, out]``); :func:`merged` merges a ``peft`` adapter first, as an attacker who releases a full model
would. Other families raise :class:`~fedguard.errors.ConfigError` (not implemented, rather than
silently doing nothing).

Re-parametrisations (each leaves the network's function unchanged; the suite measures max |Δ logits|):

* norm fold ``γ ← s⊙γ, β ← s⊙β, W ← diag(s)^-1 W`` with random magnitudes and sign flips;
* MLP permutation: hidden units of ``c_fc`` (columns, bias) and rows of ``c_proj`` permuted alike;
* head permutation: the heads of q, k, v (columns of ``c_attn``) and the rows of ``attn.c_proj``;
* head rotation: per head an orthogonal ``R_h``: ``q ← qR, k ← kR`` (so ``qkᵀ`` is unchanged),
  ``v ← vR`` and ``c_proj`` rows of that head ``← R_hᵀ`` times them.
"""

from __future__ import annotations

from typing import Any

import torch

from fedguard.errors import ConfigError
from fedguard.watermark.invariant import reparametrise_norm


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The full model: a ``peft`` model merged (``merge_and_unload``), anything else as it is."""
    merge = getattr(model, "merge_and_unload", None)
    return merge() if callable(merge) else model


def _blocks(model: torch.nn.Module) -> list[Any]:
    transformer = getattr(model, "transformer", None)
    h = getattr(transformer, "h", None)
    if h is None or type(h[0].attn.c_attn).__name__ != "Conv1D":
        raise ConfigError(f"these re-parametrisations are implemented for GPT-2 models only, not "
                          f"{type(model).__name__}")
    return list(h)


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The 2-D weights of the transformer blocks (attention and MLP matrices; not embeddings/head)."""
    out: list[torch.Tensor] = []
    for name, p in model.named_parameters():
        if p.ndim == 2 and ".h." in f".{name}" and "wte" not in name and "wpe" not in name:
            out.append(p)
    if not out:
        raise ConfigError("no transformer block weights found to attack")
    return out


@torch.no_grad()
def prune(model: torch.nn.Module, fraction: float, *, norms: bool = False) -> None:
    """Zero the ``fraction`` smallest-magnitude entries of every block weight (and of every norm scale
    with ``norms``): unstructured magnitude pruning."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"prune fraction must be in [0, 1), got {fraction}")
    tensors = _weights(model)
    if norms:
        tensors += [p for n, p in model.named_parameters() if p.ndim == 1 and ("ln_" in n or "norm" in n)]
    for w in tensors:
        k = int(fraction * w.numel())
        if k == 0:
            continue
        threshold = w.abs().flatten().kthvalue(k).values
        w.masked_fill_(w.abs() <= threshold, 0.0)


@torch.no_grad()
def quantise(model: torch.nn.Module, bits: int | str, *, per_channel: bool = False) -> None:
    """Round-trip every block weight through ``bits``-bit symmetric integer quantisation (per tensor, or
    per output channel), or through ``"fp16"``/``"bf16"`` (all parameters)."""
    if bits in ("fp16", "bf16"):
        dtype = torch.float16 if bits == "fp16" else torch.bfloat16
        for p in model.parameters():
            p.copy_(p.to(dtype).to(p.dtype))
        return
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ConfigError(f"quantisation bits must be an int in [2, 16] or 'fp16'/'bf16', got {bits!r}")
    levels = 2 ** (bits - 1) - 1
    for w in _weights(model):
        amax = w.abs().amax(dim=0, keepdim=True) if per_channel else w.abs().max()  # Conv1D: out = dim 1
        scale = torch.where(amax > 0, amax / levels, torch.ones_like(amax))
        w.copy_(torch.round(w / scale).clamp(-levels, levels) * scale)


@torch.no_grad()
def fold_norms(model: torch.nn.Module, generator: torch.Generator, *, spread: float = 1.0) -> None:
    """Norm fold with sign flips: ``s = ±exp(N(0, spread²))`` per channel of every ln_1/ln_2."""
    for block in _blocks(model):
        for norm, consumer in ((block.ln_1, block.attn.c_attn), (block.ln_2, block.mlp.c_fc)):
            d = norm.weight.shape[0]
            mag = torch.exp(torch.randn(d, generator=generator, dtype=torch.float64) * spread)
            sign = torch.where(torch.rand(d, generator=generator) < 0.5, -1.0, 1.0).double()
            reparametrise_norm(norm, [consumer], (mag * sign).to(norm.weight.dtype))


@torch.no_grad()
def permute_mlp(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Permute every MLP's hidden units (c_fc columns and bias, c_proj rows)."""
    for block in _blocks(model):
        fc, proj = block.mlp.c_fc, block.mlp.c_proj
        perm = torch.randperm(fc.weight.shape[1], generator=generator)
        fc.weight.copy_(fc.weight[:, perm])
        fc.bias.copy_(fc.bias[perm])
        proj.weight.copy_(proj.weight[perm, :])


def _heads(block: Any) -> tuple[int, int]:
    n_head = int(block.attn.num_heads)
    return n_head, int(block.attn.c_attn.weight.shape[0]) // n_head


@torch.no_grad()
def permute_heads(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Permute the attention heads of every block (q, k, v together, and c_proj's rows)."""
    for block in _blocks(model):
        n_head, d = _heads(block)
        hidden = n_head * d
        order = torch.randperm(n_head, generator=generator)
        idx = torch.cat([torch.arange(h * d, (h + 1) * d) for h in order.tolist()])
        cols = torch.cat([idx, idx + hidden, idx + 2 * hidden])
        att = block.attn.c_attn
        att.weight.copy_(att.weight[:, cols])
        att.bias.copy_(att.bias[cols])
        block.attn.c_proj.weight.copy_(block.attn.c_proj.weight[idx, :])


def _orthogonal(d: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


@torch.no_grad()
def rotate_heads(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Per head a random orthogonal ``R``: q, k and v columns times R, c_proj rows of the head ``Rᵀ·``."""
    for block in _blocks(model):
        n_head, d = _heads(block)
        hidden = n_head * d
        att, proj = block.attn.c_attn, block.attn.c_proj
        w, b, pw = att.weight.double(), att.bias.double(), proj.weight.double()
        for h in range(n_head):
            rot = _orthogonal(d, generator)
            for part in range(3):
                sl = slice(part * hidden + h * d, part * hidden + (h + 1) * d)
                w[:, sl] = w[:, sl] @ rot
                b[sl] = b[sl] @ rot
            rows = slice(h * d, (h + 1) * d)
            pw[rows, :] = rot.t() @ pw[rows, :]
        att.weight.copy_(w)
        att.bias.copy_(b)
        proj.weight.copy_(pw)


@torch.no_grad()
def refactor_lora(model: torch.nn.Module) -> int:
    """LoRA refactoring and SVD re-extraction at the same rank: each adapter's ``ΔW = s·BA`` is replaced by
    its rank-r SVD factors ``B' = U√Σ/s, A' = √ΣVᵀ`` (same product, different factors). Returns the
    number of layers refactored; raises for a model without LoRA layers."""
    count = 0
    module: Any
    for module in model.modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "get_base_layer")):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight  # [r, in], [out, r]
            rank = a.shape[0]
            delta = (b.double() @ a.double())
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            root = s[:rank].sqrt()
            b.copy_(u[:, :rank] * root[None, :])
            a.copy_(root[:, None] * vh[:rank])
            count += 1
    if count == 0:
        raise ConfigError("the model has no LoRA layers to refactor")
    return count
