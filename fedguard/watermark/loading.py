"""Load a model to verify: a ``peft`` adapter directory (on its base model) or a full model directory.

A verifier needs only the model and the key. A ``peft`` adapter directory (it holds
``adapter_config.json``) is loaded on top of the base model named by its ``base_model_name_or_path``
(or ``base=``), with the adapters' norm scales when they were saved through ``modules_to_save``; any
other directory is loaded with ``AutoModelForCausalLM``. Nothing is downloaded: paths must be local.
"""

from __future__ import annotations

import json
import os
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

        try:
            cfg = json.loads(adapter_cfg.read_text())
        except ValueError as err:
            raise ConfigError(f"{adapter_cfg} is not valid JSON: {err}") from err
        base_path = Path(base) if base is not None else Path(str(cfg.get("base_model_name_or_path") or ""))
        if not base_path.is_dir():
            raise ConfigError(f"adapter {directory} needs its base model: {str(base_path)!r} is not a local "
                              f"directory (pass base=...)")
        model: Any = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), directory)
    elif (directory / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(directory)
    else:
        raise ConfigError(f"{directory} holds neither a model (config.json) nor a peft adapter "
                          f"(adapter_config.json)")
    model.eval()
    return model
