"""Watermark features that function-preserving re-parametrisations cannot change.

The attack. A norm layer computes ``y = γ ⊙ x̂ + β`` and the next linear layer ``z = W y + c``. For any
non-zero scales ``s`` the transform

    γ' = s ⊙ γ,   β' = s ⊙ β,   W' = W diag(s)^-1

leaves ``z`` — and so the network's function — unchanged, but moves γ arbitrarily: with ``s_i = ±1`` a
thief flips the signs of chosen norm scales, and FedIPR's plain bits ``sign(Eᵀγ)`` become coin flips.
(For Llama's RMSNorm there is no β and the norm feeds q/k/v (or gate/up), which must all be compensated.)

The defence. Extract the bits from the *effective* weights ``W diag(γ)``, which the transform leaves
exactly as they were: ``W' diag(γ') = W diag(s)^-1 diag(s) diag(γ) = W diag(γ)``. To keep it cheap we
read them along a secret unit direction ``r`` of the linear layer's output space:

    φ_i = γ_i · (rᵀ W)_i = rᵀ W diag(γ) e_i         (one scalar per channel i),

so the feature of a norm block has the norm's dimension, and ``sign(Eᵀφ)`` is invariant to every
per-channel rescaling or sign flip of γ compensated in W. With a LoRA adapter on that linear layer, W is
the effective weight ``W₀ + s·BA`` (or the merged weight), so the defence also holds on a merged model.
Gradients of the hinge regulariser reach both γ and the adapter.

Not covered (stated in docs/watermark.md): transforms that act on W's *output* side (e.g. rescaling the
query rows by a and the key rows by 1/a) change ``rᵀW``; a joint permutation of the whole residual
stream permutes channels. Both would need extraction from a further invariant.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedguard.errors import ConfigError, KeyMismatchError

# For each norm (by the last component of its module path), the linear layers that read its output,
# relative to the norm's parent module. The first one carries the invariant feature; a function-preserving
# transform must compensate all of them.
CONSUMERS: dict[str, tuple[str, ...]] = {
    # GPT-2 (transformers GPT2Block): ln_1 -> attn.c_attn, ln_2 -> mlp.c_fc (Conv1D, weight [in, out]).
    "ln_1": ("attn.c_attn",),
    "ln_2": ("mlp.c_fc",),
    # Llama family (SmolLM2, Llama, Mistral, Qwen2): RMSNorm -> q/k/v, RMSNorm -> gate/up (nn.Linear).
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}


def consumer_paths(norm_path: str) -> tuple[str, ...]:
    """Module paths of the linear layers that read norm ``norm_path`` (empty if unknown, e.g. the final
    norm feeding a tied LM head, which cannot be compensated without untying the embedding)."""
    parent, _, leaf = norm_path.rpartition(".")
    rel = CONSUMERS.get(leaf, ())
    return tuple(f"{parent}.{r}" if parent else r for r in rel)


def _is_conv1d(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def is_lora(module: Any) -> bool:
    """Whether ``module`` is a peft LoRA layer (it has ``lora_A`` and a base layer)."""
    return hasattr(module, "lora_A") and hasattr(module, "get_base_layer")


def base_linear(module: Any) -> Any:
    """The plain linear layer under a peft LoRA wrapper (or the module itself)."""
    return module.get_base_layer() if is_lora(module) else module


def weight_in_out(module: Any) -> torch.Tensor:
    """The effective weight of a linear layer as an ``[in, out]`` matrix, LoRA deltas included.

    ``nn.Linear`` stores ``[out, in]``; GPT-2's ``Conv1D`` stores ``[in, out]``; a peft LoRA layer adds
    ``get_delta_weight`` of each active adapter unless it is merged into the base weight already.
    """
    base = base_linear(module)
    weight = base.weight
    if is_lora(module) and not getattr(module, "merged", False):
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                weight = weight + module.get_delta_weight(adapter)
    if _is_conv1d(base):
        return weight
    if isinstance(base, torch.nn.Linear):
        return weight.t()
    raise KeyMismatchError(f"invariant extraction needs a Linear or Conv1D consumer, got {type(base).__name__}")


def output_dim(module: Any) -> int:
    base = base_linear(module)
    return int(base.weight.shape[1] if _is_conv1d(base) else base.weight.shape[0])


def effective_response(consumer: Any, r: torch.Tensor) -> torch.Tensor:
    """``W_eff r`` with ``W_eff`` as ``[in, out]``: the consumer's input-side response along ``r``.

    For an unmerged LoRA layer this is ``W₀ r + Σ_a s_a·A_aᵀ(B_aᵀ r)``: two thin mat-vecs instead of
    materialising ``B A`` (DoRA and other variants fall back to ``get_delta_weight``).
    """
    base = base_linear(consumer)
    w = base.weight.to(r.dtype)  # r's dtype: float32 for the regulariser, float64 for extraction
    out = (w @ r) if _is_conv1d(base) else (r @ w)
    if is_lora(consumer) and not getattr(consumer, "merged", False):
        for adapter in consumer.active_adapters:
            if adapter not in consumer.lora_A:
                continue
            if getattr(consumer, "use_dora", {}).get(adapter, False):
                delta = consumer.get_delta_weight(adapter).to(r.dtype)
                out = out + ((delta @ r) if _is_conv1d(base) else (r @ delta))
                continue
            a = consumer.lora_A[adapter].weight  # [rank, in]
            b = consumer.lora_B[adapter].weight  # [out, rank]
            out = out + consumer.scaling[adapter] * ((r @ b.to(r.dtype)) @ a.to(r.dtype))
    return out


def gram_norm_features(gamma: torch.Tensor, consumer: Any, u: torch.Tensor) -> torch.Tensor:
    """``φ = G u`` with the Gram matrix ``G = diag(γ) W_eff W_effᵀ diag(γ)`` (``W_eff`` as ``[in, out]``).

    ``M = diag(γ) W_eff`` is the map from the normalised input to the consumer's output. ``G = M Mᵀ`` is
    unchanged by (i) the norm fold ``γ ← s⊙γ, W ← diag(s)^-1 W`` (M itself is unchanged) and (ii) every
    orthogonal transform Q of the consumer's *output* side, ``M ← M Q`` (``M Q Qᵀ Mᵀ = M Mᵀ``): permuting
    MLP hidden units (with the down projection compensated), permuting heads, rotating each head's
    values (undone in the output projection) or its queries and keys jointly. Read along a secret unit
    direction ``u`` of the input space, one scalar per channel: ``φ = γ ⊙ (W_eff (W_effᵀ (γ ⊙ u)))``, two
    mat-vecs. ``u`` may be a ``[D, m]`` matrix of directions: then ``vec(G U)`` (``m·D`` values, direction by
    direction). Not invariant to a rotation of the residual stream itself (``M ← R M`` gives ``R G Rᵀ``;
    :mod:`fedguard.watermark.alignment` undoes it).
    """
    w = weight_in_out(consumer).to(u.dtype)  # [in, out], LoRA deltas included
    g = gamma.to(u.dtype)
    if u.ndim == 2:  # several directions [D, m]: vec(G U), direction by direction
        g2 = g[:, None]
        return (g2 * (w @ (w.t() @ (g2 * u)))).t().reshape(-1)
    return g * (w @ (w.t() @ (g * u)))


def invariant_norm_features(gamma: torch.Tensor, consumer: torch.nn.Module, r: torch.Tensor) -> torch.Tensor:
    """``φ = γ ⊙ (W_eff r)`` with ``W_eff`` as ``[in, out]``: the norm block's invariant feature."""
    resp = effective_response(consumer, r)
    return gamma.to(r.dtype) * resp.to(r.dtype)


@torch.no_grad()
def reparametrise_norm(
    norm: Any, consumers: Sequence[Any], scales: torch.Tensor
) -> None:
    """Apply the function-preserving transform ``γ ← s⊙γ, β ← s⊙β, W_c ← W_c diag(s)^-1`` in place.

    ``consumers`` must be *all* the linear layers that read the norm's output (see :data:`CONSUMERS`);
    a LoRA layer is compensated in its base weight and in ``lora_A`` (the side that reads the input).
    This is the attacker's move that :func:`invariant_norm_features` is built to survive.
    """
    gamma = norm.weight
    if scales.shape != gamma.shape or bool((scales == 0).any()):
        raise ConfigError(f"scales must have shape {tuple(gamma.shape)} and no zeros")
    s = scales.to(gamma.dtype)
    gamma.mul_(s)
    bias = getattr(norm, "bias", None)
    if bias is not None:
        bias.mul_(s)
    for module in consumers:
        base = base_linear(module)
        if _is_conv1d(base):
            base.weight.div_(s[:, None])
        else:
            base.weight.div_(s[None, :])
        if is_lora(module):
            for adapter in module.lora_A:
                module.lora_A[adapter].weight.div_(s[None, :])
