"""Plain-text per-round tables for the terminal (and the same rows as dicts for metrics files)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
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

    def __init__(self, columns: Sequence[Column], stream: TextIO | None = None,
                 write: Callable[[str], None] | None = None) -> None:
        """Rows go to ``write`` when given (e.g. ``tqdm.write`` beside a progress bar), else to ``stream``
        (default: standard output)."""
        self.columns = list(columns)
        self.stream = stream
        self._write = write
        self._printed_header = False
        self.rows: list[dict[str, Any]] = []

    def _emit(self, line: str) -> None:
        if self._write is not None:
            self._write(line)
        else:
            print(line, file=self.stream if self.stream is not None else sys.stdout, flush=True)

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
        if not self._printed_header:
            self._emit(self.header())
            self._printed_header = True
        self._emit(self.format_row(self.shown(values)))
        self.rows.append(dict(values))

    def shown(self, values: dict[str, Any]) -> dict[str, Any]:
        """The values as displayed (subclasses derive display columns here)."""
        return values
