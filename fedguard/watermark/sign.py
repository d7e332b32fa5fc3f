"""FedIPR's feature-based sign watermark (Li, Fan, Gu, Li, Yang, TPAMI 2022), for adapters and norms.

Each client k owns a key: signature bits ``b ∈ {±1}^N`` and a secret projection E (see
:mod:`fedguard.watermark.keys`). During local training it adds the hinge regulariser

    L_wm(θ) = α · Σ_j relu(γ0 − b_j · z_j),      z = Eᵀ φ(θ) / s − z₀

to its task loss, and verification extracts ``sign(z)`` and counts agreements with b
(:mod:`fedguard.watermark.verify`). φ(θ) is the target parameters themselves (``mode="plain"``, FedIPR)
or their re-parametrisation-invariant features (``mode="invariant"``, :mod:`~fedguard.watermark.invariant`).
Two refinements over FedIPR, both stated in the key:

* ``s`` is the RMS of the block's features at key generation, so the margin γ0 is in units of the
  parameters' own scale (γ0 = 1.0: a bit is "safe" once its projection exceeds that scale);
* ``z₀ = Eᵀφ(θ₀)/s`` for the starting model θ₀ (``reference="initial"``, the default): bits are the signs
  of the *change* from the public starting point. FedIPR's ``z₀ = 0`` asks norm scales that all start at
  1.0 to move by O(1) of their value to flip half of the bits; relative to θ₀ each bit needs a move of
  only γ0, which is what keeps the task metric within 1% (docs/watermark.md). An unchanged θ₀ extracts
  all-zero projections, which count as disagreements: it never verifies.

Defaults (justified in docs/watermark.md): targets = norm scales, ``mode="invariant"``, N = 64 bits per
client (all-matched p = 5e-20; a verdict at 1e-6 survives 13 flipped bits: 51/64 gives p = 9.4e-7), γ0 = 1.0, α = 3e-3 (the hinge
is zero once every bit clears its margin, so α only sets how hard violated bits are pulled).

Two lines in any torch loop::

    wm = SignWatermark(key, model)             # binds the key: KeyMismatchError if targets differ
    loss = task_loss + wm.loss()               # every step
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from fedguard.errors import ConfigError, KeyMismatchError
from fedguard.rng import SecureRNG, random_seed
from fedguard.watermark.capacity import CapacityError, plan_capacity
from fedguard.watermark.invariant import base_linear, gram_norm_features, invariant_norm_features, output_dim
from fedguard.watermark.keys import (
    Mode,
    Reference,
    SignKey,
    TargetBlock,
    direction,
    directions,
    projection_matrix,
)
from fedguard.watermark.targets import (
    BlockKind,
    MissingTargetError,
    block_parameters,
    discover,
    resolve_module,
)
from fedguard.watermark.verify import (
    DEFAULT_SIGNIFICANCE,
    TESTS,
    BlockAgreement,
    Detection,
    detection,
    sign_flip_p_value,
)

ERASURE_TOLERANCE = 1e-6
"""Projections with ``|z_j| ≤`` this (in units of the block's scale) count as erased, i.e. not matched."""


@dataclass(slots=True)
class _Bound:
    block: TargetBlock
    params: list[torch.Tensor]
    consumer: Any
    projection: torch.Tensor  # [D, N] float64 on CPU
    direction: torch.Tensor | None  # [out] float64
    bits: torch.Tensor  # [N] float64 of ±1
    offset: torch.Tensor  # [N] float64


class SignWatermark:
    """A sign-watermark key bound to a model: regulariser, extraction and detection.

    Binding checks that every target block of the key exists in ``model`` with the key's shapes (and, for
    invariant blocks, that the consumer layer exists with the key's shape); otherwise it raises
    :class:`~fedguard.errors.KeyMismatchError` (:class:`MissingTargetError` for absent modules) naming
    the first difference. The model's parameters are read afresh at every call, so the same object
    follows the model through training, ``load_vector`` and FedAvg.
    """

    def __init__(self, key: SignKey, model: torch.nn.Module, *, align_to: torch.nn.Module | None = None) -> None:
        """``align_to``: the public base model; for ``invariant``/``gram`` keys the features are then read in
        the base's residual basis (:func:`fedguard.watermark.alignment.residual_alignment`: Procrustes on the
        token embeddings), which undoes a rotation of the residual stream. The rotation is estimated once,
        here: bind again after changing the model's embeddings."""
        if not isinstance(key, SignKey):
            raise ConfigError(f"SignWatermark needs a SignKey, got {type(key).__name__}")
        self.key = key
        self._align: torch.Tensor | None = None
        if align_to is not None and key.mode in ("invariant", "gram"):
            from fedguard.watermark.alignment import residual_alignment

            rot = residual_alignment(model, align_to)
            self._align = None if torch.equal(rot, torch.eye(rot.shape[0], dtype=rot.dtype)) else rot
        signature = key.signature().astype(np.float64)
        bound = []
        for i, (block, sl) in enumerate(zip(key.blocks, key.block_bit_slices(), strict=True)):
            params = block_parameters(model, block)
            consumer = None
            r = None
            if key.mode in ("invariant", "gram"):
                if block.kind != "norm" or block.consumer is None or block.consumer_shape is None:
                    raise KeyMismatchError(f"invariant key block {block.module!r} has no consumer layer")
                consumer = resolve_module(model, block.consumer)
                if consumer is None:
                    raise MissingTargetError(f"the key's consumer layer {block.consumer!r} is not in the model")
                got = tuple(int(d) for d in base_linear(consumer).weight.shape)  # consumer: Any
                if got != block.consumer_shape:
                    raise KeyMismatchError(f"consumer layer {block.consumer!r} has weight shape {got} in the "
                                           f"model but {block.consumer_shape} in the key")
                # invariant: r in the consumer's output space; gram: u in its input (= the norm's) space
                if key.mode == "invariant":
                    r = torch.tensor(direction(key.seed, i, output_dim(consumer)))
                elif block.directions == 1:
                    r = torch.tensor(direction(key.seed, i, block.shapes[0][0]))
                else:  # [D, m]: the Gram matrix read along m secret directions
                    r = torch.tensor(directions(key.seed, i, block.shapes[0][0], block.directions))
            dim = self._dim(block)
            e = torch.tensor(projection_matrix(key.seed, i, dim, block.bits))
            bound.append(_Bound(block, params, consumer, e, r, torch.from_numpy(signature[sl].copy()),
                                torch.tensor(block.offset, dtype=torch.float64)))
        self._bound = bound
        self._cache: dict[tuple[torch.device, torch.dtype], list[tuple[torch.Tensor, ...]]] = {}
        self._bits: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        # Fast path: invariant blocks whose consumers have the same layout are computed together with
        # batched matmuls (a few large ops instead of many small ones per block).
        self._groups: list[tuple[tuple[Any, ...], list[int]]] = []
        if key.mode == "invariant":
            by_sig: dict[tuple[Any, ...], list[int]] = {}
            for i, b in enumerate(bound):
                by_sig.setdefault(self._signature(b), []).append(i)
            self._groups = [] if any(sig[0] == "unbatched" for sig in by_sig) else list(by_sig.items())
            order = [i for _, idx in self._groups for i in idx] or list(range(len(bound)))
            starts = np.concatenate([[0], np.cumsum([bound[i].block.bits for i in order])])
            pos = {blk: starts[k] for k, blk in enumerate(order)}
            perm = np.concatenate([np.arange(pos[i], pos[i] + bound[i].block.bits) for i in range(len(bound))])
            self._perm = torch.from_numpy(perm)
        self._group_cache: dict[tuple[torch.device, torch.dtype], list[tuple[torch.Tensor, ...]]] = {}
        self._response_cache: dict[tuple[Any, ...], tuple[tuple[tuple[Any, int, int], ...], torch.Tensor]] = {}
        self._merged = any(bool(getattr(b.consumer, "merged", False)) for b in bound)

    @staticmethod
    def _signature(b: _Bound) -> tuple[Any, ...]:
        """What must agree for blocks to be batched: shapes, bits, consumer kind and LoRA adapters."""
        consumer = b.consumer
        base = base_linear(consumer)
        lora: tuple[Any, ...] = ()
        if hasattr(consumer, "lora_A") and not getattr(consumer, "merged", False):
            if any(getattr(consumer, "use_dora", {}).get(a, False) for a in consumer.active_adapters):
                return ("unbatched", id(b))
            lora = tuple((a, tuple(consumer.lora_A[a].weight.shape), tuple(consumer.lora_B[a].weight.shape),
                          float(consumer.scaling[a])) for a in consumer.active_adapters if a in consumer.lora_A)
        return (type(base).__name__, tuple(base.weight.shape), tuple(b.params[0].shape), b.block.bits, lora)

    def _grouped(self, dtype: torch.dtype) -> torch.Tensor | None:
        """``z`` of all invariant blocks through batched matmuls, or None if a LoRA consumer was merged or
        unmerged since binding, in which case the per-block path is used. (Bind again after switching the
        active adapter.)"""
        if self._align is not None or not self._groups or any(bool(getattr(b.consumer, "merged", False)) for b in self._bound) != self._merged:
            return None
        device = self._bound[0].params[0].device
        ck = (device, dtype)
        if ck not in self._group_cache:
            per_block = self._tensors(device, dtype)
            self._group_cache[ck] = [
                (torch.stack([per_block[i][0] for i in idx]), torch.stack([per_block[i][1] for i in idx]),
                 torch.stack([per_block[i][2] for i in idx]))
                for _, idx in self._groups
            ]
        outs = []
        for (sig, idx), (e, r, offset) in zip(self._groups, self._group_cache[ck], strict=True):
            blocks = [self._bound[i] for i in idx]
            gamma = torch.stack([b.params[0] for b in blocks]).to(dtype)  # [G, D]
            consumers = [b.consumer for b in blocks]
            resp = self._base_response(sig, [base_linear(c).weight for c in consumers], r, ck)
            for adapter, _, _, scaling in sig[4]:
                a = torch.stack([c.lora_A[adapter].weight for c in consumers]).to(dtype)  # [G, rank, in]
                bm = torch.stack([c.lora_B[adapter].weight for c in consumers]).to(dtype)  # [G, out, rank]
                resp = resp + scaling * torch.bmm(torch.bmm(r.unsqueeze(1), bm), a).squeeze(1)
            z = torch.bmm((gamma * resp).unsqueeze(1), e).squeeze(1) - offset  # [G, N]
            outs.append(z.reshape(-1))
        return torch.cat(outs)[self._perm.to(device)]

    def _base_response(self, sig: tuple[Any, ...], weights: list[torch.Tensor], r: torch.Tensor,
                       ck: tuple[torch.device, torch.dtype]) -> torch.Tensor:
        """``rᵀW₀`` of a group's consumer base weights, ``[G, in]``; cached while they are frozen.

        Under LoRA the base weights do not train, and recomputing this product every step (stacking and
        casting every consumer matrix: ~150 MB copied per step on SmolLM2-135M) was most of the
        regulariser's cost. The cache holds weak references to the weights with their storage pointers and
        in-place version counters, so a replaced parameter, a ``copy_`` or a re-parametrisation of the base
        weights invalidates it; weights that require grad are never cached (their product needs a gradient).
        Writes through ``.data`` (e.g. ``weight.data += delta``) bypass the version counter: call
        :meth:`refresh` after them. (Merging a LoRA adapter into the base weights is noticed separately: it
        switches extraction to the per-block path.)
        """
        slot = (sig, ck)
        hit = self._response_cache.get(slot)
        if hit is not None and len(hit[0]) == len(weights) and all(
            ref() is w and version == w._version and w.data_ptr() == ptr
            for (ref, version, ptr), w in zip(hit[0], weights, strict=True)
        ):
            return hit[1]
        w = torch.stack(weights).to(ck[1])
        if sig[0] == "Conv1D":  # [G, in, out]
            resp = torch.bmm(w, r.unsqueeze(-1)).squeeze(-1)
        else:  # nn.Linear: [G, out, in]
            resp = torch.bmm(r.unsqueeze(1), w).squeeze(1)
        if not any(w.requires_grad for w in weights):
            stamp = tuple((weakref.ref(w), w._version, w.data_ptr()) for w in weights)
            self._response_cache[slot] = (stamp, resp.detach())
        return resp

    def refresh(self) -> None:
        """Forget the cached products of frozen weights (after writing to them through ``.data``)."""
        self._response_cache.clear()

    @staticmethod
    def _dim(block: TargetBlock) -> int:
        return block.feature_dim

    def _tensors(self, device: torch.device, dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
        """Per block ``(E_i / s_i, r_i, z₀_i)`` on ``device`` in ``dtype`` (cached)."""
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = [
                (
                    (b.projection / b.block.scale).to(device=device, dtype=dtype),
                    b.direction.to(device=device, dtype=dtype) if b.direction is not None else torch.empty(0),
                    b.offset.to(device=device, dtype=dtype),
                )
                for b in self._bound
            ]
            self._bits[key] = torch.cat([b.bits for b in self._bound]).to(device=device, dtype=dtype)
        return self._cache[key]

    def _features(self, b: _Bound, r: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.key.mode in ("invariant", "gram"):
            if b.consumer is None:  # __init__ binds a consumer to every invariant block
                raise KeyMismatchError(f"invariant watermark block {b.block.module!r} has no consuming layer")
            rot = None
            if self._align is not None and self._align.shape[0] == b.params[0].shape[0]:
                rot = self._align.to(device=r.device, dtype=dtype)
            if self.key.mode == "gram":
                if rot is None:
                    return gram_norm_features(b.params[0], b.consumer, r)
                read = gram_norm_features(b.params[0], b.consumer, rot @ r)  # G u = Rᵀ G_s (R u)
                if r.ndim == 2:  # vec over m directions: Rᵀ applied to each
                    return (read.reshape(r.shape[1], r.shape[0]) @ rot).reshape(-1)
                return rot.t() @ read
            phi = invariant_norm_features(b.params[0], b.consumer, r)
            return phi if rot is None else rot.t() @ phi
        return torch.cat([p.to(dtype).reshape(-1) for p in b.params])

    def _projections(self, dtype: torch.dtype) -> torch.Tensor:
        grouped = self._grouped(dtype)
        if grouped is not None:
            return grouped
        device = self._bound[0].params[0].device
        return torch.cat([
            self._features(b, r, dtype) @ e - offset
            for b, (e, r, offset) in zip(self._bound, self._tensors(device, dtype), strict=True)
        ])

    def projections(self) -> torch.Tensor:
        """``z`` (float32, differentiable): one value per signature bit."""
        return self._projections(torch.float32)

    def loss(self) -> torch.Tensor:
        """``α · Σ_j relu(γ0 − b_j z_j)``: add it to the task loss."""
        z = self._projections(torch.float32)
        bits = self._bits[(z.device, torch.float32)]
        return self.key.alpha * torch.relu(self.key.gamma0 - bits * z).sum()

    @torch.no_grad()
    def extract(self) -> np.ndarray:
        """``z`` in float64 (no gradient): its signs are the extracted bits."""
        return self._projections(torch.float64).cpu().numpy()

    def _agreements(self) -> np.ndarray:
        """``b_j z_j`` per bit (float64): positive where the extracted sign agrees with the key."""
        return self.key.signature().astype(np.float64) * self.extract()

    def matches(self) -> np.ndarray:
        """Boolean per bit: extracted sign agrees with the key (erased bits count as disagreeing)."""
        return self._agreements() > ERASURE_TOLERANCE

    def detect(self, significance: float = DEFAULT_SIGNIFICANCE, *, test: str = "binomial") -> Detection:
        """Verify: count agreements, p-value under fair coins, verdict at ``significance``. ``test``:
        ``"binomial"`` (the exact sign count) or ``"sign-flip"`` (the exact randomisation test of
        ``Σ b_j z_j``, :func:`~fedguard.watermark.verify.sign_flip_p_value`); fix it before looking."""
        if test not in TESTS:
            raise ConfigError(f"unknown test {test!r}: choose one of {', '.join(TESTS)}")
        agreements = self._agreements()
        ok = agreements > ERASURE_TOLERANCE
        blocks = tuple(
            BlockAgreement(b.block.label, b.block.bits, int(ok[sl].sum()))
            for b, sl in zip(self._bound, self.key.block_bit_slices(), strict=True)
        )
        found = detection(key_id=self.key.key_id, owner=self.key.owner, scheme="sign", bits=len(ok),
                          matched=int(ok.sum()), significance=significance, blocks=blocks)
        if test == "binomial":
            return found
        return replace(found, p_value=sign_flip_p_value(agreements, erased=ERASURE_TOLERANCE), test=test)


def make_sign_key(
    model: torch.nn.Module,
    *,
    bits: int = 64,
    target: BlockKind = "norm",
    modules: tuple[str, ...] | list[str] = (),
    mode: Mode | None = None,
    reference: Reference = "initial",
    gamma0: float = 1.0,
    alpha: float = 3e-3,
    owner: str = "",
    n_clients: int = 1,
    significance: float = DEFAULT_SIGNIFICANCE,
    seed: bytes | None = None,
    rng: SecureRNG | None = None,
    like: SignKey | None = None,
    directions: int = 1,
) -> SignKey:
    """Generate a client's sign-watermark key for ``model`` (the public starting point of the run).

    The seed is ``seed`` if given, else 32 bytes from ``rng``, else from ``os.urandom``. ``n_clients`` is
    the number K of clients that will embed into the same targets: the capacity planner refuses a plan
    with ``K·N`` above the number of target values (:class:`~fedguard.watermark.capacity.CapacityError`).
    ``mode`` defaults to ``"invariant"`` for norm targets and ``"plain"`` otherwise.

    ``like``: reuse the targets, bit allocation, mode, reference, γ0 and α of an existing key (already
    checked against capacity) and draw only a new seed — how many keys for the same model are made quickly.

    ``directions`` (gram mode): read each block's Gram matrix along that many secret directions, so a block
    of D channels offers ``m·D`` feature values instead of D (at most ``(D+1)//2`` directions: G is
    symmetric, ``D(D+1)/2`` free values). More feature values than bits keep the bits apart from an
    overwriting attacker's (docs/watermark.md).
    """
    if seed is None:
        seed = rng.bytes(32) if rng is not None else random_seed()
    if like is not None:
        draft = SignKey(seed=seed, blocks=tuple(replace(b, scale=1.0, offset=(0.0,) * b.bits) for b in like.blocks),
                        mode=like.mode, reference=like.reference, gamma0=like.gamma0, alpha=like.alpha,
                        owner=owner)
    else:
        mode = mode or ("invariant" if target == "norm" else "plain")
        if directions != 1 and (mode != "gram" or target != "norm" or isinstance(directions, bool)
                                or not isinstance(directions, int) or directions < 1):
            raise ConfigError(f"directions must be an int >= 1, and > 1 only for gram norm keys; got {directions!r} "
                              f"with mode {mode!r}, target {target!r}")
        candidates = discover(model, target, mode=mode, modules=modules)
        if directions > 1:
            too_many = [c.module for c in candidates if directions > (c.dim + 1) // 2]
            if too_many:
                raise ConfigError(f"{directions} directions exceed (D+1)//2 for {too_many[:3]}: the Gram matrix "
                                  f"has only D(D+1)/2 free values")
            candidates = [replace(c, dim=c.dim * directions, directions=directions) for c in candidates]
        adapted = [c for c in candidates if c.adapted]
        plan = None
        if not modules and adapted and len(adapted) < len(candidates):
            # Norm blocks whose consumer carries the adapter first: their feature moves at the adapter's pace,
            # while a block read through a frozen consumer moves only with its norm scale (~lr per step), too
            # slowly for a short run to reach a claim. All blocks if those lack the capacity.
            try:
                plan = plan_capacity([c.dim for c in adapted], bits, n_clients, significance=significance,
                                     block_names=[c.module for c in adapted])
                candidates = adapted
            except CapacityError:
                plan = None
        if plan is None:
            plan = plan_capacity([c.dim for c in candidates], bits, n_clients, significance=significance,
                                 block_names=[c.module for c in candidates])
        draft = SignKey(
            seed=seed,
            blocks=tuple(c.block(n) for c, n in zip(candidates, plan.block_bits, strict=True) if n > 0),
            mode=mode, reference=reference, gamma0=gamma0, alpha=alpha, owner=owner,
        )
    return calibrate(draft, model)


def calibrate(key: SignKey, reference_model: torch.nn.Module) -> SignKey:
    """``key`` with each block's scale and offset computed on ``reference_model`` (the public θ₀).

    ``s_i = RMS(φ_i(θ₀))`` (1.0 when it is zero) and ``z₀_i = E_iᵀ φ_i(θ₀) / s_i`` (zeros for
    ``reference="zero"``). The audit calls this on the base model to *recompute* what a key file states
    (:func:`fedguard.watermark.calibration.check_calibration`): offsets are not free fields a claimant may
    choose, since with chosen offsets ``z = Eᵀφ/s − z₀`` takes any sign pattern on any model.
    """
    probe = SignWatermark(key, reference_model)
    blocks = []
    with torch.no_grad():
        for i, b in enumerate(probe._bound):
            r = b.direction if b.direction is not None else torch.empty(0, dtype=torch.float64)
            phi = probe._features(b, r, torch.float64)
            rms = float(phi.pow(2).mean().sqrt())
            scale = rms if rms > 0 else 1.0
            if key.reference == "initial":
                offset = tuple(float(v) for v in (phi @ b.projection / scale))
            else:
                offset = (0.0,) * b.block.bits
            blocks.append(replace(key.blocks[i], scale=scale, offset=offset))
    return key.with_blocks(blocks)
