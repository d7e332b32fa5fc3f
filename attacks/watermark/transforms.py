"""Weight transforms an attacker applies to a released model: pruning, quantisation and exact
re-parametrisations (function unchanged up to floating-point rounding).

All act in place on a *full* (merged) model of the GPT-2 family (``GPT2LMHeadModel``, Conv1D weights
``[in, out]``) or the Llama family (``model.layers[i]`` with ``self_attn.{q,k,v,o}_proj`` and
``mlp.{gate,up,down}_proj``, ``nn.Linear`` weights ``[out, in]``: Llama, SmolLM2, Mistral, Qwen2);
:func:`merged` merges a ``peft`` adapter first, as an attacker who releases a full model would. Other
families raise :class:`~fedguard.errors.ConfigError` (not implemented, rather than silently doing nothing).

Re-parametrisations (each leaves the network's function unchanged; the suite measures max |Δ logits|):

* norm fold ``γ ← s⊙γ, β ← s⊙β, W ← diag(s)^-1 W`` with random magnitudes and sign flips;
* MLP permutation: hidden units of ``c_fc`` (columns, bias) and rows of ``c_proj`` permuted alike;
* head permutation: the heads of q, k, v (columns of ``c_attn``) and the rows of ``attn.c_proj``;
* head rotation: per head an orthogonal ``R_h``: ``q ← qR, k ← kR`` (so ``qkᵀ`` is unchanged),
  ``v ← vR`` and ``c_proj`` rows of that head ``← R_hᵀ`` times them. On the Llama family the value/output
  rotation is any orthogonal matrix per key-value head, while q and k of a group get a rotation that
  commutes with RoPE: an independent 2-D rotation in each of RoPE's frequency planes ``(i, i + d/2)``;
* residual rotation (QuaRot, Ashkboos et al. 2024): untie the LM head, fold every norm scale into the
  layers that read it, then rotate the residual basis by a random orthogonal ``Q`` (embeddings ``E ← EQ``,
  readers ``W ← WQ``, writers ``W ← QᵀW``); on GPT-2 ``Q`` keeps the all-ones direction (LayerNorm
  subtracts the mean) and the norms' β fold into the readers' biases; see
  :mod:`fedguard.watermark.alignment` for the defence.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from fedguard.errors import ConfigError
from fedguard.watermark.invariant import base_linear, reparametrise_norm


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The full model: a ``peft`` model merged (``merge_and_unload``), anything else as it is."""
    merge = getattr(model, "merge_and_unload", None)
    return merge() if callable(merge) else model


def llama_layers(model: torch.nn.Module) -> list[Any] | None:
    """The decoder layers of a Llama-family model (``model.model.layers``), or None for another family. (A
    layer still wrapped by peft LoRA counts; the transforms themselves need a merged model.)"""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or len(layers) == 0:
        return None
    first = layers[0]
    attn, mlp = getattr(first, "self_attn", None), getattr(first, "mlp", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if attn is None or mlp is None or not all(isinstance(base_linear(getattr(attn, n, None)), torch.nn.Linear)
                                              for n in names) \
            or not isinstance(base_linear(getattr(mlp, "gate_proj", None)), torch.nn.Linear):
        return None
    return list(layers)


def _blocks(model: torch.nn.Module) -> list[Any]:
    transformer = getattr(model, "transformer", None)
    h = getattr(transformer, "h", None)
    if h is None or type(h[0].attn.c_attn).__name__ != "Conv1D":
        raise ConfigError(f"these re-parametrisations are implemented for the GPT-2 and Llama families only, "
                          f"not {type(model).__name__}")
    return list(h)


def _weights(model: torch.nn.Module) -> list[tuple[torch.Tensor, int]]:
    """The 2-D weights of the transformer blocks (attention and MLP matrices; not embeddings/head), each
    with the axis of its output channels (Conv1D ``[in, out]``: 1; ``nn.Linear`` ``[out, in]``: 0)."""
    out: list[tuple[torch.Tensor, int]] = []
    for name, module in model.named_modules():
        inside = ".h." in f".{name}." or ".layers." in f".{name}."
        weight = getattr(module, "weight", None)
        if not inside or not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            continue
        if type(module).__name__ == "Conv1D":
            out.append((weight, 1))
        elif isinstance(module, torch.nn.Linear):
            out.append((weight, 0))
    if not out:
        raise ConfigError("no transformer block weights found to attack")
    return out


@torch.no_grad()
def prune(model: torch.nn.Module, fraction: float, *, norms: bool = False) -> None:
    """Zero the ``fraction`` smallest-magnitude entries of every block weight (and of every norm scale
    with ``norms``): unstructured magnitude pruning."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"prune fraction must be in [0, 1), got {fraction}")
    tensors = [w for w, _ in _weights(model)]
    if norms:
        tensors += [p for n, p in model.named_parameters() if p.ndim == 1 and ("ln_" in n or "norm" in n)]
    for w in tensors:
        _prune_smallest(w, fraction)


def _prune_smallest(w: torch.Tensor, fraction: float) -> None:
    """Zero the ``fraction`` smallest-magnitude entries of ``w`` in place (ties at the threshold too)."""
    k = int(fraction * w.numel())
    if k:
        w.masked_fill_(w.abs() <= w.abs().flatten().kthvalue(k).values, 0.0)


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
    for w, out_axis in _weights(model):
        amax = w.abs().amax(dim=1 - out_axis, keepdim=True) if per_channel else w.abs().max()
        scale = torch.where(amax > 0, amax / levels, torch.ones_like(amax))
        w.copy_(torch.round(w / scale).clamp(-levels, levels) * scale)


@torch.no_grad()
def fold_norms(model: torch.nn.Module, generator: torch.Generator, *, spread: float = 1.0) -> None:
    """Norm fold with sign flips: ``s = ±exp(N(0, spread²))`` per channel of every norm that feeds a block
    (GPT-2 ln_1/ln_2; Llama input/post-attention RMSNorm, compensated in q/k/v and gate/up)."""
    layers = llama_layers(model)
    pairs: list[tuple[Any, list[Any]]]
    if layers is not None:
        pairs = [(layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
                 for layer in layers]
        pairs += [(layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj]) for layer in layers]
    else:
        pairs = [(norm, [consumer]) for block in _blocks(model)
                 for norm, consumer in ((block.ln_1, block.attn.c_attn), (block.ln_2, block.mlp.c_fc))]
    for norm, consumers in pairs:
        d = norm.weight.shape[0]
        mag = torch.exp(torch.randn(d, generator=generator, dtype=torch.float64) * spread)
        sign = torch.where(torch.rand(d, generator=generator) < 0.5, -1.0, 1.0).double()
        reparametrise_norm(norm, consumers, (mag * sign).to(norm.weight.dtype))


@torch.no_grad()
def permute_mlp(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Permute every MLP's hidden units (GPT-2: c_fc columns and bias, c_proj rows; Llama: gate/up rows,
    down columns)."""
    layers = llama_layers(model)
    if layers is not None:
        for layer in layers:
            mlp = layer.mlp
            perm = torch.randperm(mlp.gate_proj.weight.shape[0], generator=generator)
            for lin in (mlp.gate_proj, mlp.up_proj):
                _permute_rows(lin, perm)
            mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, perm])
        return
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
    """Permute the attention heads of every block (q, k, v together, and c_proj's rows; on the Llama family
    the key-value groups, each with its query heads, and o_proj's columns)."""
    layers = llama_layers(model)
    if layers is not None:
        for layer in layers:
            n_head, n_kv, d = _llama_heads(layer)
            group = n_head // n_kv
            order = torch.randperm(n_kv, generator=generator).tolist()
            kv_idx = torch.cat([torch.arange(g * d, (g + 1) * d) for g in order])
            q_idx = torch.cat([torch.arange((g * group + j) * d, (g * group + j + 1) * d)
                               for g in order for j in range(group)])
            attn = layer.self_attn
            _permute_rows(attn.q_proj, q_idx)
            _permute_rows(attn.k_proj, kv_idx)
            _permute_rows(attn.v_proj, kv_idx)
            attn.o_proj.weight.copy_(attn.o_proj.weight[:, q_idx])
        return
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
    """Per head a random orthogonal ``R``: q, k and v columns times R, c_proj rows of the head ``Rᵀ·``
    (Llama family: see the module docstring; q/k get RoPE-commuting rotations)."""
    layers = llama_layers(model)
    if layers is not None:
        for layer in layers:
            _rotate_llama_heads(layer, generator)
        return
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


def _lora_factors(model: torch.nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The weights ``(A, B)`` of every active LoRA adapter of ``model`` (peft's ``lora_A``/``lora_B``)."""
    module: Any
    for module in model.modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "get_base_layer")):
            continue
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                yield module.lora_A[adapter].weight, module.lora_B[adapter].weight


@torch.no_grad()
def prune_lora(model: torch.nn.Module, fraction: float) -> int:
    """Zero the ``fraction`` smallest-magnitude entries of every LoRA factor (``lora_A``, ``lora_B`` of each
    active adapter), the adapter left unmerged: pruning the released adapter itself. Returns the number
    of factor matrices pruned; raises for a model without LoRA layers."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"prune fraction must be in [0, 1), got {fraction}")
    count = 0
    for a, b in _lora_factors(model):
        for w in (a, b):
            _prune_smallest(w, fraction)
            count += 1
    if count == 0:
        raise ConfigError("the model has no LoRA layers to prune")
    return count


@torch.no_grad()
def refactor_lora(model: torch.nn.Module) -> int:
    """LoRA refactoring and SVD re-extraction at the same rank: each adapter's ``ΔW = s·BA`` is replaced by
    its rank-r SVD factors ``B' = U√Σ/s, A' = √ΣVᵀ`` (same product, different factors). Returns the
    number of layers refactored; raises for a model without LoRA layers."""
    count = 0
    for a, b in _lora_factors(model):  # [r, in], [out, r]
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


def _permute_rows(lin: torch.nn.Linear, idx: torch.Tensor) -> None:
    lin.weight.copy_(lin.weight[idx, :])
    if lin.bias is not None:
        lin.bias.copy_(lin.bias[idx])


def _llama_heads(layer: Any) -> tuple[int, int, int]:
    """(query heads, key-value heads, head dim) of a Llama-family decoder layer."""
    attn = layer.self_attn
    d = int(attn.head_dim)
    n_head = int(attn.q_proj.weight.shape[0]) // d
    n_kv = int(attn.k_proj.weight.shape[0]) // d
    if n_head % n_kv:
        raise ConfigError(f"{n_head} query heads do not split into {n_kv} key-value groups")
    return n_head, n_kv, d


def _rope_rotation(d: int, generator: torch.Generator) -> torch.Tensor:
    """A random rotation of R^d that commutes with RoPE (HF ``rotate_half`` layout): an independent 2-D
    rotation of each frequency plane ``(i, i + d/2)``."""
    half = d // 2
    theta = torch.rand(half, generator=generator, dtype=torch.float64) * 2 * torch.pi
    rot = torch.eye(d, dtype=torch.float64)
    i = torch.arange(half)
    rot[i, i] = torch.cos(theta)
    rot[i + half, i + half] = torch.cos(theta)
    rot[i, i + half] = -torch.sin(theta)
    rot[i + half, i] = torch.sin(theta)
    return rot


def _rotate_rows(lin: torch.nn.Linear, rows: slice, rot: torch.Tensor) -> None:
    """Head outputs ``y ← y R`` for the rows in ``rows``: ``W[rows] ← Rᵀ W[rows]``, ``b[rows] ← b[rows] R``."""
    w = lin.weight.double()
    w[rows] = rot.t() @ w[rows]
    lin.weight.copy_(w)
    if lin.bias is not None:
        b = lin.bias.double()
        b[rows] = b[rows] @ rot
        lin.bias.copy_(b)


def _rotate_llama_heads(layer: Any, generator: torch.Generator) -> None:
    n_head, n_kv, d = _llama_heads(layer)
    group = n_head // n_kv
    attn = layer.self_attn
    o = attn.o_proj.weight.double()
    for g in range(n_kv):
        kv = slice(g * d, (g + 1) * d)
        qk_rot = _rope_rotation(d, generator)
        v_rot = _orthogonal(d, generator)
        _rotate_rows(attn.k_proj, kv, qk_rot)
        _rotate_rows(attn.v_proj, kv, v_rot)
        for j in range(group):
            heads = slice((g * group + j) * d, (g * group + j + 1) * d)
            _rotate_rows(attn.q_proj, heads, qk_rot)
            o[:, heads] = o[:, heads] @ v_rot  # the head's output a R meets columns W_o R
    attn.o_proj.weight.copy_(o)


def _mean_preserving_orthogonal(d: int, generator: torch.Generator) -> torch.Tensor:
    """A random orthogonal ``Q`` with ``Q1 = 1``: identity on the all-ones direction, a random rotation of
    its orthogonal complement (so LayerNorm's mean subtraction commutes with it)."""
    ones = torch.full((d, 1), d ** -0.5, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.cat([ones, torch.randn(d, d - 1, generator=generator, dtype=torch.float64)], 1))
    rest = basis[:, 1:]  # orthonormal, orthogonal to 1
    return ones @ ones.t() + rest @ _orthogonal(d - 1, generator) @ rest.t()


@torch.no_grad()
def _rotate_gpt2_residual(model: Any, generator: torch.Generator) -> None:
    """GPT-2 (LayerNorm): a rotation that keeps the all-ones direction commutes with the mean subtraction
    and the normalisation; fold every LayerNorm's γ and β into its reader (β into the reader's bias), then
    rotate embeddings, positions, readers (``W ← QᵀW``, Conv1D ``[in, out]``) and writers (``W ← WQ``,
    ``b ← bQ``). The final norm's β becomes a bias of an untied LM head."""
    blocks = _blocks(model)
    tr = model.transformer
    dim = int(tr.wte.weight.shape[1])
    rot = _mean_preserving_orthogonal(dim, generator)

    def fold_read(norm: Any, lin: Any) -> None:  # Conv1D reader of a LayerNorm
        gamma, beta = norm.weight.double(), norm.bias.double()
        w = lin.weight.double()
        lin.bias.copy_(lin.bias.double() + beta @ w)
        lin.weight.copy_(rot.t() @ (gamma[:, None] * w))
        norm.weight.fill_(1.0)
        norm.bias.zero_()

    def write(lin: Any) -> None:  # Conv1D writer to the residual
        lin.weight.copy_(lin.weight.double() @ rot)
        lin.bias.copy_(lin.bias.double() @ rot)

    for block in blocks:
        fold_read(block.ln_1, block.attn.c_attn)
        fold_read(block.ln_2, block.mlp.c_fc)
        write(block.attn.c_proj)
        write(block.mlp.c_proj)
    head = model.lm_head
    gamma, beta = tr.ln_f.weight.double(), tr.ln_f.bias.double()
    emb = head.weight.double()  # [vocab, D] (tied to wte until now)
    new_head = torch.nn.Linear(dim, emb.shape[0], bias=bool((beta != 0).any()), dtype=head.weight.dtype)
    new_head.weight.copy_((emb * gamma[None, :]) @ rot)
    if new_head.bias is not None:
        new_head.bias.copy_(emb @ beta)
    model.lm_head = new_head
    model.config.tie_word_embeddings = False
    tr.ln_f.weight.fill_(1.0)
    tr.ln_f.bias.zero_()
    tr.wte.weight.copy_(tr.wte.weight.double() @ rot)
    tr.wpe.weight.copy_(tr.wpe.weight.double() @ rot)


@torch.no_grad()
def rotate_residual(model: torch.nn.Module, generator: torch.Generator) -> None:
    """QuaRot-style rotation of the residual stream (Llama family): untie the LM head, fold every RMSNorm
    scale into its readers (γ ← 1), then ``E ← EQ``, readers ``W ← WQ``, writers ``W ← QᵀW`` for one
    random orthogonal ``Q``. Exact in real arithmetic (``rms(hQ) = rms(h)``); computed in float64. GPT-2:
    :func:`_rotate_gpt2_residual` (a rotation keeping the all-ones direction)."""
    layers = llama_layers(model)
    if layers is None:
        _rotate_gpt2_residual(model, generator)
        return
    if any(lin.bias is not None for layer in layers for lin in (layer.self_attn.o_proj, layer.mlp.down_proj)):
        raise ConfigError("residual rotation with biased o_proj/down_proj (writers to the residual) is not implemented")
    inner: Any = model.model
    head = getattr(model, "lm_head", None)
    if not isinstance(head, torch.nn.Linear) or getattr(head, "bias", None) is not None:
        raise ConfigError("residual rotation needs an unbiased linear LM head")
    embed = inner.embed_tokens
    if head.weight is embed.weight:  # untie: the head will carry the final norm's scale
        head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
        model.config.tie_word_embeddings = False
    dim = int(embed.weight.shape[1])
    rot = _orthogonal(dim, generator)

    def fold(norm: Any, readers: list[torch.nn.Linear]) -> None:
        gamma = norm.weight.double()
        for lin in readers:
            lin.weight.copy_(lin.weight.double() * gamma[None, :])
        norm.weight.fill_(1.0)

    def read(lin: torch.nn.Linear) -> None:
        lin.weight.copy_(lin.weight.double() @ rot)

    def write(lin: torch.nn.Linear) -> None:
        lin.weight.copy_(rot.t() @ lin.weight.double())

    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        fold(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        fold(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            read(lin)
        write(attn.o_proj)
        write(mlp.down_proj)
    fold(inner.norm, [head])
    read(head)
    embed.weight.copy_(embed.weight.double() @ rot)
