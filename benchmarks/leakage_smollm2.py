"""Membership inference on SmolLM2 at scale (issue 19): the private example (masking + distributed DP) and the
demo (plaintext, no DP), trained as the examples say and audited with ``fedguard audit leakage``.

    .venv/bin/python benchmarks/leakage_smollm2.py train --out DIR          # both runs (heavy: queue it)
    .venv/bin/python benchmarks/leakage_smollm2.py audit --out DIR [...]    # the audits (heavy: queue it)

``train`` copies ``examples/homo_lora_private.yaml`` and ``examples/homo_lora.yaml`` with two changes only —
``run_dir`` (under ``DIR/runs``) and ``eval.every: 3`` (the held-out evaluation at rounds 0 and 3 instead
of every round; the trainer reseeds every client-round, so the trained model does not depend on it) — and
trains them with ``fedguard train``. ``audit`` runs the membership suite of ``fedguard audit leakage``
(:func:`audits.leakage.membership_on_run`) on each run's final global model: members = every example a client
trained on (replayed from the seeded batch order), non-members and RMIA's population from a held-out pool
enlarged from the same seeded WordNet draw (same distribution), LiRA with LoRA shadow fine-tunes on the runs
named by ``--lira``; it writes the reports under ``DIR/audit/<run>/`` and copies their JSON to
``benchmarks/results/leakage_smollm2_<run>.json``.
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RUNS = {"private": "examples/homo_lora_private.yaml", "demo": "examples/homo_lora.yaml"}


def _uptime() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def derived_config(name: str, out: Path) -> Path:
    """The example's config with only ``run_dir`` and ``eval.every`` changed (see the module docstring)."""
    raw = yaml.safe_load((ROOT / RUNS[name]).read_text())
    raw["run_dir"] = str(out / "runs" / name)
    raw.setdefault("eval", {})["every"] = 3
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _fedguard(*args: str) -> float:
    start = time.time()
    print(f"$ fedguard {' '.join(args)}   (load {_uptime()})", flush=True)
    subprocess.run([str(ROOT / ".venv/bin/fedguard"), *args], check=True, cwd=ROOT)
    took = time.time() - start
    print(f"  {took:.0f} s (load {_uptime()})", flush=True)
    return took


def train(args: argparse.Namespace) -> None:
    out = Path(args.out)
    for name in args.runs:
        cfg = derived_config(name, out)
        if (out / "runs" / name / "checkpoints").exists():
            print(f"{name}: already trained in {out / 'runs' / name}; not overwritten")
            continue
        _fedguard("train", str(cfg))


def audit(args: argparse.Namespace) -> None:
    """:func:`audits.leakage.membership_on_run` on each run, in one process (the base model scores the shared
    members / non-members / population once: both runs have the same seed, data and initial adapter), the
    reports written as ``fedguard audit leakage`` writes them; timings and load in ``audit_times.json``."""
    from attacks.run_view import load_run
    from audits.leakage import membership_on_run, write_leakage_report

    out = Path(args.out)
    results = ROOT / "benchmarks" / "results"
    cache_file = out / "reference_stats.pkl"  # this script's own file: the base model's scores, kept for the next call
    cache: dict = pickle.loads(cache_file.read_bytes()) if cache_file.is_file() else {}
    times_file = out / "audit_times.json"
    times: dict[str, dict[str, object]] = json.loads(times_file.read_text()) if times_file.is_file() else {}
    for name in args.runs:
        start, load = time.time(), _uptime()
        run = load_run(out / "runs" / name, extra_heldout=args.extra_nonmembers)
        shadows = args.shadows if name in args.lira else 0
        report = membership_on_run(run, shadows=shadows, n_boot=args.n_boot, seed=0, max_members=100_000,
                                   member_set="seen", population=args.population,
                                   lira_nonmembers=args.lira_nonmembers if shadows else 0, stats_cache=cache,
                                   progress=True)
        notes = [f"held-out pool: the run's {run.config.data.test_size} test examples plus {args.extra_nonmembers} "
                 "WordNet pairs the run never loaded, from the same seeded draw (same distribution)"]
        if run.config.dp is not None:
            notes.append("the run used DP: its privacy ledger states ε; the attacks above measure what it buys")
        paths = write_leakage_report(out / "audit" / name, "leakage", "Leakage audit (membership)", run, [report],
                                     [], notes)
        shutil.copyfile(paths.json, results / f"leakage_smollm2_{name}.json")
        times[name] = {"seconds": round(time.time() - start, 1), "load_start": load, "load_end": _uptime()}
        print(f"{name}: {times[name]}", flush=True)
        for r in report.results:
            t1, c1 = r.roc.tpr_at[0.01], r.roc.tpr_ci[0.01]
            print(f"  {r.attack:9s} AUC {r.roc.auc:.3f} [{r.roc.auc_ci[0]:.3f}, {r.roc.auc_ci[1]:.3f}]  TPR@1% "
                  f"{100 * t1:.1f}% [{100 * c1[0]:.1f}, {100 * c1[1]:.1f}]  TPR@0.1% {100 * r.roc.tpr_at[0.001]:.1f}%"
                  f"  (n {r.roc.n_members}/{r.roc.n_nonmembers})", flush=True)
        times_file.write_text(json.dumps(times, indent=1))
        cache_file.write_bytes(pickle.dumps(cache))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", required=True)
    t.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=["private", "demo"])
    a = sub.add_parser("audit")
    a.add_argument("--out", required=True)
    a.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=["private", "demo"])
    a.add_argument("--extra-nonmembers", type=int, default=1176, help="24 test + 1,176 = 1,200 held out")
    a.add_argument("--population", type=int, default=200, help="RMIA's population; the rest are non-members")
    a.add_argument("--shadows", type=int, default=4)
    a.add_argument("--lira", nargs="*", choices=sorted(RUNS), default=["demo"], help="runs attacked with LiRA")
    a.add_argument("--lira-nonmembers", type=int, default=100)
    a.add_argument("--n-boot", type=int, default=1000)
    args = p.parse_args(argv)
    {"train": train, "audit": audit}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
