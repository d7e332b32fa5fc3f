"""FedHeteroLLM benchmark: (1) alignment on the demo data — the fraction of mentee (SmolLM2) tokens with a
one-to-one aligned teacher (GPT-2 BPE) token, per alignment method; (2) KD overhead per local step: the
mentee's LoRA step (forward + backward, LM loss) side by side with the same step plus the teacher's forward
and the top-k KD loss, for each teacher, timed round-robin in this one process.

    .venv/bin/python benchmarks/hetero.py [--quick] [--tiny] [--alignment-only]

``--tiny``: tiny random models instead of SmolLM2 (8-block mentee, 30- and 15-block teachers).
Writes benchmarks/results/hetero.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def alignment_fractions(n_examples: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from fedguard_train import alignment as al
    from fedguard_train.config import DataConfig
    from fedguard_train.data import format_prompt, load_examples
    from fedguard_train.models import smollm2_directory

    smol = AutoTokenizer.from_pretrained(smollm2_directory(), local_files_only=True)
    gpt2 = al.gpt2_tokenizer()
    examples = load_examples(DataConfig(source="wordnet", max_examples=n_examples), seed=0)
    out: dict[str, Any] = {"examples": len(examples), "mentee": "SmolLM2-135M tokeniser", "teacher": "GPT-2 BPE"}
    for method in ("dtw", "dtw-edit", "boundary"):
        totals = {"one_to_one": 0, "one_to_many": 0, "many_to_one": 0, "mentee_tokens": 0, "targets": 0,
                  "targets_matching_exact_boundary": 0}
        start = time.perf_counter()
        for ex in examples:
            text = format_prompt(smol, ex.prompt) + ex.response
            m = al.surface_tokens(smol, smol(text, add_special_tokens=False)["input_ids"])
            t = al.surface_tokens(gpt2, gpt2("".join(m), add_special_tokens=False)["input_ids"])
            aligned = al.teacher_positions(m, t, method)  # type: ignore[arg-type]
            exact = al.teacher_positions(m, t, "boundary").source
            has = aligned.source >= 0
            totals["targets"] += int(has.sum())
            totals["targets_matching_exact_boundary"] += int((aligned.source[has] == exact[has]).sum())
            for k, v in aligned.counts.items():
                totals[k] += v
            totals["mentee_tokens"] += len(m)
        totals["seconds"] = time.perf_counter() - start
        totals["one_to_one_fraction"] = totals["one_to_one"] / totals["mentee_tokens"]
        totals["with_target_fraction"] = totals["targets"] / totals["mentee_tokens"]
        totals["correct_target_fraction"] = totals["targets_matching_exact_boundary"] / max(1, totals["targets"])
        out[method] = totals
        print(f"alignment {method:9s}: one-to-one {totals['one_to_one_fraction']:.3f}, with a KD target "
              f"{totals['with_target_fraction']:.3f} (same teacher position as the exact boundaries: "
              f"{totals['correct_target_fraction']:.3f}) of {totals['mentee_tokens']} mentee tokens "
              f"({totals['seconds']:.1f} s)")
    return out


def step_overhead(tiny: bool, steps: int) -> dict[str, Any]:
    from fedguard_train.config import AdapterConfig, ModelConfig
    from fedguard_train.distill import kd_loss, top_k
    from fedguard_train.models import attach_adapter, family_of, load_base_model
    from fedguard_train.trainers.hetero import drop_layers

    source = "tiny:llama" if tiny else "smollm2"
    full, tok = load_base_model(ModelConfig(name_or_path=source), seed=0)
    if tiny:  # a deeper tiny model so that 30/15/8 blocks exist
        from transformers import AutoModelForCausalLM

        cfg = full.config
        cfg.num_hidden_layers = 30
        torch.manual_seed(0)
        full = AutoModelForCausalLM.from_config(cfg)
        full.requires_grad_(False)
    teachers = {"30 blocks": full, "15 blocks": drop_layers(full, 15)}
    mentee = attach_adapter(drop_layers(full, 8), family_of(full), AdapterConfig(method="lora", dropout=0.0))
    optimiser = torch.optim.Adam([p for p in mentee.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tok), (4, 72), generator=g)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}

    def lm_step() -> None:
        loss = mentee(**batch).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    def kd_step(teacher: torch.nn.Module) -> None:
        with torch.no_grad():
            target = top_k(teacher(input_ids=ids).logits, 16, 2.0)
        out = mentee(**batch)
        loss = out.loss + kd_loss(out.logits, target, temperature=2.0)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    fns = {"homo (LM only)": lm_step, **{f"hetero, teacher {k}": (lambda t=t: kd_step(t)) for k, t in teachers.items()}}
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["homo (LM only)"]
    for k, v in med.items():
        print(f"{k:24s}: {v * 1000:8.1f} ms/step  ({v / base:.2f}x the FedHomoLLM step)")
    return {"models": "tiny random (30-block llama)" if tiny else "SmolLM2-135M (mentee 8 blocks, teachers 30/15)",
            "batch": "4 x 72 tokens", "steps": steps, "median_seconds": med,
            "ratio_to_homo": {k: v / base for k, v in med.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--alignment-only", action="store_true", help="skip the step-time part (no models)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    load = os.getloadavg()
    result = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "loadavg_start": load,
              "alignment": alignment_fractions(60 if args.quick else 300),
              "step": None if args.alignment_only else step_overhead(args.tiny, 3 if args.quick else 8),
              "loadavg_end": os.getloadavg()}
    print(f"load average start {load}, end {result['loadavg_end']}")
    name = "hetero_alignment" if args.alignment_only else ("hetero_tiny" if args.tiny else "hetero")
    out = Path(__file__).parent / "results" / f"{name}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
