"""fedguard.checks (the shared value checks) and fedguard.files (atomic writes)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from fedguard.checks import check_int, check_number, int_problem, is_int, number_problem
from fedguard.errors import ConfigError
from fedguard.files import atomic_write


@pytest.mark.parametrize("value", [0, 5, np.int64(3), np.uint8(7)])
def test_integers_of_any_kind_are_ints(value: object) -> None:
    assert is_int(value)


@pytest.mark.parametrize("value", [True, False, 1.0, "1", None, np.float32(1)])
def test_bools_floats_and_strings_are_not_ints(value: object) -> None:
    assert not is_int(value)


def test_int_problem_names_the_value_and_range() -> None:
    assert int_problem("k", 3, low=1, high=3) is None
    assert int_problem("k", 4, low=1, high=3) == "k must be an int in [1, 3], got 4"
    assert int_problem("k", -1, low=0) == "k must be an int >= 0, got -1"
    assert int_problem("k", 9, high=8) == "k must be an int <= 8, got 9"
    assert int_problem("k", None, low=1, optional=True) is None
    assert int_problem("k", "x", low=1, optional=True) == "k must be None or an int >= 1, got 'x'"


def test_number_problem_refuses_nan_inf_and_open_bounds() -> None:
    assert number_problem("x", 0.5, low=0, high=1) is None
    assert number_problem("x", 0.0, low=0.0, low_open=True) == "x must be a finite number > 0.0, got 0.0"
    assert number_problem("x", 1.0, low=0.0, high=1.0, high_open=True) is not None
    assert number_problem("x", float("inf")) is not None
    assert number_problem("x", True) is not None


def test_check_helpers_return_the_value_or_raise_config_error() -> None:
    assert check_int("n", np.int32(4), low=1) == 4 and type(check_int("n", np.int32(4))) is int
    assert check_number("lr", 3) == 3.0
    with pytest.raises(ConfigError, match="lr must be a finite number > 0"):
        check_number("lr", -1, low=0, low_open=True)


def test_atomic_write_replaces_whole_file_and_sets_mode(tmp_path: Path) -> None:
    target = tmp_path / "key.json"
    atomic_write(target, "first", mode=0o600)
    assert target.read_text() == "first"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    atomic_write(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["key.json"]  # no temporary left behind


def test_atomic_write_refuses_to_overwrite_when_told(tmp_path: Path) -> None:
    target = tmp_path / "ledger.json"
    target.write_text("keep me")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        atomic_write(target, "new", overwrite=False)
    assert target.read_text() == "keep me"


def test_atomic_write_into_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        atomic_write(tmp_path / "nope" / "f.txt", "x")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")

    def boom(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
