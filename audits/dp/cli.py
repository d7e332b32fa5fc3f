"""``fedguard audit dp CONFIG.yaml --canaries M``: train once with canaries, bound ε from below.

Registered through the ``fedguard.commands`` entry point ``audit-dp = "audits.dp.cli:register_cli"``. The
audit's training run goes to ``<out>/run`` (never the config's own ``run_dir``); the report to ``<out>``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DEFAULT_OUT = "dp-audit"


def register_cli(commands: Any) -> None:
    """Register ``fedguard audit dp``."""
    p = commands.subcommand("audit", "dp", help="lower bound on epsilon from one training run with canaries",
                            group_help="audits with reports (ownership, DP, leakage)")
    p.add_argument("config", help="YAML run configuration with a dp: section")
    p.add_argument("--canaries", type=int, default=200, help="number of canaries m (default 200)")
    p.add_argument("--level", choices=("client", "example"), default="client",
                   help="client: canary clients in DP-FedAvg (the dp: section); example: canary examples in one "
                        "client's DP-SGD (Opacus)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the bound (default 0.95)")
    p.add_argument("--guesses", type=int, default=None,
                   help="a number of guesses fixed in advance (default: a grid with Bonferroni correction)")
    p.add_argument("--canary-norm", type=float, default=None,
                   help="client canaries: update norm as a multiple of the clip norm (default 1; 10 with --break clip)")
    p.add_argument("--break", dest="breaks", choices=("noise", "clip"), default=None,
                   help="TESTING: silently weaken the mechanism (noise / 10, or no clipping) to see the audit catch it")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"report directory (default {DEFAULT_OUT}); the run goes to OUT/run")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier audit run in OUT/run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_audit)


def run_audit(args: argparse.Namespace) -> int:
    """Handler of ``fedguard audit dp``: runs the audit, writes the report, prints the verdict line."""
    from audits.dp.bound import bound_summary
    from audits.dp.report import verdict, write_dp_report
    from fedguard_train.config import TrainConfig
    from fedguard_train.runner import ConsoleObserver
    from fedguard_train.trainers.base import prepare_run_dir

    config = TrainConfig.from_yaml(args.config)
    out = Path(args.out)
    run_dir = out / "run"
    prepare_run_dir(run_dir, resume=False, overwrite=args.overwrite, remove=False)  # refuse before any model loads
    observer = ConsoleObserver(None, quiet=args.quiet)
    try:
        if args.level == "client":
            from audits.dp.client import ClientAuditSettings, audit_client_level

            settings = ClientAuditSettings(canaries=args.canaries, canary_norm=args.canary_norm,
                                           confidence=args.confidence, guesses=args.guesses, breaks=args.breaks)
            result = audit_client_level(config, settings, run_dir=run_dir, overwrite=args.overwrite,
                                        observer=observer, quiet=args.quiet)
        else:
            from audits.dp.example import ExampleAuditSettings, audit_example_level

            ex_settings = ExampleAuditSettings(canaries=args.canaries, confidence=args.confidence,
                                               guesses=args.guesses, breaks=args.breaks)
            result = audit_example_level(config, ex_settings, progress=None if args.quiet else observer)
    finally:
        observer.close()
    paths = write_dp_report([result], out)
    print(bound_summary(result.bound, result.epsilon_accountant))
    print(f"{verdict(result)}; report: {paths.markdown} ({paths.json.name}, {', '.join(p.name for p in paths.plots)})")
    return 0
