"""Running a configured job for a person: progress bar, per-round table, run directory, report."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fedguard.console import Column, RoundTable
from fedguard.errors import ConfigError
from fedguard_train.config import TrainConfig
from fedguard_train.privacy import hooks_from_config
from fedguard_train.report import write_report
from fedguard_train.trainers import trainer_class
from fedguard_train.trainers.base import RunResult, Trainer, prepare_run_dir

ROUND_COLUMNS = [
    Column("round", "round", "{:d}", 5),
    Column("train_loss", "train loss", "{:.4f}", 10),
    Column("sampled", "sampled", "{:d}", 7),  # client sampling: the round's sample size (0: a noise-only round)
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
        if all(v is None for v in config.sampling_options.values()):
            hidden.add("sampled")
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


class ConsoleObserver:
    """A progress bar over the local steps to come (started when training starts, so set-up messages and
    errors are never glued to it) and the round table beside it."""

    def __init__(self, table: RoundTable | None, *, quiet: bool = False) -> None:
        self.table = table
        self.quiet = quiet
        self.bar: Any = None

    def start(self, total_steps: int) -> None:
        self.close()
        self.bar = tqdm(total=total_steps, desc="local steps", unit="step", disable=self.quiet, leave=False)

    def step(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}")

    def row(self, values: dict[str, Any]) -> None:
        if self.table is not None:
            self.table.row(values)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def build_trainer(config: TrainConfig, *, quiet: bool = False) -> Trainer:
    """The trainer the config's ``trainer:`` key selects, with the privacy hooks its sections ask for."""
    return trainer_class(config.trainer)(config, hooks=hooks_from_config(config), quiet=quiet)


def run_training(config: TrainConfig, *, resume: bool = False, overwrite: bool = False,
                 quiet: bool = False) -> RunResult:
    """Train with a progress bar and a per-round table; write metrics.jsonl, checkpoints and report.md.

    An existing run in ``run_dir`` is refused (before any model loads) unless ``resume`` or ``overwrite``."""
    # refuse before any model loads; the old run's files go only when the new run starts
    prepare_run_dir(Path(config.run_dir), resume=resume, overwrite=overwrite, remove=False)
    trainer = build_trainer(config, quiet=quiet)
    if not quiet:
        tqdm.write(f"{trainer.title}: {config.n_parties} {'party' if config.n_parties == 1 else 'clients'}, "
                   f"adapter {trainer.adapter_label}, aggregator {trainer.aggregator_label}: "
                   f"{trainer.counts['trainable']:,} travelling parameters of {trainer.counts['total']:,} "
                   f"({100 * trainer.counts['share']:.3f}%)")
        for part in trainer.partition:
            tqdm.write(f"  client {part['client']}: {part['examples']} examples; {part['top']}")
    observer = ConsoleObserver(_Table(config) if not quiet else None, quiet=quiet)
    label = trainer.aggregator_label
    try:
        result = trainer.run(resume=resume, overwrite=overwrite, observer=observer)
    finally:
        observer.close()
    report = write_report(Path(config.run_dir), config=config.to_dict(), history=result.history,
                          baseline=result.baseline, partition=trainer.partition, counts=trainer.counts,
                          title=trainer.title, aggregator=label)
    if not quiet:
        tqdm.write(f"run directory: {config.run_dir} (report: {report})")
    return result


def compare_modes(config: TrainConfig, out: Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Federated vs centralized vs each client alone, same total steps, same test split (Tables 1-2).

    The columns compare the training methods themselves, so ``dp:`` and ``watermark:`` sections are
    refused here (client-level DP has no meaning for one centralized party or a client alone); run them
    with ``fedguard train``. The one-party columns (centralized, each client alone) aggregate nothing, so
    they use ``plaintext`` whatever the federated column's aggregator; every trainer is built (and its
    configuration checked) before any of them trains."""
    privacy = [f"{name}:" for name in ("dp", "watermark") if getattr(config, name) is not None]
    if privacy:
        raise ConfigError(f"train-compare compares the plain methods (paper Tables 1-2) and does not apply a "
                          f"{' or '.join(privacy)} section: remove it, or run `fedguard train` with it")
    base = Path(config.run_dir)
    for name in ("federated", "centralized"):  # refuse before training anything
        prepare_run_dir(base / name, resume=False, overwrite=overwrite, remove=False)
    one_party = replace(config.federation, aggregator="plaintext", aggregator_options={})
    central_cfg = replace(config, mode="centralized", run_dir=str(base / "centralized"), federation=one_party,
                          training=replace(config.training,
                                           local_steps=config.training.local_steps * config.federation.clients))
    trainers = [build_trainer(replace(config, mode="federated", run_dir=str(base / "federated")), quiet=True)]
    try:
        trainers.append(build_trainer(central_cfg, quiet=True))
        trainers.append(build_trainer(replace(config, mode="federated", run_dir=str(base / "local"),
                                              federation=one_party), quiet=True))
        fed = trainers[0].run(overwrite=overwrite)
        central = trainers[1].run(overwrite=overwrite)
        local_rows = trainers[2].run_local()
    finally:
        for trainer in trainers:
            trainer.close()
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
