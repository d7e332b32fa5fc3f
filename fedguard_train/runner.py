"""Running a configured job for a person: progress bar, per-round table, run directory, report."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fedguard.console import Column, RoundTable
from fedguard_train.config import TrainConfig
from fedguard_train.privacy import hooks_from_config
from fedguard_train.report import write_report
from fedguard_train.trainers.homo import FedHomoLLM, RunResult, run_local

ROUND_COLUMNS = [
    Column("round", "round", "{:d}", 5),
    Column("train_loss", "train loss", "{:.4f}", 10),
    Column("rougeL", "ROUGE-L", "{:.2f}", 8),
    Column("bleu4", "BLEU-4", "{:.2f}", 7),
    Column("perplexity", "ppl", "{:.2f}", 8),
    Column("epsilon", "epsilon", "{:.3f}", 8),
    Column("wm_bits", "wm bits", "{}", 8),
    Column("wm_owners", "owners", "{}", 6),
    Column("kib_up", "KiB up", "{:.1f}", 9),
    Column("kib_down", "KiB down", "{:.1f}", 9),
    Column("seconds", "seconds", "{:.1f}", 8),
]

# FATE-LLM Tables 1-2 (ChatGLM-6B): Federated, Centralized, Client-1, Client-2
PAPER = {
    "lora": {"rouge1": (32.331, 32.384, 31.824, 31.764), "rouge2": (7.740, 8.150, 7.849, 7.765),
             "rougeL": (25.600, 25.830, 25.408, 25.404)},
    "p-tuning-v2": {"rouge1": (32.227, 32.184, 31.362, 31.18), "rouge2": (7.644, 8.048, 7.472, 7.478),
                    "rougeL": (25.853, 26.010, 25.454, 25.227)},
}


class _Table(RoundTable):
    """The round table beside the progress bar: byte counts in KiB; epsilon when the run has a ``dp:``
    section; with a ``watermark:`` section, the fewest bits matched by any client's key ("wm bits") and
    how many clients' ownership claims hold at p <= 1e-6 ("owners")."""

    def __init__(self, config: TrainConfig) -> None:
        hidden = set()
        if not config.dp:
            hidden.add("epsilon")
        if not config.watermark:
            hidden |= {"wm_bits", "wm_owners"}
        super().__init__([c for c in ROUND_COLUMNS if c.key not in hidden], write=_write_line)

    def shown(self, values: dict[str, Any]) -> dict[str, Any]:
        shown = dict(values)
        if "bytes_up" in shown:
            shown["kib_up"] = shown["bytes_up"] / 1024
            shown["kib_down"] = shown["bytes_down"] / 1024
        matched = shown.get("watermark_matched")
        if matched:
            shown["wm_bits"] = f"{min(matched)}/{shown['watermark_bits']}"
            shown["wm_owners"] = f"{shown['watermark_verified']}/{len(matched)}"
        return shown


def _write_line(line: str) -> None:
    tqdm.write(line)
    sys.stdout.flush()  # rows appear as they happen, also when stdout is a file


def run_training(config: TrainConfig, *, resume: bool = False, quiet: bool = False) -> RunResult:
    """Train with a progress bar and a per-round table; write metrics.jsonl, checkpoints and report.md."""
    total = config.federation.rounds * config.federation.clients * config.training.local_steps
    bar = tqdm(total=total, desc="local steps", unit="step", disable=quiet, leave=False)

    def step(loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    trainer = FedHomoLLM(config, hooks=hooks_from_config(config), quiet=quiet, on_step=step)
    if not quiet:
        tqdm.write(f"{config.federation.clients} clients, adapter {config.adapter.method}: "
                   f"{trainer.counts['trainable']:,} travelling parameters of {trainer.counts['total']:,} "
                   f"({100 * trainer.counts['share']:.3f}%)")
        for part in trainer.partition:
            tqdm.write(f"  client {part['client']}: {part['examples']} examples; {part['top']}")
    table = _Table(config) if not quiet else None
    result = trainer.run(resume=resume, table=table)
    bar.close()
    report = write_report(Path(config.run_dir), config=config.to_dict(), history=result.history,
                          baseline=result.baseline, partition=trainer.partition, counts=trainer.counts)
    if not quiet:
        tqdm.write(f"run directory: {config.run_dir} (report: {report})")
    return result


def compare_modes(config: TrainConfig, out: Path) -> dict[str, Any]:
    """Federated vs centralized vs each client alone, same total steps, same test split (Tables 1-2)."""
    base = Path(config.run_dir)
    fed = FedHomoLLM(replace(config, mode="federated", run_dir=str(base / "federated")), quiet=True).run()
    central_cfg = replace(config, mode="centralized", run_dir=str(base / "centralized"),
                          training=replace(config.training,
                                           local_steps=config.training.local_steps * config.federation.clients))
    central = FedHomoLLM(central_cfg, quiet=True).run()
    local_rows = run_local(replace(config, mode="local", run_dir=str(base / "local")))
    columns = {"Federated": fed.history[-1], "Centralized": central.history[-1]}
    columns.update({f"Client-{r['client'] + 1}": r for r in local_rows})
    columns["Before training"] = fed.baseline  # the base model with the freshly initialised adapter
    metrics = ["rouge1", "rouge2", "rougeL", "bleu4", "perplexity"]
    table = {name: {m: round(float(row[m]), 3) for m in metrics} for name, row in columns.items()}
    names = list(table)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {m} | " + " | ".join(f"{table[n][m]:.3f}" for n in names) + " |" for m in metrics]
    paper = PAPER.get(config.adapter.method)
    if paper:
        lines += ["", f"FATE-LLM ({config.adapter.method}, ChatGLM-6B): Federated / Centralized / Client-1 / Client-2",
                  *[f"- {m}: " + " / ".join(str(v) for v in vals) for m, vals in paper.items()]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    (out.with_suffix(".json")).write_text(json.dumps(table, indent=2))
    return table
