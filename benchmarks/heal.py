"""Healing the layer-dropped SmolLM2 (fedguard_train/healing.py): its one-off cost and what it buys.

    .venv/bin/python benchmarks/heal.py                       # 8 of 30 blocks, the examples' healing recipe
    .venv/bin/python benchmarks/heal.py --keep 10 --steps 200
    .venv/bin/python benchmarks/heal.py --quick               # tiny random Llama, seconds

Heals (or loads from ``$FEDGUARD_CACHE/healed``) the layer-dropped model of ``--keep`` blocks, then scores on
the held-out split of ``--config`` (the FedHeteroLLM/FedCoLLM examples' WordNet test split: the same 16
examples, greedy, 16 new tokens) side by side, in one process: the full model (the anchor: the teacher the
dropped model is healed towards), the layer-dropped model before healing, and after. Also the healing
text's held-out perplexity for the three (from healing itself), and the healing's seconds (0 when cached:
delete the cache directory to time it again).

Writes benchmarks/results/heal_<keep>.json (``--quick``: heal_quick.json) and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "examples" / "co_smollm2.yaml"))
    parser.add_argument("--keep", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="default: the config's co.small_heal.steps")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--data", default=None)
    parser.add_argument("--quick", action="store_true", help="a tiny random 6-block Llama instead of SmolLM2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--time-steps", type=int, default=5,
                        help="when the healing comes from the cache: time this many healing steps here (on a "
                             "throwaway copy) to measure the one-off cost on this machine")
    args = parser.parse_args()
    import dataclasses

    import torch
    import yaml

    torch.set_num_threads(args.threads)
    from fedguard_train.config import HealSection, ModelConfig, TrainConfig
    from fedguard_train.data import load_examples, tokenize, train_test_split
    from fedguard_train.emulator import EmulatorRecipe, build_emulator, fingerprint, load_server_model
    from fedguard_train.healing import even_blocks, healed_model
    from fedguard_train.metrics import evaluate

    raw = yaml.safe_load(Path(args.config).read_text())
    raw["run_dir"] = "/tmp/unused"
    config = TrainConfig.from_dict(raw)
    section = (config.co.small_heal if config.co is not None else None) or HealSection()
    changes: dict[str, Any] = {k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("data", args.data))
                               if v is not None}
    keep = args.keep
    if args.quick:
        changes.update(steps=20, batch_size=2, seq_len=32)
        keep = 2
    section = dataclasses.replace(section, **changes)
    name = "tiny:llama:6" if args.quick else "smollm2"
    full, tokenizer = load_server_model(ModelConfig(name_or_path=name), seed=0)
    examples = load_examples(config.data, seed=config.seed)
    _, test = train_test_split(examples, config.data.test_size, seed=config.seed)
    test = test[: config.eval.examples]
    items = tokenize(test, tokenizer, config.data)
    kept = even_blocks(len(full.model.layers), keep)
    dropped = build_emulator(full, EmulatorRecipe("llama", len(full.model.layers), 0, 0, 0.0, kept, fingerprint(full)))
    start = time.perf_counter()
    healed, info = healed_model(full, tokenizer, keep, section, progress=True)
    wall = time.perf_counter() - start
    step_seconds = None
    if info.cached and args.time_steps > 0:  # the one-off cost here: a few steps of the same recipe, timed
        from fedguard_train.emulator import windows
        from fedguard_train.healing import heal, heal_stream

        copy = build_emulator(full, EmulatorRecipe("llama", len(full.model.layers), 0, 0, 0.0, kept, "timing"))
        chunks = windows(heal_stream(section.data, tokenizer, section.seq_len * section.batch_size * (args.time_steps + 2)),
                         section.seq_len)
        heal(full, copy, kept, chunks, dataclasses.replace(section, steps=1), progress=False)  # warm-up step
        tick = time.perf_counter()
        heal(full, copy, kept, chunks, dataclasses.replace(section, steps=args.time_steps), progress=False)
        step_seconds = (time.perf_counter() - tick) / args.time_steps
        del copy
        print(f"healing here: {step_seconds:.2f} s per step ({args.time_steps} steps timed, {args.threads} threads) -> "
              f"{step_seconds * section.steps / 60:.1f} min for the recipe's {section.steps} steps; load {os.getloadavg()}")
    rows: dict[str, Any] = {}
    for label, model in (("full", full), ("dropped", dropped), ("healed", healed)):
        scores = evaluate(model, tokenizer, test, items, max_new_tokens=config.eval.max_new_tokens)
        rows[label] = {k: scores[k] for k in ("rouge1", "rouge2", "rougeL", "bleu4", "perplexity")}
        rows[label]["samples"] = scores["samples"]
        print(f"{label:8s} ROUGE-L {scores['rougeL']:6.2f}  BLEU-4 {scores['bleu4']:5.2f}  "
              f"ppl {scores['perplexity']:,.1f}", flush=True)
    out = {"model": name, "keep": keep, "heal": info.to_dict(), "heal_wall_seconds": wall, "task": rows,
           "load_average": os.getloadavg(), "threads": args.threads, "cpu_step_seconds": step_seconds,
           "cpu_one_off_seconds_estimate": step_seconds * section.steps if step_seconds else None,
           "ratios": {"healed_over_full_rougeL": rows["healed"]["rougeL"] / max(1e-9, rows["full"]["rougeL"]),
                      "healed_over_full_ppl": rows["healed"]["perplexity"] / rows["full"]["perplexity"]}}
    print(info.describe())
    print(f"healing: {info.seconds:.1f} s of training ({'cached' if info.cached else 'trained now'}), "
          f"{wall:.1f} s with text preparation; loss {info.loss_first:.3f} -> {info.loss_last:.3f}")
    print(f"healed / full: ROUGE-L {out['ratios']['healed_over_full_rougeL']:.2f}x, "
          f"task perplexity {out['ratios']['healed_over_full_ppl']:.2f}x; load {os.getloadavg()}")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    target = results / ("heal_quick.json" if args.quick else f"heal_{keep}.json")
    target.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
