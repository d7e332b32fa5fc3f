"""Fixtures of the Flower tests: the trainer tests' toy task (tests/train/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.conftest import write_task


@pytest.fixture
def task(tmp_path: Path) -> Path:
    return write_task(tmp_path / "task.jsonl")
