"""Plain-text per-round tables for the terminal (and the same rows as dicts for metrics files)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO


@dataclass(frozen=True, slots=True)
class Column:
    key: str
    title: str
    fmt: str = "{}"
    width: int = 10


class RoundTable:
    """Prints a header once, then one aligned row per round as it arrives.

    >>> t = RoundTable([Column("round", "round", "{:d}", 5), Column("loss", "loss", "{:.3f}", 7)])
    >>> t.row({"round": 1, "loss": 2.5})
    round    loss
    ----- -------
        1   2.500
    """

    def __init__(self, columns: Sequence[Column], stream: TextIO | None = None) -> None:
        self.columns = list(columns)
        self.stream = stream
        self._printed_header = False
        self.rows: list[dict[str, Any]] = []

    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stdout

    def header(self) -> str:
        titles = " ".join(f"{c.title:>{c.width}}" for c in self.columns)
        rule = " ".join("-" * c.width for c in self.columns)
        return f"{titles}\n{rule}"

    def format_row(self, values: dict[str, Any]) -> str:
        cells = []
        for c in self.columns:
            v = values.get(c.key)
            text = "-" if v is None else c.fmt.format(v)
            cells.append(f"{text:>{c.width}}")
        return " ".join(cells)

    def row(self, values: dict[str, Any]) -> None:
        out = self._out()
        if not self._printed_header:
            print(self.header(), file=out)
            self._printed_header = True
        print(self.format_row(values), file=out, flush=True)
        self.rows.append(dict(values))
