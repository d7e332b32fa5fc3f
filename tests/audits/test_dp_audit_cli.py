"""`fedguard audit dp CONFIG.yaml --canaries M`: report files, the verdict line, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fedguard.cli import main
from tests.train.conftest import write_task

pytestmark = pytest.mark.deepspeed


def _config(tmp_path: Path, **dp: object) -> Path:
    task = write_task(tmp_path / "task.jsonl")
    raw = {
        "run_dir": str(tmp_path / "users-run"), "seed": 3, "model": {"name_or_path": "tiny:gpt2"},
        "adapter": {"method": "lora", "r": 4, "dropout": 0.0},
        "data": {"source": "jsonl", "path": str(task), "max_examples": 48, "test_size": 6},
        "federation": {"clients": 2, "rounds": 1}, "training": {"local_steps": 1, "batch_size": 4, "lr": 0.01},
        "eval": {"max_new_tokens": 2, "examples": 2, "every": 100},
    }
    if dp:
        raw["dp"] = dp
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_audit_dp_writes_the_report_and_prints_the_ceiling(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, clip_norm=0.5, noise_multiplier=3.0, target_delta=1e-5)
    out = tmp_path / "audit"
    assert main(["audit", "dp", str(cfg), "--canaries", "30", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "epsilon_lower" in printed and "ceiling" in printed and "with 30 canaries" in printed
    data = json.loads((out / "dp_audit.json").read_text())["audits"][0]
    assert data["canaries"] == 30 and data["level"] == "client" and data["break"] is None
    assert data["epsilon_lower"] <= data["epsilon_accountant"]
    assert (out / "dp_audit.md").is_file() and (out / "dp_audit.png").stat().st_size > 1000
    assert not (tmp_path / "users-run").exists()  # the user's run directory is never written
    # a second audit into the same place is refused (exit 2, one line) unless --overwrite
    assert main(["audit", "dp", str(cfg), "--canaries", "30", "--out", str(out), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_audit_dp_without_a_dp_section_is_a_typed_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "dp", str(_config(tmp_path)), "--out", str(tmp_path / "a"), "--quiet"]) == 2
    assert "no dp: section" in capsys.readouterr().err
