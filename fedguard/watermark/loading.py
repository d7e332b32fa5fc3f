"""Load a model to verify: a ``peft`` adapter directory (on its base model) or a full model directory.

A verifier needs only the model and the key. A ``peft`` adapter directory (it holds
``adapter_config.json``) is loaded on top of the base model named by its ``base_model_name_or_path``
(or ``base=``), with the adapters' norm scales when they were saved through ``modules_to_save``; an
adapter of a kind peft cannot load (its ``peft_type`` is not peft's) through the loader registered for that
type with :func:`register_adapter_loader` — the ownership audit and ``fedguard attack watermark`` register
``fedguard_train.bottleneck.load_adapter`` for the trainer's Houlsby adapters (``FEDGUARD_BOTTLENECK``), since
this library may not import the trainer package; any other directory is loaded with
``AutoModelForCausalLM``. Nothing is downloaded: paths must be local.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedguard.errors import ConfigError


def load_model(path: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None) -> torch.nn.Module:
    """The model at ``path`` in eval mode (float32, CPU)."""
    from transformers import AutoModelForCausalLM

    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(f"model directory {directory} does not exist")
    adapter_cfg = directory / "adapter_config.json"
    if adapter_cfg.exists():
        from peft import PeftModel

        base_path = resolve_base(directory, base)
        if base_path is None:  # unreachable: an adapter always resolves or raises
            raise ConfigError(f"adapter {directory} has no base model")
        kind = _peft_type(adapter_cfg)
        if kind in _ADAPTER_LOADERS:
            model: Any = _ADAPTER_LOADERS[kind](AutoModelForCausalLM.from_pretrained(base_path), directory)
        elif isinstance(kind, str) and kind.startswith("FEDGUARD_"):
            raise ConfigError(f"{directory} holds a {kind} adapter and no loader is registered for it "
                              f"(fedguard.watermark.loading.register_adapter_loader)")
        else:
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), directory)
    elif (directory / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(directory)
    else:
        raise ConfigError(f"{directory} holds neither a model (config.json) nor a peft adapter "
                          f"(adapter_config.json)")
    model.eval()
    return model


AdapterLoader = Callable[[torch.nn.Module, Path], torch.nn.Module]
_ADAPTER_LOADERS: dict[str, AdapterLoader] = {}


def register_adapter_loader(peft_type: str, loader: AdapterLoader) -> None:
    """Load adapter directories whose ``adapter_config.json`` says ``peft_type`` with ``loader(base, dir)``."""
    _ADAPTER_LOADERS[peft_type] = loader


def _peft_type(adapter_cfg: Path) -> Any:
    try:
        cfg = json.loads(adapter_cfg.read_text())
    except ValueError as err:
        raise ConfigError(f"{adapter_cfg} is not valid JSON: {err}") from err
    return cfg.get("peft_type") if isinstance(cfg, dict) else None


def resolve_base(path: str | os.PathLike[str], base: str | os.PathLike[str] | None = None) -> Path | None:
    """The base (starting) model directory for the model at ``path``.

    ``base`` if given (it must be a directory). Else, for a ``peft`` adapter, its
    ``base_model_name_or_path``, which must be a non-empty local directory: a null or empty field is
    refused (it used to resolve to the current directory and audit whatever model was there). A full
    model directory without ``base`` has no known base: None.
    """
    directory = Path(path)
    if base is not None:
        if not Path(base).is_dir():
            raise ConfigError(f"base model {str(base)!r} is not a local directory")
        return Path(base)
    adapter_cfg = directory / "adapter_config.json"
    if not adapter_cfg.exists():
        return None
    try:
        cfg = json.loads(adapter_cfg.read_text())
    except ValueError as err:
        raise ConfigError(f"{adapter_cfg} is not valid JSON: {err}") from err
    named = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
    if not isinstance(named, str) or not named.strip():
        raise ConfigError(f"adapter {directory} does not name its base model (base_model_name_or_path is "
                          f"{named!r}): pass base=... (--base DIR)")
    if not Path(named).is_dir():
        raise ConfigError(f"adapter {directory} needs its base model: {named!r} is not a local directory "
                          f"(pass base=... / --base DIR)")
    return Path(named)


def load_base(path: str | os.PathLike[str], base: str | os.PathLike[str] | None = None) -> torch.nn.Module | None:
    """The base model of the model at ``path`` (see :func:`resolve_base`) in eval mode, or None."""
    from transformers import AutoModelForCausalLM

    base_path = resolve_base(path, base)
    if base_path is None:
        return None
    model: Any = AutoModelForCausalLM.from_pretrained(base_path)
    model.eval()
    return model
