"""The examples in the core modules' docstrings run as doctests."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "fedguard.errors",
    "fedguard.rng",
    "fedguard.params",
    "fedguard.encoding",
    "fedguard.wire",
    "fedguard.console",
    "fedguard.checks",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0
