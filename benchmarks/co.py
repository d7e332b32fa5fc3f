"""FedCoLLM server-step cost beside its anchor, one client's local round, and the bytes a round moves.

    .venv/bin/python benchmarks/co.py             # examples/co_smollm2.yaml (SmolLM2-135M LLM, 8-block small)
    .venv/bin/python benchmarks/co.py --quick     # tiny random Llamas, seconds

Anchor: one client's local round of the same run (``training.local_steps`` AdamW steps of the small model's
LoRA on its private batches, DeepSpeed engine set-up included) — what FedHomoLLM costs a client per round.
Measured in ``--cycles`` interleaved cycles, in this order: client round, server step (``co.server_steps``
mutual-KD steps, both directions), the FedMKT logits broadcast (the LLM's top-k on ``co.logits_examples``
public items, encoded as a wire message and decoded); the fastest cycle's time counts for each (contention
slows a cycle, never speeds it up). Bytes: the small adapter's fp32 values (what a client's plaintext update
carries), the LLM adapter's (which never travels), and the logits message's real encoded size per client.

Writes benchmarks/results/co.json (``--quick``: co_quick.json) and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _config(quick: bool, run_dir: str) -> Any:
    import yaml

    from fedguard_train.config import TrainConfig

    raw = yaml.safe_load((ROOT / "examples" / "co_smollm2.yaml").read_text())
    raw["run_dir"] = run_dir
    raw["co"]["send_logits"] = True
    if quick:
        raw["model"] = {"name_or_path": "tiny:llama"}
        raw["co"].update(server_model="tiny:llama:8", small_layers=1, public_examples=32, public_seq_len=32)
        raw["data"]["max_examples"] = 200
    return TrainConfig.from_dict(raw)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random models instead of SmolLM2")
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 under heavy contention)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from fedguard_train.trainers.co import FedCoLLM

    with tempfile.TemporaryDirectory(prefix="fedguard-co-bench-") as tmp:
        config = _config(args.quick, tmp)
        trainer = FedCoLLM(config, quiet=True)
        try:
            start = trainer.global_vector()
            times: dict[str, list[float]] = {"client_round": [], "server_step": [], "logits_broadcast": []}
            for cycle in range(args.cycles):
                trainer.load(start)
                t0 = time.perf_counter()
                trainer.local_train(1, 0, start)
                times["client_round"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                trainer.server_step(1, None)  # type: ignore[arg-type]  # reads no client result
                times["server_step"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                trainer.broadcast_logits(1)
                times["logits_broadcast"].append(time.perf_counter() - t0)
                print(f"cycle {cycle + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
            best = {k: min(v) for k, v in times.items()}
            small_values, llm_values = trainer.layout.size, trainer.llm_layout.size
            co = config.co
            assert co is not None  # noqa: S101  (the example has a co: section)
            out: dict[str, Any] = {
                "quick": args.quick, "cycles": args.cycles, "threads": args.threads, "load_avg": os.getloadavg(),
                "server_steps": co.server_steps, "server_batch_size": co.server_batch_size,
                "local_steps": config.training.local_steps, "batch_size": config.training.batch_size,
                "seconds": times, "fastest": best,
                "server_step_over_client_round": best["server_step"] / best["client_round"],
                "logits_over_client_round": best["logits_broadcast"] / best["client_round"],
                "small_adapter_values": small_values, "llm_adapter_values": llm_values,
                "small_adapter_fp32_bytes": 4 * small_values, "llm_adapter_fp32_bytes": 4 * llm_values,
                "logits_message_bytes_per_client": trainer.logits_message_bytes,
                "logits_examples": co.logits_examples, "top_k": co.top_k,
                "logits_over_adapter_bytes": trainer.logits_message_bytes / (4 * small_values),
            }
        finally:
            trainer.close()
    print(f"server step ({out['server_steps']} KD steps, both directions) / one client's round "
          f"({out['local_steps']} steps): {out['server_step_over_client_round']:.2f}x; logits broadcast / client "
          f"round: {out['logits_over_client_round']:.2f}x; logits message {out['logits_message_bytes_per_client']:,} B "
          f"per client = {out['logits_over_adapter_bytes']:.2f}x the small adapter's fp32 bytes "
          f"({out['small_adapter_fp32_bytes']:,} B); load {out['load_avg'][0]:.1f}")
    name = "co_quick.json" if args.quick else "co.json"
    (ROOT / "benchmarks" / "results" / name).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
