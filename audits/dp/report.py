"""The DP audit's report: ``dp_audit.json``, ``dp_audit.md`` and ``dp_audit.png`` (:mod:`audits.report`).

The PNG has two panels: the histograms of the scores of canaries that were in and out (how separable the
attack found them), and per audit the lower bound beside the accountant's ε with the ceiling marked (what
these canaries could have shown at most)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from audits.dp.client import DPAuditResult
from audits.report import ReportPaths, write_report

REPORT_STEM = "dp_audit"
PLOT_NAME = "dp_audit.png"

__all__ = ["PLOT_NAME", "REPORT_STEM", "markdown", "verdict", "write_dp_report"]


def verdict(result: DPAuditResult) -> str:
    """One phrase: a violation, no violation found, or not refutable with these canaries."""
    if result.violation:
        return "VIOLATION: epsilon_lower > epsilon_accountant"
    if not result.refutable:
        return "cannot refute: accountant's epsilon is above the ceiling (add canaries)"
    return "no violation found"


def _fmt(x: float) -> str:
    return "inf" if not np.isfinite(x) else f"{x:.3f}"


def markdown(results: Sequence[DPAuditResult]) -> str:
    """The report page: a summary table, each audit's grid of guess counts and its notes."""
    lines = ["# DP audit in one training run", "",
             f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}. Lower bound on epsilon from one run "
             "with canaries each included with probability 1/2 (Steinke, Nasr, Jagielski, NeurIPS 2023; client "
             "canaries after Andrew et al., ICLR 2024). The ceiling is the most these canaries could show "
             "(every guess correct, same grid and correction); the ideal ceiling is one pre-set guess of every "
             "canary, all correct.", "",
             "| audit | break | canaries (in) | epsilon_accountant | epsilon_lower | ceiling | ideal ceiling | "
             "confidence | delta | verdict |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        b = r.bound
        lines.append(f"| {r.level}: {r.mechanism} | {r.breaks or 'none'} | {b.m} ({b.in_count}) | "
                     f"{_fmt(r.epsilon_accountant)} | {_fmt(b.epsilon)} | {_fmt(b.ceiling)} | {_fmt(b.ideal_ceiling)} | "
                     f"{b.confidence:.0%} | {b.delta:g} | {verdict(r)} |")
    for i, r in enumerate(results, 1):
        b = r.bound
        lines += ["", f"## {i}. {r.level}-level: {r.mechanism}" + (f" (BROKEN: {r.breaks})" if r.breaks else ""), "",
                  f"Guesses: {b.correction}; per-test significance {b.per_test_significance:.4g}. "
                  f"Best: {b.best.r} guesses ({b.best.k_in} in, {b.best.k_out} out), {b.best.v} correct. "
                  f"Run time {r.seconds:.1f} s.", "",
                  "| guesses | in | out | correct | epsilon bound |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {g.r} | {g.k_in} | {g.k_out} | {g.v} | {g.epsilon:.3f} |" for g in b.per_guess]
        if r.notes:
            lines += ["", *[f"- {n}" for n in r.notes]]
    lines += ["", f"![scores and bounds]({PLOT_NAME})"]
    return "\n".join(lines) + "\n"


def _draw(results: Sequence[DPAuditResult]) -> Any:
    def draw(fig: Any) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        first = results[0]
        lo, hi = float(np.min(first.scores)), float(np.max(first.scores))
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 31)
        ax1.hist(first.scores[~first.included], bins=bins, alpha=0.6, label="out", color="tab:blue")
        ax1.hist(first.scores[first.included], bins=bins, alpha=0.6, label="in", color="tab:red")
        ax1.set_xlabel("canary score" + (" (audit 1)" if len(results) > 1 else ""))
        ax1.set_ylabel("canaries")
        ax1.legend()
        x = np.arange(len(results))
        acc = [min(r.epsilon_accountant, 50.0) for r in results]
        low = [r.bound.epsilon for r in results]
        ax2.bar(x - 0.2, acc, 0.4, label="accountant epsilon", color="tab:gray")
        ax2.bar(x + 0.2, low, 0.4, label="epsilon lower bound", color="tab:orange")
        for i, r in enumerate(results):
            ax2.hlines(r.bound.ceiling, i - 0.45, i + 0.45, colors="black", linestyles="dashed",
                       label="ceiling" if i == 0 else None)
        ax2.set_xticks(x, [f"{i + 1}:{r.level}{'/' + r.breaks if r.breaks else ''}" for i, r in enumerate(results)],
                       fontsize=8)
        ax2.set_ylabel("epsilon")
        top = max([*acc, *low, *(r.bound.ceiling for r in results)])
        ax2.set_ylim(0, 1.3 * top if top > 0 else 1.0)
        ax2.legend(fontsize=8, loc="upper left", ncols=3)
    return draw


def write_dp_report(results: Sequence[DPAuditResult], out_dir: str | os.PathLike[str]) -> ReportPaths:
    """Write the JSON, Markdown and PNG of one or more audits into ``out_dir``."""
    data = {"audits": [r.to_json() for r in results]}
    return write_report(out_dir, REPORT_STEM, data, markdown(results), {PLOT_NAME: _draw(results)},
                        figsize=(10.0, 4.0))
