"""Where a sign watermark lives: discover target blocks in a model and resolve a key's blocks in it.

Three kinds of target (FATE-LLM §3.1, Figure 4: "adaptors or prompts"; FATE-LLM 1.3 used LayerNorm):

* ``norm`` — the scale γ of LayerNorm (GPT-2) or RMSNorm (Llama family) of chosen blocks. They are
  frozen in a LoRA run; :func:`prepare_norm_targets` makes them trainable beside the adapter with
  :func:`fedguard.params.mark_trainable`, so they travel in the federated update (``D = hidden`` values
  per norm). The default target: few values, present in every transformer, and FedIPR's original choice.
* ``lora`` — a LoRA layer's A and B matrices (``r·(in+out)`` values per layer).
* ``prompt`` — prefix / prompt-tuning embeddings of a ``peft`` prompt-learning model.

Norm and LoRA blocks are named by their module path in the *base* model (``transformer.h.0.ln_1``), so a
key binds equally to a ``peft`` model and to the merged full model; a module wrapped by peft's
``modules_to_save`` resolves to its trained copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedguard.errors import ConfigError, KeyMismatchError
from fedguard.params import mark_trainable
from fedguard.watermark.invariant import base_linear, consumer_paths, is_lora, output_dim
from fedguard.watermark.keys import BlockKind, Mode, TargetBlock

TARGET_KINDS: tuple[BlockKind, ...] = ("norm", "lora", "prompt")


class MissingTargetError(KeyMismatchError):
    """The model has no module of the kind the watermark needs (e.g. no LoRA layer for ``lora`` targets),
    or lacks a module a key names."""


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a ``peft`` wrapper (or ``model`` itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _unwrap(module: Any) -> Any:
    """The trained copy inside peft's ``ModulesToSaveWrapper``; otherwise the module itself."""
    if type(module).__name__ == "ModulesToSaveWrapper":
        active = getattr(module, "active_adapter", None)
        active = active[0] if isinstance(active, list | tuple) else active
        copies = module.modules_to_save
        return copies[active] if active in copies else module.original_module
    return module


def resolve_module(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    """The module at ``path`` in the base model, else in ``model`` itself (prompt encoders); or None."""
    for root in (base_model(model), model):
        try:
            return _unwrap(root.get_submodule(path))
        except AttributeError:
            continue
    return None


def _is_norm(module: torch.nn.Module) -> bool:
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    return ("LayerNorm" in name or "RMSNorm" in name) and isinstance(weight, torch.Tensor) and weight.ndim == 1


def _inside_wrapper(path: str) -> bool:
    return ".original_module" in path or ".modules_to_save." in path or path.endswith(".modules_to_save")


@dataclass(frozen=True, slots=True)
class Candidate:
    """A target block found in a model, before bits are allocated."""

    kind: BlockKind
    module: str
    params: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dim: int
    consumer: str | None = None
    consumer_shape: tuple[int, ...] | None = None
    adapted: bool = False
    """For an invariant norm block: whether its consumer carries a LoRA adapter (so its feature moves with
    the adapter, not only with the slowly trained norm scale)."""
    directions: int = 1

    def block(self, bits: int, scale: float = 1.0, offset: tuple[float, ...] = ()) -> TargetBlock:
        return TargetBlock(self.kind, self.module, self.params, self.shapes, bits, scale,
                           offset or (0.0,) * bits, self.consumer, self.consumer_shape, self.directions)


def norm_modules(model: torch.nn.Module) -> list[str]:
    """Paths (in the base model) of every LayerNorm / RMSNorm with a 1-D scale."""
    out = []
    for path, module in base_model(model).named_modules():
        if path and not _inside_wrapper(path) and _is_norm(_unwrap(module)):
            out.append(path)
    return out


def discover(
    model: torch.nn.Module, kind: BlockKind = "norm", *, mode: Mode = "invariant", modules: Sequence[str] = ()
) -> list[Candidate]:
    """The candidate blocks of ``kind`` in ``model`` (optionally only those whose path is in ``modules``).

    In ``invariant`` mode a norm block needs a known consumer (see
    :data:`fedguard.watermark.invariant.CONSUMERS`); norms without one (GPT-2's ``ln_f``, which feeds the
    tied LM head) are left out. Raises :class:`MissingTargetError` when nothing is found.
    """
    if kind not in TARGET_KINDS:
        raise ConfigError(f"target kind must be one of {TARGET_KINDS}, got {kind!r}")
    if mode not in ("plain", "invariant", "gram"):
        raise ConfigError(f"mode must be 'plain', 'invariant' or 'gram', got {mode!r}")
    if mode in ("invariant", "gram") and kind != "norm":
        raise ConfigError(f"invariant extraction is implemented for norm targets only, not {kind!r}; "
                          "use mode='plain'")
    wanted = set(modules)
    found: list[Candidate] = []
    base = base_model(model)
    if kind == "norm":
        for path in norm_modules(model):
            gamma: Any = _unwrap(base.get_submodule(path)).weight
            shape = tuple(int(d) for d in gamma.shape)
            consumer = consumer_shape = None
            adapted = False
            if mode in ("invariant", "gram"):
                # the first consumer that carries a LoRA adapter, else the first consumer: every consumer of
                # the norm gives an invariant feature, and an adapted one moves at the adapter's pace
                mods = [(p, m) for p in consumer_paths(path) if (m := resolve_module(model, p)) is not None]
                if not mods:
                    continue
                consumer, mod = next(((p, m) for p, m in mods if is_lora(m)), mods[0])
                adapted = is_lora(mod)
                consumer_shape = tuple(int(d) for d in base_linear(mod).weight.shape)
                output_dim(mod)  # raises for an unsupported consumer type
            found.append(Candidate("norm", path, ("weight",), (shape,), shape[0], consumer, consumer_shape, adapted))
    elif kind == "lora":
        for path, lmod in base.named_modules():
            module: Any = lmod
            if not (hasattr(module, "lora_A") and hasattr(module, "get_base_layer")):
                continue
            for adapter in getattr(module, "active_adapters", ()):
                if adapter not in module.lora_A:
                    continue
                a = module.lora_A[adapter].weight
                b = module.lora_B[adapter].weight
                shapes = (tuple(int(d) for d in a.shape), tuple(int(d) for d in b.shape))
                found.append(Candidate("lora", path, (f"lora_A.{adapter}.weight", f"lora_B.{adapter}.weight"),
                                       shapes, a.numel() + b.numel()))
    else:
        for name, param in model.named_parameters():
            if name.startswith("prompt_encoder.") and param.requires_grad:
                path, _, leaf = name.rpartition(".")
                found.append(Candidate("prompt", path, (leaf,), (tuple(int(d) for d in param.shape),),
                                       param.numel()))
    if wanted:
        unknown = wanted - {c.module for c in found}
        if unknown:
            raise MissingTargetError(f"no {kind} target module(s) {sorted(unknown)} in the model "
                                     f"(found: {[c.module for c in found][:8]})")
        found = [c for c in found if c.module in wanted]
    if not found:
        hint = " with a known consumer linear layer" if kind == "norm" and mode != "plain" else ""
        raise MissingTargetError(f"the model ({type(base).__name__}) has no {kind} target modules{hint}")
    return found


def prepare_norm_targets(model: torch.nn.Module, modules: Sequence[str] | None = None) -> list[str]:
    """Make the norm scales trainable beside the adapter (``fedguard.params.mark_trainable``), so that
    they are optimised and travel in the federated update. Returns the parameter names marked."""
    paths = list(modules) if modules is not None else norm_modules(model)
    if not paths:
        raise MissingTargetError(f"the model ({type(base_model(model)).__name__}) has no norm layers")
    names = {id(p): n for n, p in model.named_parameters()}
    patterns = []
    for path in paths:
        module = resolve_module(model, path)
        if module is None:
            raise MissingTargetError(f"no norm module {path!r} in the model")
        patterns.append(names[id(module.weight)])
    return mark_trainable(model, patterns)


def block_parameters(model: torch.nn.Module, block: TargetBlock) -> list[torch.Tensor]:
    """The parameters of ``block`` in ``model``, after checking the module exists and shapes match."""
    module = resolve_module(model, block.module)
    if module is None:
        raise MissingTargetError(f"the key's target module {block.module!r} ({block.kind}) is not in the model")
    out: list[torch.Tensor] = []
    for rel, shape in zip(block.params, block.shapes, strict=True):
        try:
            param = module.get_parameter(rel)
        except AttributeError as err:
            raise KeyMismatchError(f"the key's target parameter {block.module}.{rel} is not in the model") from err
        got = tuple(int(d) for d in param.shape)
        if got != shape:
            raise KeyMismatchError(f"target parameter {block.module}.{rel} has shape {got} in the model but "
                                   f"{shape} in the key")
        out.append(param)
    return out
