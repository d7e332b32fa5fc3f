"""``fedguard train CONFIG.yaml [--resume | --overwrite]`` and ``fedguard train-compare CONFIG.yaml``.

Both dispatch on the config's ``trainer:`` key (``homo``: FedHomoLLM; see ``fedguard_train.trainers``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedguard.cli import Commands
    from fedguard_train.config import TrainConfig


def register(commands: Commands) -> None:
    p = commands.command("train", help="run a federated fine-tuning job (the config's trainer) from a YAML config")
    p.add_argument("config", help="YAML run configuration (see examples/homo_lora.yaml)")
    runs = p.add_mutually_exclusive_group()
    runs.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    runs.add_argument("--overwrite", action="store_true",
                      help="replace an existing run in the run directory (its watermark keys are kept)")
    p.add_argument("--run-dir", help="override run_dir of the config")
    p.set_defaults(handler=_train)
    c = commands.command("train-compare", help="federated vs centralized vs each client alone (Tables 1-2)")
    c.add_argument("config", help="YAML run configuration (mode is ignored)")
    c.add_argument("--out", help="where to write the comparison (default: <run_dir>/comparison.md)")
    c.add_argument("--run-dir", help="override run_dir of the config")
    c.add_argument("--overwrite", action="store_true", help="replace earlier comparison runs in the run directory")
    c.set_defaults(handler=_compare)


def _load(args: argparse.Namespace) -> TrainConfig:
    from fedguard_train.config import TrainConfig

    config = TrainConfig.from_yaml(args.config)
    if getattr(args, "run_dir", None):
        config = TrainConfig.from_dict({**config.to_dict(), "run_dir": args.run_dir})
    return config


def _train(args: argparse.Namespace) -> int:
    from fedguard_train.runner import run_training

    run_training(_load(args), resume=args.resume, overwrite=args.overwrite)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fedguard_train.runner import compare_modes

    config = _load(args)
    out = Path(args.out) if args.out else Path(config.run_dir) / "comparison.md"
    table = compare_modes(config, out, overwrite=args.overwrite)
    print(json.dumps(table, indent=2))
    return 0
