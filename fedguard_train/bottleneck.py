"""Houlsby bottleneck adapters (FATE-LLM §3.1 "Adapter Tuning"), as a small peft-like module.

Houlsby et al., "Parameter-Efficient Transfer Learning for NLP" (ICML 2019), §2.1: after each of the
two sublayers of a transformer block (attention and feed-forward), on the sublayer's output projection
and before the residual addition, insert

    A(h) = h + W_up · f(W_down · h + b_down) + b_up,      W_down: d -> m,  W_up: m -> d,  f = GELU

with a bottleneck ``m << d`` (``adapter.bottleneck_size``). Only the adapters train; with ``L`` blocks an
adapter costs ``2·L·(2·d·m + d + m)`` parameters. Both projections start near zero (normal, std 1e-2, zero
biases), so the adapted model starts near the base model, as in the paper.

AdapterHub's ``adapters`` library, the maintained implementation, pins ``transformers~=4.57.6``; this
project pins transformers 5 (pyproject.toml), so it does not fit and this module is our own. It follows
peft's shape so that the trainer, the checkpoint and the watermark code treat it like a peft model:
:class:`BottleneckModel` wraps the frozen base model, exposes ``get_base_model``, ``forward``,
``generate``, ``save_pretrained`` (``adapter_config.json`` with ``peft_type: "FEDGUARD_BOTTLENECK"`` and
``adapter_model.safetensors`` of the trainable parameters under their full names) and
:meth:`BottleneckModel.from_pretrained`. Plain ``peft.PeftModel.from_pretrained`` cannot load it (peft's
method registry accepts only its own ``PeftType`` values); :func:`load_adapter` loads either kind.

The adapters hang off the target modules as child modules named ``bottleneck`` and are applied by a
forward hook, so the base model's own parameter names do not change (the watermark code and the base
checkpoint keep matching).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn

from fedguard.errors import ConfigError

PEFT_TYPE: Final[str] = "FEDGUARD_BOTTLENECK"
CONFIG_FILE: Final[str] = "adapter_config.json"
WEIGHTS_FILE: Final[str] = "adapter_model.safetensors"
CHILD: Final[str] = "bottleneck"
INIT_STD: Final[float] = 1e-2


class BottleneckAdapter(nn.Module):
    """``h + up(gelu(down(h)))`` on the last dimension of ``h`` (Houlsby et al. 2019, Fig. 2)."""

    def __init__(self, features: int, size: int) -> None:
        super().__init__()
        self.down = nn.Linear(features, size)
        self.up = nn.Linear(size, features)
        self.act = nn.GELU()
        for layer in (self.down, self.up):
            nn.init.normal_(layer.weight, std=INIT_STD)
            nn.init.zeros_(layer.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


def _adapt_output(module: nn.Module, inputs: Any, output: Any) -> Any:
    """Forward hook: pass the sublayer's output (or the first element of a tuple) through its adapter."""
    adapter = getattr(module, CHILD)
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def _out_features(module: nn.Module) -> int | None:
    """Output width of a linear map: ``nn.Linear.out_features`` or GPT-2's ``Conv1D.nf``."""
    for attr in ("out_features", "nf"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None


def _matches(path: str, targets: Sequence[str]) -> bool:
    return any(path == t or path.endswith("." + t) for t in targets)


class BottleneckModel(nn.Module):
    """A frozen causal LM with bottleneck adapters after the ``target_modules`` (see the module docstring)."""

    def __init__(self, model: nn.Module, *, target_modules: Sequence[str], bottleneck_size: int) -> None:
        super().__init__()
        if isinstance(bottleneck_size, bool) or not isinstance(bottleneck_size, int) or bottleneck_size < 1:
            raise ConfigError(f"bottleneck_size must be an int >= 1, got {bottleneck_size!r}")
        if not target_modules:
            raise ConfigError("bottleneck adapters need at least one target module")
        self.base_model = model
        self.target_modules = tuple(target_modules)
        self.bottleneck_size = bottleneck_size
        model.requires_grad_(False)
        adapted: list[str] = []
        for path, module in list(model.named_modules()):
            if not _matches(path, self.target_modules):
                continue
            features = _out_features(module)
            if features is None:
                raise ConfigError(f"target module {path} ({type(module).__name__}) is not a linear map")
            if hasattr(module, CHILD):
                raise ConfigError(f"{path} already has a bottleneck adapter")
            module.add_module(CHILD, BottleneckAdapter(features, bottleneck_size))
            module.register_forward_hook(_adapt_output)
            adapted.append(path)
        if not adapted:
            raise ConfigError(f"no module of the model matches target_modules {list(self.target_modules)}")
        self.adapted = tuple(adapted)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)  # config, generation_config, device, ... as peft does

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)  # type: ignore[operator]

    def adapter_config(self) -> dict[str, Any]:
        """What :meth:`save_pretrained` writes to ``adapter_config.json``."""
        name = getattr(getattr(self.base_model, "config", None), "name_or_path", "") or None
        return {"peft_type": PEFT_TYPE, "format": 1, "task_type": "CAUSAL_LM", "base_model_name_or_path": name,
                "bottleneck_size": self.bottleneck_size, "target_modules": list(self.target_modules),
                "non_linearity": "gelu", "placement": "houlsby (after attention and feed-forward output)"}

    def save_pretrained(self, directory: str | Path) -> None:
        """``adapter_config.json`` and ``adapter_model.safetensors`` (every trainable parameter, full name)."""
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        state = {n: p.detach().to("cpu").contiguous().clone() for n, p in self.named_parameters() if p.requires_grad}
        save_file(state, path / WEIGHTS_FILE, metadata={"format": "pt"})
        (path / CONFIG_FILE).write_text(json.dumps(self.adapter_config(), indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path) -> BottleneckModel:
        """Attach the saved adapters to ``model`` (the same base model) and load every saved tensor — the
        adapters and any trainable parameters saved beside them (e.g. watermarked norm scales) — by name.
        Refuses a file that misses an adapter parameter or names a parameter the model lacks."""
        from safetensors.torch import load_file

        path = Path(directory)
        config = read_config(path)
        if config is None or config.get("peft_type") != PEFT_TYPE:
            raise ConfigError(f"{path} is not a fedguard bottleneck adapter (no {CONFIG_FILE} with peft_type {PEFT_TYPE})")
        try:
            wrapped = cls(model, target_modules=config["target_modules"], bottleneck_size=config["bottleneck_size"])
            state = load_file(path / WEIGHTS_FILE)
        except (KeyError, OSError) as err:
            raise ConfigError(f"bottleneck adapter in {path} is incomplete: {err}") from err
        params = dict(wrapped.named_parameters())
        unknown = sorted(set(state) - set(params))
        missing = sorted(n for n, p in params.items() if p.requires_grad and n not in state)
        if unknown or missing:
            raise ConfigError(f"bottleneck adapter in {path} does not fit the model: "
                              f"unknown {unknown[:3]}, missing {missing[:3]}")
        with torch.no_grad():
            for name, tensor in state.items():
                if params[name].shape != tensor.shape:
                    raise ConfigError(f"{name}: saved shape {tuple(tensor.shape)}, model has {tuple(params[name].shape)}")
                params[name].copy_(tensor)
                params[name].requires_grad_(True)
        return wrapped


def read_config(directory: Path) -> dict[str, Any] | None:
    """The ``adapter_config.json`` of ``directory`` (None when there is none)."""
    file = directory / CONFIG_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except ValueError as err:
        raise ConfigError(f"{file} is not JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{file} must hold a JSON object")
    return data


def load_adapter(model: nn.Module, directory: str | Path) -> Any:
    """Load a saved adapter of any kind onto ``model``: fedguard bottleneck adapters here, the rest with
    ``peft.PeftModel.from_pretrained``."""
    config = read_config(Path(directory))
    if config is not None and config.get("peft_type") == PEFT_TYPE:
        return BottleneckModel.from_pretrained(model, directory)
    from peft import PeftModel

    return PeftModel.from_pretrained(model, directory)
