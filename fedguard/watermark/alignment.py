"""Undo a rotation of the residual stream before reading a watermark: orthogonal Procrustes on the embeddings.

The attack (QuaRot, Ashkboos et al. 2024; SliceGPT, Ashkboos et al. 2024). In a pre-norm transformer
with RMSNorm, fold every norm scale into the linear layers that read it (γ ← 1, ``W ← W diag(γ)``); then
an RMSNorm with unit scale commutes with every orthogonal ``Q`` (``rms(hQ) = rms(h)``), so rotating the
whole residual basis — token embeddings ``E ← EQ``, every matrix that reads the residual ``W ← WQ``,
every matrix that writes to it ``W ← QᵀW`` — leaves the function unchanged. The gram feature
``G = M Mᵀ`` (``M = diag(γ) W_effᵀ``, :func:`fedguard.watermark.invariant.gram_norm_features`) becomes
``QᵀGQ`` and the bits read along the secret direction ``u`` become coin flips (16/32 on Llama in the issue).

The defence. The base model is public and a fine-tuned model keeps its token embeddings close to the
base's (LoRA does not train them at all), so the verifier estimates the rotation from them:

    R = argmin_{RᵀR = I} ‖E_suspect R − E_base‖_F = U Vᵀ,   U Σ Vᵀ = svd(E_suspectᵀ E_base)

(the orthogonal Procrustes problem, Schönemann 1966). If ``E_suspect = E_base Q`` then ``R = Qᵀ`` for a full-column-rank
``E_base`` (up to the ~1e-6 relative bias of the tie-break below; embeddings equal to the base's give ``R = I``
without a decomposition),
and the suspect's features are read in the base's basis: ``G u = Rᵀ G_s (R u)`` (gram) and ``φ = Rᵀ φ_s``
(invariant). The null distribution of the test is untouched: R depends on the model and the public base,
never on the key, so extracted bits are still independent of a key that was not embedded.

What it does not cover (docs/watermark.md): an attacker who also perturbs the embeddings far from the
base's pays in task loss for it but degrades the estimate of R; a rotation of a residual stream whose
norm subtracts the mean (GPT-2's LayerNorm) must keep the all-ones direction, which Procrustes recovers
like any other (:func:`attacks.watermark.transforms.rotate_residual` implements both families).
"""

from __future__ import annotations

import torch

from fedguard.errors import KeyMismatchError

EQUAL_TOLERANCE = 1e-6
"""Embeddings whose RMS difference from the base's is at most this fraction of the base's RMS are taken as
unrotated (R = I exactly): LoRA runs never train them, and a rotation moves them by O(1)."""

TIE_BREAK = 1e-6
"""λ² (relative to ``vocab · mean(E_base²)``) in ``svd(E_sᵀE_b + λ²I)``: negligible when the embeddings
span the hidden space, and it picks the identity on directions they leave undetermined (toy models with a
vocabulary smaller than the hidden size; real vocabularies are far larger)."""


def input_embeddings(model: torch.nn.Module) -> torch.Tensor:
    """The token-embedding matrix ``[vocab, hidden]`` of a transformers model (or a peft wrapper)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise KeyMismatchError(f"{type(model).__name__} has no token-embedding matrix to align the residual "
                               f"stream with")
    return weight


def residual_anchors(model: torch.nn.Module) -> torch.Tensor:
    """Rows that live in the residual basis: the token embeddings, and learned absolute position embeddings
    where the model has them (GPT-2's ``wpe``; they rotate with the residual stream too and help pin ``R``
    down when the vocabulary is smaller than the hidden size)."""
    from fedguard.watermark.targets import base_model

    rows = [input_embeddings(model)]
    wpe = getattr(getattr(getattr(base_model(model), "transformer", None), "wpe", None), "weight", None)
    if isinstance(wpe, torch.Tensor) and wpe.ndim == 2 and wpe.shape[1] == rows[0].shape[1]:
        rows.append(wpe)
    return torch.cat([r.detach().to("cpu", torch.float64) for r in rows])


@torch.no_grad()
def residual_alignment(model: torch.nn.Module, base: torch.nn.Module) -> torch.Tensor:
    """``R`` (float64, ``[hidden, hidden]``, orthogonal) with ``E_model R ≈ E_base`` over the residual anchors
    (:func:`residual_anchors`): see the module docstring."""
    suspect = residual_anchors(model)
    reference = residual_anchors(base)
    if suspect.shape != reference.shape:
        raise KeyMismatchError(f"cannot align the residual stream: the model's token embeddings (with position "
                               f"embeddings, if any) have shape "
                               f"{tuple(suspect.shape)}, the base model's {tuple(reference.shape)}")
    dim = suspect.shape[1]
    scale = float(reference.pow(2).mean())
    if float((suspect - reference).pow(2).mean()) <= EQUAL_TOLERANCE ** 2 * scale:
        return torch.eye(dim, dtype=torch.float64)  # embeddings as in the base: nothing rotated them
    # λ²I breaks ties toward the identity where the embeddings do not determine R (vocab < hidden)
    u, _, vh = torch.linalg.svd(suspect.t() @ reference + TIE_BREAK * scale * suspect.shape[0] *
                                torch.eye(dim, dtype=torch.float64))
    return u @ vh
