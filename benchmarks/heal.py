"""Healing the layer-dropped SmolLM2 (fedguard_train/healing.py): its one-off cost and what it buys.

    .venv/bin/python benchmarks/heal.py                       # 8 of 30 blocks, the examples' healing recipe
    .venv/bin/python benchmarks/heal.py --recipe steps=200,kd_positions=0 --recipe steps=80,kd_positions=16
    .venv/bin/python benchmarks/heal.py --quick               # tiny random Llama, seconds

Heals (or loads from ``$FEDGUARD_CACHE/healed``) the layer-dropped model of ``--keep`` blocks with each
``--recipe`` (``key=value`` overrides of the config's ``co.small_heal``; none: that recipe alone), then
scores on the held-out split of ``--config`` (the FedHeteroLLM/FedCoLLM examples' WordNet test split: the
same 16 examples, greedy, 16 new tokens) side by side, in one process: the full model (the anchor: the
teacher the dropped model is healed towards), the layer-dropped model before healing, and each healed
model. Also each recipe's held-out perplexity on the healing text (from healing itself), its seconds and
seconds per step (0 when cached: point ``FEDGUARD_CACHE`` at an empty directory to time it).

Writes benchmarks/results/heal_<keep>.json (``--out`` overrides; ``--quick``: heal_quick.json) and prints
the ratios against the full model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_recipe(text: str, fields: dict[str, type]) -> dict[str, Any]:
    """``"steps=80,kd_positions=16"`` -> ``{"steps": 80, "kd_positions": 16}`` typed like HealSection."""
    out: dict[str, Any] = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown healing setting {key!r}; known: {sorted(fields)}")
        kind = fields[key]
        out[key] = value if kind is str else kind(value)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "examples" / "co_smollm2.yaml"))
    parser.add_argument("--keep", type=int, default=8)
    parser.add_argument("--recipe", action="append", default=[],
                        help="key=value[,key=value...] overrides of the config's healing recipe (repeatable)")
    parser.add_argument("--quick", action="store_true", help="a tiny random 6-block Llama instead of SmolLM2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

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
    base = (config.co.small_heal if config.co is not None else None) or HealSection()
    types = {f.name: (str if f.name in ("data", "teacher_precision") else type(getattr(base, f.name)))
             for f in dataclasses.fields(HealSection)}
    recipes = [dataclasses.replace(base, **parse_recipe(r, types)) for r in (args.recipe or [""])]
    keep = args.keep
    if args.quick:
        recipes = [dataclasses.replace(r, steps=20, batch_size=2, seq_len=32,
                                       kd_positions=min(r.kd_positions, 32)) for r in recipes]
        keep = 2
    name = "tiny:llama:6" if args.quick else "smollm2"
    full, tokenizer = load_server_model(ModelConfig(name_or_path=name), seed=0)
    examples = load_examples(config.data, seed=config.seed)
    _, test = train_test_split(examples, config.data.test_size, seed=config.seed)
    test = test[: config.eval.examples]
    items = tokenize(test, tokenizer, config.data)
    kept = even_blocks(len(full.model.layers), keep)
    dropped = build_emulator(full, EmulatorRecipe("llama", len(full.model.layers), 0, 0, 0.0, kept, fingerprint(full)))

    def score(label: str, model: torch.nn.Module) -> dict[str, Any]:
        scores = evaluate(model, tokenizer, test, items, max_new_tokens=config.eval.max_new_tokens)
        row = {k: scores[k] for k in ("rouge1", "rouge2", "rougeL", "bleu4", "perplexity")}
        row["samples"] = scores["samples"]
        print(f"{label:40s} ROUGE-L {scores['rougeL']:6.2f}  BLEU-4 {scores['bleu4']:5.2f}  "
              f"ppl {scores['perplexity']:,.1f}", flush=True)
        return row

    task = {"full": score("full", full), "dropped": score("dropped", dropped)}
    healed_rows: list[dict[str, Any]] = []
    for recipe in recipes:
        start = time.perf_counter()
        healed, info = healed_model(full, tokenizer, keep, recipe, progress=True)
        wall = time.perf_counter() - start
        label = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(recipe).items()
                          if k in ("steps", "batch_size", "seq_len", "lr", "kd_positions", "teacher_precision"))
        row = {"recipe": dataclasses.asdict(recipe), "label": label, "heal": info.to_dict(),
               "heal_wall_seconds": wall, "seconds_per_step": info.seconds / recipe.steps if not info.cached else None,
               "load_average_after": os.getloadavg(), "task": score(label, healed)}
        row["ratios"] = {"healed_over_full_rougeL": row["task"]["rougeL"] / max(1e-9, task["full"]["rougeL"]),
                         "healed_over_full_task_ppl": row["task"]["perplexity"] / task["full"]["perplexity"],
                         "healed_over_full_text_ppl": info.ppl_after / info.ppl_full}
        print(info.describe())
        print(f"  healing: {info.seconds:.1f} s of training ({'cached' if info.cached else 'trained now'}"
              f"{f', {info.seconds / recipe.steps:.2f} s/step' if not info.cached else ''}), {wall:.1f} s with text "
              f"preparation; loss {info.loss_first:.3f} -> {info.loss_last:.3f}; healed / full: text ppl "
              f"{row['ratios']['healed_over_full_text_ppl']:.2f}x, task ppl {row['ratios']['healed_over_full_task_ppl']:.2f}x,"
              f" ROUGE-L {row['ratios']['healed_over_full_rougeL']:.2f}x; load {os.getloadavg()}", flush=True)
        healed_rows.append(row)
        del healed
    out = {"model": name, "keep": keep, "threads": args.threads, "task": task, "healed": healed_rows,
           "load_average": os.getloadavg()}
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    target = Path(args.out) if args.out else results / ("heal_quick.json" if args.quick else f"heal_{keep}.json")
    target.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
