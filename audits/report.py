"""Write an audit report: one JSON document, one Markdown page, and PNG plots, side by side.

Every audit (ownership, DP, leakage) ends the same way: machine-readable results for CI and scripts,
a page a person reads, and plots the page links to. :func:`write_report` writes
``<out>/<stem>.json``, ``<out>/<stem>.md`` and one PNG per plot (matplotlib's Agg backend, no display).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedguard.errors import ConfigError

PlotFn = Callable[[Any], None]
"""Draws onto a matplotlib ``Figure`` passed to it."""


@dataclass(frozen=True, slots=True)
class ReportPaths:
    json: Path
    markdown: Path
    plots: tuple[Path, ...]


def write_report(
    out_dir: str | os.PathLike[str],
    stem: str,
    data: Mapping[str, Any],
    markdown: str,
    plots: Mapping[str, PlotFn] | None = None,
    *,
    figsize: tuple[float, float] = (8.0, 4.5),
) -> ReportPaths:
    """Write the report files; ``plots`` maps a PNG file name to a function drawing on a Figure."""
    if not stem or "/" in stem or stem.startswith("."):
        raise ConfigError(f"report stem must be a plain file name, got {stem!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    md_path = out / f"{stem}.md"
    md_path.write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    written = []
    if plots:
        import matplotlib

        matplotlib.use("Agg", force=True)
        from matplotlib.figure import Figure

        for name, draw in plots.items():
            if not name.endswith(".png") or "/" in name:
                raise ConfigError(f"plot names must be plain .png file names, got {name!r}")
            fig = Figure(figsize=figsize, dpi=110)
            draw(fig)
            fig.tight_layout()
            path = out / name
            fig.savefig(path)
            written.append(path)
    return ReportPaths(json_path, md_path, tuple(written))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
