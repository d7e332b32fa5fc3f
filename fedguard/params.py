"""Which parameters travel, and how they become one flat float32 vector.

In parameter-efficient federated fine-tuning (FATE-LLM §3.1, Figure 3(a)) only the trainable adapter
parameters leave a client: LoRA's A/B matrices, prefix/P-Tuning-v2 or prompt-tuning encoders, and
parameters a component marks trainable on purpose (e.g. the norm scales that carry a FedIPR watermark).

An :class:`AdapterLayout` records, in a fixed order, the name, shape and dtype of each travelling
parameter. ``flatten`` concatenates them into one float32 vector; ``load_vector`` writes such a vector
back. Every supported dtype (float32, float16, bfloat16) converts to float32 exactly, so
``load_vector(model, layout, flatten(model, layout))`` restores the parameters bit for bit.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
>>> _ = net[0].requires_grad_(False)
>>> layout = layout_of(net)
>>> layout.names, layout.size
(('1.weight', '1.bias'), 4)
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedguard.errors import ConfigError, KeyMismatchError

_SUPPORTED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in _SUPPORTED_DTYPES.items():
        if value == dtype:
            return name
    raise ConfigError(f"parameter dtype must be one of {sorted(_SUPPORTED_DTYPES)}, got {dtype}")


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """Name, shape and dtype of one travelling parameter."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class AdapterLayout:
    """The ordered list of parameters that make up a flat update vector."""

    specs: tuple[ParamSpec, ...]

    def __post_init__(self) -> None:
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ConfigError(f"layout names must be unique, got {dup!r} twice")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    @property
    def size(self) -> int:
        """Number of scalars in the flat vector."""
        return sum(s.numel for s in self.specs)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start offset of each parameter in the flat vector (length ``len(specs) + 1``)."""
        out = [0]
        for s in self.specs:
            out.append(out[-1] + s.numel)
        return tuple(out)

    def slice_of(self, name: str) -> slice:
        """Where parameter ``name`` lives in the flat vector."""
        offs = self.offsets
        for i, s in enumerate(self.specs):
            if s.name == name:
                return slice(offs[i], offs[i + 1])
        raise KeyMismatchError(f"parameter {name!r} is not in the layout")

    def to_json(self) -> str:
        """Canonical JSON (stable across runs and machines)."""
        return json.dumps(
            [[s.name, list(s.shape), s.dtype] for s in self.specs], separators=(",", ":")
        )

    @classmethod
    def from_json(cls, text: str) -> AdapterLayout:
        try:
            raw = json.loads(text)
            specs = tuple(
                ParamSpec(str(name), tuple(int(d) for d in shape), str(dtype)) for name, shape, dtype in raw
            )
        except (ValueError, TypeError) as err:
            raise ConfigError(f"not a valid layout JSON: {err}") from err
        for s in specs:
            if s.dtype not in _SUPPORTED_DTYPES or any(d < 0 for d in s.shape):
                raise ConfigError(f"invalid parameter spec in layout: {s}")
        return cls(specs)

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON: two parties agree on a layout iff fingerprints match."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.specs)


def _match(patterns: Sequence[str], names: Iterable[str]) -> dict[str, list[str]]:
    names = list(names)
    return {p: [n for n in names if n == p or fnmatch.fnmatchcase(n, p)] for p in patterns}


def select_parameters(
    model: torch.nn.Module, extra: Sequence[str] = (), *, trainable_only: bool = True
) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters that travel: those with ``requires_grad`` plus the ``extra`` ones.

    Works for any torch module, and so for ``peft`` models (LoRA, prefix / P-Tuning-v2, prompt tuning),
    whose frozen base weights have ``requires_grad=False``. ``extra`` holds exact parameter names or
    ``fnmatch`` patterns (``"*.ln_f.weight"``); a pattern that matches nothing raises
    :class:`KeyMismatchError`. Order follows ``model.named_parameters()``; shared (tied) parameters
    appear once.
    """
    named = list(model.named_parameters())
    matches = _match(extra, (n for n, _ in named))
    missing = [p for p, hits in matches.items() if not hits]
    if missing:
        raise KeyMismatchError(f"extra parameter pattern(s) match no parameter of the model: {missing}")
    wanted = {n for hits in matches.values() for n in hits}
    return [(n, p) for n, p in named if (p.requires_grad and trainable_only) or n in wanted]


def mark_trainable(model: torch.nn.Module, patterns: Sequence[str]) -> list[str]:
    """Set ``requires_grad=True`` on the parameters named by ``patterns`` (e.g. norm scales that will
    carry a watermark beside a LoRA adapter). Returns the names marked."""
    chosen = select_parameters(model, patterns, trainable_only=False)
    for _, param in chosen:
        param.requires_grad_(True)
    return [name for name, _ in chosen]


def layout_of(model: torch.nn.Module, extra: Sequence[str] = ()) -> AdapterLayout:
    """The :class:`AdapterLayout` of the travelling parameters of ``model`` (see :func:`select_parameters`)."""
    specs = tuple(
        ParamSpec(n, tuple(int(d) for d in p.shape), _dtype_name(p.dtype))
        for n, p in select_parameters(model, extra)
    )
    if not specs:
        raise ConfigError("the model has no trainable parameters and no extra parameters were named")
    return AdapterLayout(specs)


def _resolve(model: torch.nn.Module, layout: AdapterLayout) -> list[torch.nn.Parameter]:
    """The model's parameters in layout order, after checking names, shapes and dtypes."""
    params: Mapping[str, torch.nn.Parameter] = dict(model.named_parameters())
    out = []
    for spec in layout.specs:
        p = params.get(spec.name)
        if p is None:
            raise KeyMismatchError(f"layout parameter {spec.name!r} does not exist in the model")
        shape = tuple(int(d) for d in p.shape)
        if shape != spec.shape:
            raise KeyMismatchError(
                f"parameter {spec.name!r} has shape {shape} in the model but {spec.shape} in the layout"
            )
        dtype = _dtype_name(p.dtype)
        if dtype != spec.dtype:
            raise KeyMismatchError(
                f"parameter {spec.name!r} has dtype {dtype} in the model but {spec.dtype} in the layout"
            )
        out.append(p)
    return out


def check_layout(model: torch.nn.Module, layout: AdapterLayout) -> None:
    """Raise :class:`KeyMismatchError` naming the first parameter where ``layout`` and ``model`` differ."""
    _resolve(model, layout)


def flatten(model: torch.nn.Module, layout: AdapterLayout) -> np.ndarray:
    """The parameters of ``layout`` as one contiguous float32 numpy vector (a copy)."""
    params = _resolve(model, layout)
    out = np.empty(layout.size, dtype=np.float32)
    with torch.no_grad():
        offset = 0
        for p in params:
            n = p.numel()
            out[offset : offset + n] = p.detach().to(device="cpu", dtype=torch.float32).reshape(-1).numpy()
            offset += n
    return out


def load_vector(model: torch.nn.Module, layout: AdapterLayout, vector: np.ndarray | torch.Tensor) -> None:
    """Write a flat vector back into the parameters of ``layout`` (cast to each parameter's dtype).

    Checks everything first (layout against model, vector length, finiteness) and writes nothing when a
    check fails.
    """
    params = _resolve(model, layout)
    flat = torch.as_tensor(np.asarray(vector) if not isinstance(vector, torch.Tensor) else vector)
    if flat.ndim != 1 or flat.numel() != layout.size:
        raise KeyMismatchError(
            f"vector has shape {tuple(flat.shape)}, the layout needs a flat vector of {layout.size} values"
        )
    if not bool(torch.isfinite(flat).all()):
        raise KeyMismatchError("vector contains NaN or inf; nothing was loaded")
    with torch.no_grad():
        offset = 0
        for p in params:
            n = p.numel()
            chunk = flat[offset : offset + n].reshape(p.shape)
            p.copy_(chunk.to(device=p.device, dtype=p.dtype))
            offset += n


def named_vector(layout: AdapterLayout, vector: np.ndarray) -> dict[str, np.ndarray]:
    """Split a flat vector into ``{name: array of the parameter's shape}`` (views, float32)."""
    if vector.shape != (layout.size,):
        raise KeyMismatchError(f"vector has shape {vector.shape}, expected ({layout.size},)")
    offs = layout.offsets
    return {s.name: vector[offs[i] : offs[i + 1]].reshape(s.shape) for i, s in enumerate(layout.specs)}


def parameter_counts(model: torch.nn.Module, layout: AdapterLayout) -> dict[str, Any]:
    """Travelling vs. total parameters, and the share as in FATE-LLM Table 3."""
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": layout.size, "total": total, "share": layout.size / total if total else math.nan}
