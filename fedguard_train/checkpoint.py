"""Checkpoints of a federated run, written atomically, and resume.

Layout under ``<run_dir>/checkpoints/``::

    round-0003/adapter/        peft ``save_pretrained`` output: load it with
                               ``PeftModel.from_pretrained(base_model, ".../adapter")``; trainable
                               parameters outside the adapter (norm scales carrying a watermark)
                               are stored as peft ``modules_to_save``, so that load restores them
    round-0003/global.npy      the exact global adapter vector (bit-exact resume)
    round-0003/state.json      round, config, layout, hook state (e.g. the privacy ledger), metrics
    round-0003/server.npz      arrays of server-side models a trainer trains (only when it has some)
    latest.json                {"round": 3, "path": "round-0003"}

A checkpoint directory is written under a temporary name and renamed into place, and ``latest.json``
is replaced atomically last, so a run killed at any point resumes from the last complete round.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedguard.errors import ConfigError
from fedguard.files import atomic_write


@dataclass(frozen=True, slots=True)
class Checkpoint:
    round: int
    vector: np.ndarray
    state: dict[str, Any]
    path: Path
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def save_adapter(model: Any, directory: Path) -> list[str]:
    """``model.save_pretrained(directory)``, plus every trainable parameter peft did not save.

    peft saves its adapter weights and the modules listed in ``modules_to_save``. Parameters made
    trainable beside the adapter (``fedguard.params.mark_trainable``, e.g. the norm scales of a
    FedIPR watermark) travel in every round but are not in that list, so a plain ``save_pretrained``
    would drop them and the saved model would differ from the trained global model. They are added
    to the adapter file under peft's key for a saved module (the parameter's name) and their modules
    to ``modules_to_save`` in ``adapter_config.json``, so ``PeftModel.from_pretrained`` restores them
    (tested). Returns the names added.
    """
    from safetensors.torch import load_file, save_file

    model.save_pretrained(directory)
    extra = {name: p for name, p in model.named_parameters()
             if p.requires_grad and not _is_peft_managed(name)}
    if not extra:
        return []
    weights = directory / "adapter_model.safetensors"
    config_path = directory / "adapter_config.json"
    if not weights.is_file() or not config_path.is_file():
        raise ConfigError(f"{directory} lacks adapter_model.safetensors or adapter_config.json after save_pretrained")
    state = load_file(weights)
    for name, p in extra.items():
        state[name] = p.detach().to("cpu").contiguous().clone()
    save_file(state, weights, metadata={"format": "pt"})
    config = json.loads(config_path.read_text())
    modules = set(config.get("modules_to_save") or [])
    modules |= {name.rsplit(".", 1)[0] for name in extra}  # the full module path: peft matches by suffix
    config["modules_to_save"] = sorted(modules)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return sorted(extra)


def _is_peft_managed(name: str) -> bool:
    """Adapter weights peft saves under another key (LoRA, prompt encoders, saved-module copies)."""
    return any(part in name for part in ("lora_", "prompt_encoder", "modules_to_save", "original_module"))


def save_checkpoint(run_dir: Path, round_id: int, model: Any, vector: np.ndarray, state: dict[str, Any], *,
                    arrays: dict[str, np.ndarray] | None = None) -> Path:
    """Write round ``round_id`` (adapter, exact vector, state, server-side ``arrays``) and point
    ``latest.json`` at it."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"round-{round_id:04d}"
    final = root / name
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_adapter(model, tmp / "adapter")
    np.save(tmp / "global.npy", vector.astype(np.float32, copy=False))
    (tmp / "state.json").write_text(json.dumps({"round": round_id, **state}, indent=2, sort_keys=True))
    if arrays:
        np.savez(tmp / "server.npz", **arrays)  # type: ignore[arg-type]
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write(root / "latest.json", json.dumps({"round": round_id, "path": name}))
    return final


def load_latest(run_dir: Path) -> Checkpoint | None:
    """The last complete checkpoint, or None when the run has none."""
    pointer = run_dir / "checkpoints" / "latest.json"
    if not pointer.is_file():
        return None
    try:
        latest = json.loads(pointer.read_text())
        path = run_dir / "checkpoints" / latest["path"]
        state = json.loads((path / "state.json").read_text())
        vector = np.load(path / "global.npy", allow_pickle=False)
        arrays: dict[str, np.ndarray] = {}
        if (path / "server.npz").is_file():
            with np.load(path / "server.npz", allow_pickle=False) as saved:
                arrays = {k: saved[k] for k in saved.files}
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"checkpoint in {run_dir} is unreadable: {err}") from err
    return Checkpoint(int(latest["round"]), vector, state, path, arrays)


def load_round_metrics(run_dir: Path, round_id: int) -> dict[str, Any]:
    """The metrics row stored with round ``round_id``'s checkpoint."""
    path = run_dir / "checkpoints" / f"round-{round_id:04d}" / "state.json"
    try:
        return dict(json.loads(path.read_text())["metrics"])
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"checkpoint of round {round_id} in {run_dir} is unreadable: {err}") from err
