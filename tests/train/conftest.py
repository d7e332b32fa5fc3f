"""Fixtures for the trainer tests: a small JSONL task and tiny-model configs (offline, fast)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedguard_train.config import TrainConfig
from fedguard_train.hooks import TrainerHook


def write_task(path: Path, n: int = 48) -> Path:
    """A learnable toy instruction task with three attributes (topics)."""
    words = ["red", "blue", "green", "cat", "dog", "owl", "run", "sit", "fly"]
    with path.open("w") as out:
        for i in range(n):
            w = words[i % len(words)]
            out.write(json.dumps({"prompt": f"Repeat {w}", "response": f"{w} {w}", "attribute": f"topic{i % 3}"}) + "\n")
    return path


@pytest.fixture
def task(tmp_path: Path) -> Path:
    return write_task(tmp_path / "task.jsonl")


def tiny_config(tmp_path: Path, task: Path, **overrides: Any) -> TrainConfig:
    raw: dict[str, Any] = {
        "run_dir": str(tmp_path / "run"),
        "seed": 3,
        "model": {"name_or_path": "tiny:gpt2"},
        "adapter": {"method": "lora", "r": 4, "dropout": 0.0},
        "data": {"source": "jsonl", "path": str(task), "max_examples": 48, "test_size": 6},
        "federation": {"clients": 2, "rounds": 2},
        "training": {"local_steps": 2, "batch_size": 4, "lr": 0.01},
        "eval": {"max_new_tokens": 4, "examples": 4},
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            raw.setdefault(section, {})[name] = value
        else:
            raw[section] = value
    return TrainConfig.from_dict(raw)


class UpdateNorms(TrainerHook):
    """A hook placed after the privacy hooks: records ``(size, L2 norm)`` of every client update it is
    handed (so, with ``dp:``, the clipped vector)."""

    name = "norms"

    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def client_update(self, update):  # type: ignore[no-untyped-def]
        self.seen.append((int(update.vector.size), float(np.linalg.norm(update.vector))))
        return update
