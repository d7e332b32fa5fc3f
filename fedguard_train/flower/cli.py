"""``fedguard flower run CONFIG.yaml``: the config's job on Flower's Deployment Engine, on this machine.

Starts a TLS-secured ``flower-superlink``, one ``flower-supernode`` + fedguard worker per client, runs
the job with ``flwr run``, prints the round table and stops every process it started (also on Ctrl-C or
an error). ``--insecure-test-mode`` drops TLS: for tests only. See docs/flower.md and docs/deployment.md.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedguard.cli import Commands


def register(commands: Commands) -> None:
    p = commands.subcommand("flower", "run", help="run a training config over Flower's Deployment Engine "
                            "(SuperLink + one SuperNode per client on this machine, TLS)",
                            group_help="fedguard on Flower")
    p.add_argument("config", help="YAML run configuration (e.g. examples/flower_homo_lora.yaml)")
    runs = p.add_mutually_exclusive_group()
    runs.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    runs.add_argument("--overwrite", action="store_true", help="replace an existing run in the run directory")
    p.add_argument("--run-dir", help="override run_dir of the config")
    p.add_argument("--stage-timeout", type=float, default=120.0,
                   help="seconds a protocol stage waits for answers; a silent client is a dropout (default 120)")
    p.add_argument("--first-timeout", type=float, default=3600.0,
                   help="seconds the first stage of a round waits (it includes local training; default 3600)")
    p.add_argument("--join-timeout", type=float, default=600.0,
                   help="seconds to wait for every client to join before round 1 (default 600)")
    p.add_argument("--poll", type=float, default=0.1,
                   help="seconds between Flower's polls for messages (SuperNodes, SuperExec, ServerApp; "
                        "0.01-60, default 0.1; raise it for hundreds of SuperNodes)")
    p.add_argument("--superlink-restarts", type=int, default=2,
                   help="restart a SuperLink that dies and resume the run from its checkpoint, at most this "
                        "many times (default 2; 0: never)")
    p.add_argument("--no-prefork", action="store_true",
                   help="let Flower start every flwr-clientapp as a new interpreter (~2 s of CPU per message) "
                        "instead of forking it from a per-SuperNode server that has Flower imported")
    p.add_argument("--insecure-test-mode", action="store_true",
                   help="no TLS between the processes (tests on one machine only; never on a network)")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from fedguard_train.cli import _load
    from fedguard_train.flower.launcher import FlowerOptions, run_deployment

    config = _load(args)
    options = FlowerOptions(insecure_test_mode=args.insecure_test_mode, stage_timeout=args.stage_timeout,
                            first_timeout=args.first_timeout, join_timeout=args.join_timeout,
                            poll=args.poll, superlink_restarts=args.superlink_restarts,
                            prefork=not args.no_prefork)
    summary = run_deployment(config, options, resume=args.resume, overwrite=args.overwrite)
    for row in summary.get("history", []):
        print(json.dumps(row))
    for client, stage, reason in summary.get("drops", []):
        print(f"client {client} dropped at stage {stage!r}: {reason}")
    if summary.get("superlink_restarts"):
        print(f"the SuperLink was restarted {summary['superlink_restarts']} time(s); the run resumed from its checkpoint")
    print(f"flower run {summary['status']}: {config.run_dir} (logs: {config.run_dir}/flower/logs)")
    return 0 if summary["status"] == "completed" else 1
