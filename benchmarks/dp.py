"""DP benchmark: DP-SGD step time on a LoRA model vs the non-private step and vs Opacus' default hooks
mode (all in this one process run), and accountant query time for 10k steps.

    .venv/bin/python benchmarks/dp.py [--quick]

Writes benchmarks/results/dp.json. Timings are medians over steps after warm-up, on CPU, timed round-robin across the variants.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def _model(layers: int, width: int, vocab: int):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_head=4, n_embd=width, vocab_size=vocab, n_positions=256,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return get_peft_model(GPT2LMHeadModel(cfg), LoraConfig(r=8, target_modules=["c_attn", "c_proj"],
                                                           fan_in_fan_out=True, lora_dropout=0.0))


def _interleaved_medians(fns: dict, steps: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin (A, B, C, A, B, C, ...) so that load
    changes on a shared machine hit every variant alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_steps(quick: bool) -> dict:
    from opacus import PrivacyEngine

    from fedguard.dp.sample_level import DPSGDConfig, PrivateAdapterTrainer
    from fedguard.rng import SecureRNG

    layers, width, vocab, seq, batch = (2, 64, 512, 32, 8) if quick else (4, 256, 4096, 128, 16)
    steps, warmup = (3, 1) if quick else (8, 2)
    base = _model(layers, width, vocab)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    pos = torch.arange(seq).expand(batch, seq).contiguous()
    out: dict = {"model": f"GPT-2 {layers}L d={width} V={vocab}, LoRA r=8 on c_attn+c_proj",
                 "trainable_params": sum(p.numel() for p in base.parameters() if p.requires_grad),
                 "batch": batch, "seq_len": seq, "steps_timed": steps}
    fns = {}

    # non-private
    m0 = copy.deepcopy(base)
    opt0 = torch.optim.SGD([p for p in m0.parameters() if p.requires_grad], lr=1e-3)

    def plain():
        opt0.zero_grad()
        m0(input_ids=ids, position_ids=pos, labels=ids).loss.backward()
        opt0.step()

    fns["nonprivate"] = plain

    # fedguard (ghost clipping or hooks; SecureRNG noise; per-example token-mean loss)
    trainers = []
    for mode in ("ghost", "hooks"):
        m = copy.deepcopy(base)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        cfg = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=batch / 1000, dataset_size=1000,
                          max_physical_batch_size=batch, grad_sample_mode=mode)
        tr = PrivateAdapterTrainer(m, opt, cfg, rng=SecureRNG.for_testing("bench"))
        trainers.append(tr)
        fns[f"fedguard_{mode}"] = lambda tr=tr: tr.step({"input_ids": ids})

    # Opacus' default: PrivacyEngine.make_private, hooks mode, the model's own loss
    m1 = copy.deepcopy(base)
    opt1 = torch.optim.SGD([p for p in m1.parameters() if p.requires_grad], lr=1e-3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=batch)
    engine = PrivacyEngine(accountant="prv")
    pm, popt, _ = engine.make_private(module=m1, optimizer=opt1, data_loader=loader, noise_multiplier=1.0,
                                      max_grad_norm=1.0, poisson_sampling=False)

    def opacus_step():
        popt.zero_grad()
        pm(input_ids=ids, position_ids=pos, labels=ids).loss.backward()
        popt.step()

    fns["opacus_hooks"] = opacus_step
    for name, sec in _interleaved_medians(fns, steps, warmup).items():
        out[f"{name}_s"] = sec
    out["ratio_fedguard_ghost_vs_nonprivate"] = out["fedguard_ghost_s"] / out["nonprivate_s"]
    out["ratio_fedguard_hooks_vs_nonprivate"] = out["fedguard_hooks_s"] / out["nonprivate_s"]
    out["ratio_opacus_hooks_vs_nonprivate"] = out["opacus_hooks_s"] / out["nonprivate_s"]
    out["ratio_fedguard_ghost_vs_opacus_hooks"] = out["fedguard_ghost_s"] / out["opacus_hooks_s"]
    out["ratio_fedguard_hooks_vs_opacus_hooks"] = out["fedguard_hooks_s"] / out["opacus_hooks_s"]
    return out


def bench_accountant() -> dict:
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
    from dp_accounting.pld import PLDAccountant

    from fedguard.dp.accountant import PrivacyAccountant
    from fedguard.dp.events import GaussianEvent, PoissonSampledEvent

    out: dict = {"steps": 10_000, "event": "PoissonSampled(q=0.01, Gaussian(1.0)) x 10000", "delta": 1e-5}
    for backend in ("pld", "rdp"):
        acc = PrivacyAccountant(target_delta=1e-5, backend=backend)
        for _ in range(10_000):  # one record per DP-SGD step, as a training loop does
            acc.record(PoissonSampledEvent(0.01, GaussianEvent(1.0)), label="dp-sgd step")
        t = time.perf_counter()
        eps = acc.epsilon()
        out[f"{backend}_query_s"] = time.perf_counter() - t
        out[f"{backend}_epsilon"] = eps
    t = time.perf_counter()
    ref = PLDAccountant().compose(SelfComposedDpEvent(PoissonSampledDpEvent(0.01, GaussianDpEvent(1.0)), 10_000))
    out["dp_accounting_pld_epsilon"] = ref.get_epsilon(1e-5)
    out["dp_accounting_pld_query_s"] = time.perf_counter() - t
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small model, few steps")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dp.json"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''} threads={torch.get_num_threads()}".strip(),
        "torch": torch.__version__,
        "quick": args.quick,
        "dp_sgd_step": bench_steps(args.quick),
        "accountant_10k_steps": bench_accountant(),
    }
    s = result["dp_sgd_step"]
    print(f"non-private step        {s['nonprivate_s'] * 1e3:8.1f} ms")
    print(f"fedguard ghost          {s['fedguard_ghost_s'] * 1e3:8.1f} ms  x{s['ratio_fedguard_ghost_vs_nonprivate']:.2f}")
    print(f"fedguard hooks          {s['fedguard_hooks_s'] * 1e3:8.1f} ms  x{s['ratio_fedguard_hooks_vs_nonprivate']:.2f}")
    print(f"opacus default (hooks)  {s['opacus_hooks_s'] * 1e3:8.1f} ms  x{s['ratio_opacus_hooks_vs_nonprivate']:.2f}")
    a = result["accountant_10k_steps"]
    print(f"accountant 10k steps: PLD {a['pld_query_s']:.2f} s (eps {a['pld_epsilon']:.4f}, dp_accounting "
          f"{a['dp_accounting_pld_epsilon']:.4f}), RDP {a['rdp_query_s']:.3f} s (eps {a['rdp_epsilon']:.4f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
