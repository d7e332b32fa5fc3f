"""The `fedguard` console command and the demo (the README's main job)."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from fedguard import __version__
from fedguard.cli import main
from fedguard.console import RoundTable
from fedguard.demo import DemoConfig, run_demo
from fedguard.errors import ConfigError


def test_console_script_help_and_version() -> None:
    exe = [sys.executable, "-m", "fedguard.cli"]
    helptext = subprocess.run([*exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "usage: fedguard" in helptext and "demo" in helptext and "info" in helptext
    version = subprocess.run([*exe, "--version"], capture_output=True, text=True, check=True).stdout
    assert version.strip() == f"fedguard {__version__}"


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: fedguard" in capsys.readouterr().out


def test_info_lists_versions_and_aggregators(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "plaintext" in out


def test_typed_errors_become_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--rounds", "0"]) == 2
    assert capsys.readouterr().err.strip() == "fedguard: error: rounds must be >= 1, got 0"
    assert main(["demo", "--aggregator", "plaintxt", "--rounds", "1"]) == 2
    assert "did you mean 'plaintext'" in capsys.readouterr().err


def test_demo_prints_a_table_and_federated_training_lowers_eval_loss() -> None:
    out = io.StringIO()
    table = RoundTable([], stream=out)
    history = run_demo(DemoConfig(clients=2, rounds=2, local_steps=8), table=table)
    assert [row["round"] for row in history] == [1, 2]
    assert table.rows[0]["round"] == 0
    assert history[-1]["eval_loss"] < table.rows[0]["eval_loss"]
    assert all(row["kib_up"] > 0 for row in history)


def test_demo_survives_dropouts_and_reports_them() -> None:
    history = run_demo(DemoConfig(clients=4, rounds=3, local_steps=2, drop_rate=0.5, seed=3),
                       table=RoundTable([], stream=io.StringIO()))
    assert any(row["dropped"] != "-" for row in history)
    assert all(row["clients"] + (0 if row["dropped"] == "-" else len(row["dropped"].split(","))) == 4
               for row in history)


def test_demo_config_collects_problems() -> None:
    with pytest.raises(ConfigError) as info:
        DemoConfig(clients=0, lr=-1.0, drop_rate=1.0)
    assert len(info.value.problems) == 3
