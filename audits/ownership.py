"""Ownership audit: "is my watermark in this model?" for one or more claimants, with p-values.

Given a model (a ``peft`` adapter directory or a full model directory) and the key files of the
claimants, the audit verifies each key (:func:`fedguard.watermark.verify_key`) and reports, per claimant,
matched bits, bit error rate, the exact binomial p-value and the verdict at the significance level
(default 1e-6), plus bit agreement per target block. Each verdict is a test with false-claim probability
at most the significance *per key*; the report also states the Bonferroni-adjusted level for the number
of keys audited together.

Claims are made unforgeable (issue 14): every sign key's offsets and scales are recomputed on the base
model (``--base``, or a peft adapter's own base; an adapter that names none is refused) and a key that
states others — or whose calibration cannot be recomputed — is refused whatever its bits say
(:mod:`fedguard.watermark.calibration`); each claimant's key is matched against the commitments given
(``--commitment``) and those recorded in the model's run state, and ``--require-commitment`` voids a claim
without one that predates the model (:mod:`fedguard.watermark.commitment`). With a base model, invariant and
gram keys are read after undoing a rotation of the residual stream (Procrustes on the token embeddings,
:mod:`fedguard.watermark.alignment`). Claimants sharing an owner
label are shown with their file name and key id.

Output (``--json``: the JSON on stdout and no files): ``ownership.json``, ``ownership.md`` and
``ownership_agreement.png`` (bit agreement per target
block, one bar per claimant, the 50% chance line marked).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from audits.report import ReportPaths, write_report
from fedguard.errors import ConfigError

if TYPE_CHECKING:  # torch, transformers and scipy load only when an audit runs (the CLI stays light)
    import torch

    from fedguard.watermark import Detection, WatermarkKey
    from fedguard.watermark.calibration import CalibrationCheck
    from fedguard.watermark.commitment import Commitment

DEFAULT_SIGNIFICANCE = 1e-6  # = fedguard.watermark.verify.DEFAULT_SIGNIFICANCE, without importing scipy

REPORT_STEM = "ownership"
PLOT_NAME = "ownership_agreement.png"


@dataclass(frozen=True, slots=True)
class Claim:
    """One claimant's result. ``detection``: the bit test; ``calibration``: whether the key's offsets and
    scales are those the base model gives (None for backdoor keys, which have none); ``commitment``: how
    the key relates to the commitments given (``predates-model``, ``recorded-in-run``, ``after-model``,
    ``none``); ``claimed``: the verdict — bits significant, calibration recomputed, and (when commitments are
    required) a commitment that predates the model."""

    label: str
    key_file: str
    detection: Detection
    calibration: CalibrationCheck | None
    commitment: str
    commitment_detail: str
    claimed: bool
    reason: str

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "key_file": self.key_file, **self.detection.to_json()}
        out["bits_verdict"] = out.pop("verdict")
        out["calibration"] = None if self.calibration is None else {
            "status": self.calibration.status, "detail": self.calibration.detail,
            "max_offset_error": self.calibration.max_offset_error}
        out.update(commitment=self.commitment, commitment_detail=self.commitment_detail, verdict=self.claimed,
                   reason=self.reason)
        return out


@dataclass(frozen=True, slots=True)
class OwnershipReport:
    model: str
    significance: float
    claimants: tuple[Claim, ...]
    require_commitment: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "significance": self.significance,
            "require_commitment": self.require_commitment,
            "keys_audited": len(self.claimants),
            "bonferroni_significance": self.significance / max(1, len(self.claimants)),
            "claimants": [c.to_json() for c in self.claimants],
        }


def _labels(keys: Sequence[tuple[str, WatermarkKey]]) -> list[str]:
    """Display labels, kept apart: the owner label (else the file name), with the file name and key id
    added when two claimants would otherwise share a label."""
    base = [k.owner or Path(path).name for path, k in keys]
    return [f"{b} ({Path(path).name}, {k.key_id[:8]})" if base.count(b) > 1 else b
            for b, (path, k) in zip(base, keys, strict=True)]


def _commitment_status(key: WatermarkKey, commitments: Sequence[Commitment], model_time: datetime | None,
                       run_commitments: frozenset[str]) -> tuple[str, str]:
    from fedguard.watermark.commitment import commit

    c = commit(key)
    if c in run_commitments:
        return "recorded-in-run", "the model's own run state records this key's commitment (made at round 0)"
    for m in commitments:
        if m.commitment != c:
            continue
        if model_time is None:
            return "predates-model", f"matches a commitment made {m.created_at} (model time unknown)"
        if m.created < model_time:
            return "predates-model", (f"matches a commitment made {m.created_at}, before the model was written "
                                      f"({model_time.isoformat(timespec='seconds')})")
        return "after-model", (f"matches a commitment made {m.created_at}, after the model was written "
                               f"({model_time.isoformat(timespec='seconds')})")
    return "none", "no commitment given matches this key"


def audit_keys(
    model: torch.nn.Module, keys: Sequence[tuple[str, WatermarkKey]], *, model_name: str = "<model>",
    significance: float = DEFAULT_SIGNIFICANCE, base: torch.nn.Module | None = None,
    commitments: Sequence[Commitment] = (), model_time: datetime | None = None,
    run_commitments: frozenset[str] = frozenset(), require_commitment: bool = False, test: str = "binomial",
) -> OwnershipReport:
    """Verify each ``(key file, key)`` against an already loaded model.

    ``test``: the sign keys' test, chosen before looking (``"binomial"`` bit count, or ``"sign-flip"``:
    :func:`fedguard.watermark.verify.sign_flip_p_value`); the report names it.

    ``base``: the public starting model; every sign key's offsets and scales are recomputed on it
    (:mod:`fedguard.watermark.calibration`) and a key whose stated calibration differs — or cannot be
    recomputed — is refused whatever its bits say. ``commitments``/``run_commitments``: see
    :mod:`fedguard.watermark.commitment`; with ``require_commitment`` a claim also needs a commitment that
    predates the model (the defence against seed trying).
    """
    from fedguard.watermark import verify_key
    from fedguard.watermark.calibration import check_calibration
    from fedguard.watermark.keys import SignKey
    from fedguard.watermark.verify import check_significance

    significance = check_significance(significance)
    if not keys:
        raise ConfigError("an ownership audit needs at least one key")
    claims = []
    for label, (path, key) in zip(_labels(keys), keys, strict=True):
        detection = verify_key(model, key, significance, base=base, test=test if isinstance(key, SignKey) else "binomial")
        calibration = check_calibration(key, base) if isinstance(key, SignKey) else None
        status, detail = _commitment_status(key, commitments, model_time, run_commitments)
        committed = status in ("predates-model", "recorded-in-run")
        if calibration is not None and not calibration.accepted:
            claimed, reason = False, f"refused: {calibration.detail}"
        elif not detection.verdict:
            claimed, reason = False, f"no claim: p = {detection.p_value:.3g} > {significance:g}"
        elif require_commitment and not committed:
            claimed, reason = False, f"refused: no commitment predating the model ({detail})"
        else:
            claimed, reason = True, "ownership claimed" + ("" if committed else " (no prior commitment shown)")
        claims.append(Claim(label, path, detection, calibration, status, detail, claimed, reason))
    return OwnershipReport(model_name, significance, tuple(claims), require_commitment)


def model_written_at(model_dir: str | os.PathLike[str]) -> datetime | None:
    """When the model's weights were written (earliest modification time of its weight files), UTC."""
    names = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin")
    times = [(Path(model_dir) / n).stat().st_mtime for n in names if (Path(model_dir) / n).exists()]
    return datetime.fromtimestamp(min(times), UTC) if times else None


def commitments_in_run_state(model_dir: str | os.PathLike[str]) -> frozenset[str]:
    """Key commitments recorded in a fedguard checkpoint's ``state.json`` (the watermark hook's state)."""
    import json

    state = Path(model_dir) / "state.json"
    if not state.is_file():
        return frozenset()
    try:
        doc = json.loads(state.read_text())
    except ValueError:
        return frozenset()
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "key_commitments" and isinstance(v, list):
                    found.update(str(x) for x in v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    return frozenset(found)


def audit_ownership(
    model_dir: str | os.PathLike[str],
    key_files: Sequence[str | os.PathLike[str]],
    *,
    base: str | os.PathLike[str] | None = None,
    significance: float = DEFAULT_SIGNIFICANCE,
    commitment_files: Sequence[str | os.PathLike[str]] = (),
    require_commitment: bool = False,
    test: str = "binomial",
) -> OwnershipReport:
    """Load the model at ``model_dir``, its base (``base``, else an adapter's own base) and every key and
    commitment file (all checked before any verification); ``test``: see :func:`audit_keys`."""
    from fedguard.watermark.commitment import load_commitment
    from fedguard.watermark.keys import load_key
    from fedguard.watermark.loading import load_base, load_model, register_adapter_loader
    from fedguard_train.bottleneck import PEFT_TYPE, load_adapter

    register_adapter_loader(PEFT_TYPE, load_adapter)  # the trainer's Houlsby adapters

    keys = [(str(p), load_key(p)) for p in key_files]
    commitments = [load_commitment(p) for p in commitment_files]
    model = load_model(model_dir, base=base)
    base_model = load_base(model_dir, base)
    return audit_keys(model, keys, model_name=str(model_dir), significance=significance, base=base_model,
                      commitments=commitments, model_time=model_written_at(model_dir),
                      run_commitments=commitments_in_run_state(model_dir), require_commitment=require_commitment,
                      test=test)


def render_markdown(report: OwnershipReport, plot: str | None = PLOT_NAME) -> str:
    lines = [
        "# Ownership audit",
        "",
        f"Model: `{report.model}`  ",
        f"Significance: {report.significance:g} per key (Bonferroni for {len(report.claimants)} key(s): "
        f"{report.significance / len(report.claimants):g})",
        "",
        f"Commitment required: {'yes' if report.require_commitment else 'no'}",
        "",
        "| claimant | key id | scheme | matched | bit error rate | p-value | calibration | commitment | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in report.claimants:
        d = c.detection
        verdict = "**ownership claimed**" if c.claimed else c.reason
        cal = "n/a" if c.calibration is None else c.calibration.status
        lines.append(f"| {c.label} | `{d.key_id}` | {d.scheme} | {d.matched}/{d.bits} | {d.bit_error_rate:.3f} | "
                     f"{d.p_value:.3g} | {cal} | {c.commitment} | {verdict} |")
    lines += ["", "H0: the model was not trained with the key; under H0 each sign bit matches with probability "
              "1/2 and each backdoor trigger with probability at most V^-L, so the p-value is the exact "
              "binomial tail P[X >= matched]."
              + (" Sign keys here use the sign-flip test instead: given |z|, the key's signs are fair coins "
                 "under H0, and the p-value is the exact tail of sum_j b_j z_j over all sign vectors (computed "
                 "on a grid, rounded in the conservative direction)."
                 if any(c.detection.test == "sign-flip" for c in report.claimants) else ""), ""]
    lines += ["A sign key's offsets and scales are recomputed from the base model; a key that states others "
              "(a forgery: chosen offsets match any model) or whose calibration cannot be recomputed is refused. "
              "A claim is evidence against seed trying only with a commitment that predates the model.", ""]
    for c in report.claimants:
        d = c.detection
        if d.scheme != "sign":
            continue
        lines += [f"## Bit agreement per target block: {c.label}", "",
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
        for c in report.claimants:
            d = c.detection
            labels = [b.label.split(" (")[0] for b in d.blocks] if d.scheme == "sign" else ["triggers"]
            for lab in labels:
                if lab not in all_labels:
                    all_labels.append(lab)
        index = {lab: i for i, lab in enumerate(all_labels)}
        for k, c in enumerate(report.claimants):
            d = c.detection
            if d.scheme == "sign":
                xs = [index[b.label.split(" (")[0]] + (k - (n - 1) / 2) * width for b in d.blocks]
                ys = [b.agreement for b in d.blocks]
            else:
                xs = [index["triggers"] + (k - (n - 1) / 2) * width]
                ys = [d.matched / d.bits]
            tag = "claimed" if c.claimed else "no claim"
            ax.bar(xs, ys, width=width, label=f"{c.label} ({tag}, p={d.p_value:.2g})")
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
    p.add_argument("--base", default=None, help="the public starting model (default: a peft adapter's own base; "
                   "needed for a full model: every sign key's offsets are recomputed on it)")
    p.add_argument("--key", action="append", required=True, help="a claimant's key file (repeatable)")
    p.add_argument("--significance", type=float, default=DEFAULT_SIGNIFICANCE)
    p.add_argument("--out", default="ownership-audit", help="report directory (JSON, Markdown, PNG)")
    p.add_argument("--commitment", action="append", default=[],
                   help="a published key commitment file (repeatable; see fedguard.watermark.commitment)")
    p.add_argument("--require-commitment", action="store_true",
                   help="a claim also needs a commitment that predates the model")
    p.add_argument("--json", action="store_true", help="print the JSON report to stdout and write no files")
    p.add_argument("--test", choices=("binomial", "sign-flip"), default="binomial",
                   help="sign keys' test (fix it before looking): the bit count, or the sign-flip test of "
                        "sum_j b_j z_j that also weighs each bit's margin (docs/watermark.md)")
    p.set_defaults(handler=run_audit)


def run_audit(args: Any) -> int:
    """Handler of ``fedguard audit ownership``: writes the report and prints it (0 on success)."""
    import json

    report = audit_ownership(args.model, args.key, base=args.base, significance=args.significance,
                             commitment_files=args.commitment, require_commitment=args.require_commitment,
                             test=args.test)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    paths = write_ownership_report(report, args.out)
    for c in report.claimants:
        print(f"{c.detection.summary()}; {c.reason}")
    print(f"report: {paths.markdown} ({paths.json.name}, {', '.join(p.name for p in paths.plots)})")
    return 0
