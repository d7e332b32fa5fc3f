"""Ownership audit: "is my watermark in this model?" for one or more claimants, with p-values.

Given a model (a ``peft`` adapter directory or a full model directory) and the key files of the
claimants, the audit verifies each key (:func:`fedguard.watermark.verify_key`) and reports, per claimant,
matched bits, bit error rate, the exact binomial p-value and the verdict at the significance level
(default 1e-6), plus bit agreement per target block. Each verdict is a test with false-claim probability
at most the significance *per key*; the report also states the Bonferroni-adjusted level for the number
of keys audited together.

Output: ``ownership.json``, ``ownership.md`` and ``ownership_agreement.png`` (bit agreement per target
block, one bar per claimant, the 50% chance line marked).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from audits.report import ReportPaths, write_report
from fedguard.errors import ConfigError

if TYPE_CHECKING:  # torch, transformers and scipy load only when an audit runs (the CLI stays light)
    import torch

    from fedguard.watermark import Detection, WatermarkKey

DEFAULT_SIGNIFICANCE = 1e-6  # = fedguard.watermark.verify.DEFAULT_SIGNIFICANCE, without importing scipy

REPORT_STEM = "ownership"
PLOT_NAME = "ownership_agreement.png"


@dataclass(frozen=True, slots=True)
class OwnershipReport:
    model: str
    significance: float
    claimants: tuple[tuple[str, Detection], ...]  # (key file, detection)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "significance": self.significance,
            "keys_audited": len(self.claimants),
            "bonferroni_significance": self.significance / max(1, len(self.claimants)),
            "claimants": [{"key_file": path, **d.to_json()} for path, d in self.claimants],
        }


def audit_keys(
    model: torch.nn.Module, keys: Sequence[tuple[str, WatermarkKey]], *, model_name: str = "<model>",
    significance: float = DEFAULT_SIGNIFICANCE,
) -> OwnershipReport:
    """Verify each ``(label, key)`` against an already loaded model."""
    from fedguard.watermark import verify_key
    from fedguard.watermark.verify import check_significance

    significance = check_significance(significance)
    if not keys:
        raise ConfigError("an ownership audit needs at least one key")
    return OwnershipReport(model_name, significance,
                           tuple((label, verify_key(model, key, significance)) for label, key in keys))


def audit_ownership(
    model_dir: str | os.PathLike[str],
    key_files: Sequence[str | os.PathLike[str]],
    *,
    base: str | os.PathLike[str] | None = None,
    significance: float = DEFAULT_SIGNIFICANCE,
) -> OwnershipReport:
    """Load the model at ``model_dir`` and every key file (all checked before any verification)."""
    from fedguard.watermark.keys import load_key
    from fedguard.watermark.loading import load_model

    keys = [(str(p), load_key(p)) for p in key_files]
    model = load_model(model_dir, base=base)
    return audit_keys(model, keys, model_name=str(model_dir), significance=significance)


def render_markdown(report: OwnershipReport, plot: str | None = PLOT_NAME) -> str:
    lines = [
        "# Ownership audit",
        "",
        f"Model: `{report.model}`  ",
        f"Significance: {report.significance:g} per key (Bonferroni for {len(report.claimants)} key(s): "
        f"{report.significance / len(report.claimants):g})",
        "",
        "| claimant | key id | scheme | matched | bit error rate | p-value | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for path, d in report.claimants:
        who = d.owner or Path(path).name
        verdict = "**ownership claimed**" if d.verdict else "no claim"
        lines.append(f"| {who} | `{d.key_id}` | {d.scheme} | {d.matched}/{d.bits} | {d.bit_error_rate:.3f} | "
                     f"{d.p_value:.3g} | {verdict} |")
    lines += ["", "H0: the model was not trained with the key; under H0 each sign bit matches with probability "
              "1/2 and each backdoor trigger with probability at most V^-L, so the p-value is the exact "
              "binomial tail P[X >= matched].", ""]
    for path, d in report.claimants:
        if d.scheme != "sign":
            continue
        lines += [f"## Bit agreement per target block: {d.owner or Path(path).name}", "",
                  "| block | matched | agreement |", "| --- | --- | --- |"]
        lines += [f"| {b.label} | {b.matched}/{b.bits} | {b.agreement:.2f} |" for b in d.blocks]
        lines.append("")
    if plot:
        lines += [f"![bit agreement per target block]({plot})", ""]
    return "\n".join(lines)


def _draw_agreement(report: OwnershipReport) -> Any:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        n = len(report.claimants)
        width = 0.8 / n
        all_labels: list[str] = []
        for _, d in report.claimants:
            labels = [b.label.split(" (")[0] for b in d.blocks] if d.scheme == "sign" else ["triggers"]
            for lab in labels:
                if lab not in all_labels:
                    all_labels.append(lab)
        index = {lab: i for i, lab in enumerate(all_labels)}
        for k, (path, d) in enumerate(report.claimants):
            if d.scheme == "sign":
                xs = [index[b.label.split(" (")[0]] + (k - (n - 1) / 2) * width for b in d.blocks]
                ys = [b.agreement for b in d.blocks]
            else:
                xs = [index["triggers"] + (k - (n - 1) / 2) * width]
                ys = [d.matched / d.bits]
            tag = "claimed" if d.verdict else "no claim"
            ax.bar(xs, ys, width=width, label=f"{d.owner or Path(path).name} ({tag}, p={d.p_value:.2g})")
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance (0.5)")
        ax.set_xticks(range(len(all_labels)))
        ax.set_xticklabels(all_labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylim(0, 1.3)
        ax.set_ylabel("bit agreement")
        ax.set_title("Watermark bit agreement per target block")
        ax.legend(fontsize=7, loc="upper center", ncol=3, frameon=False)

    return draw


def write_ownership_report(report: OwnershipReport, out_dir: str | os.PathLike[str]) -> ReportPaths:
    """Write ``ownership.json``, ``ownership.md`` and the agreement plot into ``out_dir``."""
    return write_report(out_dir, REPORT_STEM, report.to_json(), render_markdown(report),
                        {PLOT_NAME: _draw_agreement(report)})


def register_cli(commands: Any) -> None:
    """Register ``fedguard audit ownership`` (entry point ``audits.ownership:register_cli``)."""
    p = commands.subcommand("audit", "ownership", help="is my watermark in this model? (p-value and verdict)",
                            group_help="audits with reports (ownership)")
    p.add_argument("--model", required=True, help="model directory (full model or peft adapter directory)")
    p.add_argument("--base", default=None, help="base model directory of a peft adapter")
    p.add_argument("--key", action="append", required=True, help="a claimant's key file (repeatable)")
    p.add_argument("--significance", type=float, default=DEFAULT_SIGNIFICANCE)
    p.add_argument("--out", default="ownership-audit", help="report directory (JSON, Markdown, PNG)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.set_defaults(handler=run_audit)


def run_audit(args: Any) -> int:
    """Handler of ``fedguard audit ownership``: writes the report and prints it (0 on success)."""
    import json

    report = audit_ownership(args.model, args.key, base=args.base, significance=args.significance)
    paths = write_ownership_report(report, args.out)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for _, d in report.claimants:
            print(d.summary())
        print(f"report: {paths.markdown} ({paths.json.name}, {', '.join(p.name for p in paths.plots)})")
    return 0
