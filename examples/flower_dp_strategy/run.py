"""Run the DP example on Flower's Deployment Engine on this machine (TLS SuperLink + 3 SuperNodes).

    python examples/flower_dp_strategy/run.py [--rounds 20] [--max-epsilon 3] [--out DIR]

Prints ε after every round and where the budget stopped the run; every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from fedguard_train.flower.launcher import FlowerProcesses

APP = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--max-epsilon", type=float, default=3.0)
    parser.add_argument("--noise-multiplier", type=float, default=3.0)
    parser.add_argument("--out", default=None, help="working directory (default: a new temporary one)")
    parser.add_argument("--insecure-test-mode", action="store_true")
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="fedguard-dp-example-")).absolute()  # Flower runs in it
    result = work / "result.json"
    with FlowerProcesses(work, insecure_test_mode=args.insecure_test_mode) as flower:
        flower.start_superlink()
        for k in range(3):
            flower.start_supernode(f"supernode-{k}", f"partition-id={k}")
        code = flower.flwr_run(APP, timeout=1800, run_config={
            "num-rounds": args.rounds, "max-epsilon": args.max_epsilon, "noise-multiplier": args.noise_multiplier,
            "ledger": str(work / "privacy_ledger.json"), "result": str(result)})
    print(json.dumps(json.loads(result.read_text()) if result.exists() else {"flwr run exit": code}, indent=1))


if __name__ == "__main__":
    main()
