"""Measure watermark robustness on the library's 4-client simulation (issue 14's numbers).

    .venv/bin/python -m attacks.watermark.robustness [--quick]

Runs :func:`fedguard.watermark.simulation.run_federated` (4 clients, tiny GPT-2 + LoRA, trainable norm
scales, 32 bits per client) once per embedding, then the attack suite on the result, and writes
``benchmarks/results/watermark_robustness.json``:

* ``suite``: the default suite for ``mode="invariant"`` (the previous default) and ``mode="gram"``;
* ``tradeoff``: fine-tuning survival against the margin γ0 (gram mode), with the fidelity cost of each
  γ0 (eval loss with the watermark minus the identical run without it);
* ``dp``: watermarks under client-level DP at the private example's noise, per placement;
* ``survival``: the trade-off curve of issue 14's first goal: per (owners' training length, bits per client,
  γ0) the fidelity cost and the worst owner's bits/claims after 200 and 1000 steps of same-task
  fine-tuning of the released parameters at the training lr and after an overwriting attacker with 4 keys.

Every number is a measurement of this run (seeded: ``SimulationConfig.seed``); the machine load is
recorded beside it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from attacks.watermark.suite import SuiteConfig, run_suite
from attacks.watermark.transforms import merged
from fedguard.rng import SecureRNG
from fedguard.watermark.simulation import SimulationConfig, run_federated, task_data, tiny_gpt2_lora

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "watermark_robustness.json"


def _setting(cfg: SimulationConfig) -> tuple[Any, torch.Tensor, torch.nn.Module]:
    res = run_federated(cfg)
    train, _ = task_data(cfg, SecureRNG.for_testing(cfg.seed))
    base = merged(tiny_gpt2_lora(cfg, SecureRNG.for_testing(cfg.seed).spawn("init").torch_seed()))
    return res, torch.cat(train), base


def suite(mode: str, steps: tuple[int, ...], quick: bool) -> dict[str, Any]:
    cfg = SimulationConfig(mode=mode)  # type: ignore[arg-type]
    res, data, base = _setting(cfg)
    sc = SuiteConfig(finetune_steps=steps, overwrite_keys=(1,) if quick else (1, 2, 4),
                     overwrite_steps=50 if quick else 200, seed_tries=20 if quick else 200)
    t = time.perf_counter()
    rep = run_suite(res.model, res.keys, data, base=base, config=sc, rng=SecureRNG.for_testing(f"suite/{mode}"),
                    model_name=f"simulation ({mode})")
    return {"mode": mode, "eval_loss": res.eval_loss, "seconds": time.perf_counter() - t, **rep.to_json()}


def tradeoff(gammas: tuple[float, ...], steps: tuple[int, ...], lr: float) -> list[dict[str, Any]]:
    from attacks.watermark.finetune import finetune

    plain = run_federated(SimulationConfig(mode="gram"), watermark=False).eval_loss
    rows = []
    for g in gammas:
        cfg = SimulationConfig(mode="gram", gamma0=g)
        res, data, _ = _setting(cfg)
        results = finetune(res.model, res.keys, data, steps=steps, lr=lr)
        rows.append({"gamma0": g, "eval_loss": res.eval_loss, "eval_loss_without_watermark": plain,
                     "fidelity_cost": (res.eval_loss - plain) / plain,
                     "finetune": [r.to_json() for r in results]})
        print(f"gamma0={g}: fidelity {(res.eval_loss - plain) / plain:+.2%}; fewest bits after "
              + ", ".join(f"{int(r.strength)} steps {r.min_matched}/{r.bits} ({r.claims}/4)" for r in results),
              flush=True)
    return rows


def under_dp(rounds: int = 3, clip: float = 0.1, noise: float = 0.5, delta: float = 1e-3) -> list[dict[str, Any]]:
    """Client-level DP at the private example's noise (z = 0.5, C = 0.1, 3 rounds): client-side embedding
    alone, with α raised, and with the server-side component (post-processing of the noised release)."""
    from fedguard.dp.accountant import PrivacyAccountant
    from fedguard.dp.events import GaussianEvent

    acc = PrivacyAccountant(target_delta=delta)
    acc.spend(GaussianEvent(noise), rounds)
    eps = acc.epsilon()
    rows = []
    for label, alpha, server in (("client-side", 3e-3, 0), ("client-side, alpha 1.0", 1.0, 0),
                                 ("client-side + server-side (30 steps/round)", 3e-3, 30)):
        cfg = SimulationConfig(mode="gram", rounds=rounds, dp_clip=clip, dp_noise=noise, alpha=alpha,
                               server_embed_steps=server)
        res = run_federated(cfg)
        plain = run_federated(cfg, watermark=False).eval_loss
        last = res.detections[-1]
        rows.append({"placement": label, "epsilon": eps, "delta": delta, "noise_multiplier": noise, "clip": clip,
                     "rounds": rounds, "matched": [d.matched for d in last], "claims": sum(d.verdict for d in last),
                     "eval_loss": res.eval_loss, "eval_loss_without_watermark": plain,
                     "fidelity_cost": (res.eval_loss - plain) / plain})
        print(f"DP eps={eps:.1f}: {label}: bits {[d.matched for d in last]}, claims {rows[-1]['claims']}/4, "
              f"fidelity {rows[-1]['fidelity_cost']:+.2%}", flush=True)
    return rows


SURVIVAL_GRIDS: dict[str, tuple[tuple[int, int, int, float], ...]] = {
    # (rounds, local steps, bits per client, gamma0); 128 bits = the 4 clients fill every gram block (K*N_i = D_i)
    "a": ((4, 15, 32, 1.0), (4, 15, 128, 4.0), (5, 40, 32, 1.0), (5, 40, 128, 4.0)),
    "b": ((5, 40, 32, 4.0), (5, 40, 128, 1.0), (5, 40, 128, 16.0), (4, 15, 128, 16.0)),
}


def survival(grid: str, lr: float = 5e-3) -> list[dict[str, Any]]:
    """Fine-tuning (released adapter + norms, lr, 0/200/1000 steps) and 4-key overwriting against the owners'
    training length, bits and margin; fidelity against the identical run without watermarks."""
    from attacks.watermark.finetune import finetune
    from attacks.watermark.overwrite import overwrite

    plain: dict[tuple[int, int], float] = {}
    rows = []
    for rounds, local, bits, g in SURVIVAL_GRIDS[grid]:
        cfg = SimulationConfig(mode="gram", rounds=rounds, local_steps=local, bits=bits, gamma0=g)
        if (rounds, local) not in plain:
            plain[(rounds, local)] = run_federated(cfg, watermark=False).eval_loss
        t = time.perf_counter()
        res, data, _ = _setting(cfg)
        cost = (res.eval_loss - plain[(rounds, local)]) / plain[(rounds, local)]
        ft = finetune(copy.deepcopy(res.model), res.keys, data, steps=(0, 200, 1000), lr=lr)
        ow = overwrite(res.model, res.keys, data, attacker_keys=(4,), steps=200, lr=lr,
                       rng=SecureRNG.for_testing(f"survival/{grid}/overwrite"))
        row = {"rounds": rounds, "local_steps": local, "bits": bits, "gamma0": g, "eval_loss": res.eval_loss,
               "eval_loss_without_watermark": plain[(rounds, local)], "fidelity_cost": cost,
               "finetune": [r.to_json() for r in ft], "overwrite": [r.to_json() for r in ow],
               "seconds": time.perf_counter() - t, "load": os.getloadavg()}
        rows.append(row)
        print(f"rounds={rounds} local={local} bits={bits} gamma0={g}: eval {res.eval_loss:.3f} fidelity {cost:+.2%}; "
              + ", ".join(f"FT {int(r.strength)} {r.min_matched}/{r.bits} ({r.claims}/4, dloss {r.delta_task_loss:+.3f})"
                          for r in ft)
              + f"; overwrite 4 keys {ow[0].min_matched}/{ow[0].bits} ({ow[0].claims}/4)", flush=True)
    return rows


LLAMA_RESULTS = RESULTS.with_name("watermark_llama.json")


def llama(steps: tuple[int, ...] = (0, 50, 200, 1000), *, bits: int = 32, hidden: int = 32,
          layers: int = 2, directions: int = 1, alpha: float = 0.05, rank: int = 4) -> dict[str, Any]:
    """The suite on a tiny random Llama (``layers`` × ``hidden``, GQA 4/2 heads, RoPE; LoRA on every
    projection (r ``rank``), trainable RMSNorm scales) into which 2 owners embed ``bits``-bit gram keys (``alpha``, Adam lr
    1e-2, 300 steps with a next-token rule as the task); reparametrisations incl. the residual rotation (read
    with and without Procrustes alignment), prune, int4, fine-tuning of the released parameters and of a
    fresh LoRA at lr 5e-3, overwriting with 1 and 4 attacker keys (of the owners' plan: same blocks, bits and
    ``directions``, the number of secret directions each block's Gram matrix is read along)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedguard.watermark import SignWatermark, make_sign_key, prepare_norm_targets

    torch.manual_seed(3)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0))
    model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=rank, lora_alpha=4 * rank, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    prepare_norm_targets(model)
    keys = [make_sign_key(model, bits=bits, mode="gram", n_clients=2, alpha=alpha, owner=f"owner-{i}",
                          directions=directions, rng=SecureRNG.for_testing(f"llama/{i}")) for i in range(2)]
    marks = [SignWatermark(k, model) for k in keys]
    gen = torch.Generator().manual_seed(0)
    data = (torch.randint(0, 64, (128, 1), generator=gen) + torch.arange(16)[None, :] * 5) % 64

    def train(net: torch.nn.Module, regularisers: list[SignWatermark]) -> None:
        batches = torch.Generator().manual_seed(1)
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(300):
            idx = torch.randint(0, 128, (16,), generator=batches)
            loss = net(input_ids=data[idx], labels=data[idx]).loss + sum(m.loss() for m in regularisers)
            opt.zero_grad()
            loss.backward()
            opt.step()

    twin = copy.deepcopy(model)  # the fidelity baseline: same start, same batches, no watermark
    train(model, marks)
    train(twin, [])
    sc = SuiteConfig(prune=(0.5,), quantise=("int4", "int4-channel"), finetune_steps=steps,
                     finetune_params=("released", "new-lora"), overwrite_keys=(1, 4), seed_tries=20)
    t = time.perf_counter()
    rep = run_suite(model, keys, data, base=base, config=sc, rng=SecureRNG.for_testing("suite/llama"),
                    model_name=f"tiny Llama {layers}x{hidden} (2 owners, {bits}-bit gram keys, {directions} dir.)")
    from attacks.watermark.result import task_loss

    marked_loss, plain_loss = task_loss(model, data), task_loss(twin, data)
    print(f"llama {layers}x{hidden} {bits} bits {directions} dir: task loss {marked_loss:.4f} vs {plain_loss:.4f} without watermarks",
          flush=True)
    out = {"bits": bits, "hidden": hidden, "layers": layers, "directions": directions, "alpha": alpha, "rank": rank,
           "task_loss": marked_loss,
           "task_loss_without_watermark": plain_loss, "seconds": time.perf_counter() - t,
           "load": os.getloadavg(), **rep.to_json()}
    for r in rep.results:
        print(f"llama {layers}x{hidden} {bits} bits {directions} dir {r.attack:30s} {r.label:44s} {r.min_matched}/{r.bits} {r.claims}/2 dloss {r.delta_task_loss:+.4f} "
              f"dlogits {r.function_change:.2g}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--llama", type=int, nargs=3, default=(32, 32, 2), metavar=("BITS", "HIDDEN", "LAYERS"),
                        help="--part llama: bits per owner, hidden size, layers")
    parser.add_argument("--rank", type=int, default=4, help="--part llama: LoRA rank")
    parser.add_argument("--alpha", type=float, default=0.05, help="--part llama: the owners' regulariser weight")
    parser.add_argument("--directions", type=int, default=1, help="--part llama: Gram directions per block")
    parser.add_argument("--grid", choices=sorted(SURVIVAL_GRIDS), default="a", help="--part survival: which grid")
    parser.add_argument("--part", choices=("all", "suite", "tradeoff", "dp", "survival", "llama"), default="all")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = (0, 50, 200) if args.quick else (0, 50, 200, 1000)
    out: dict[str, Any] = {"load_before": os.getloadavg(), "config": dataclasses.asdict(SimulationConfig())}
    if RESULTS.exists():
        out = {**json.loads(RESULTS.read_text()), **out}
    if args.part in ("all", "suite"):
        out["suite"] = [suite(m, steps, args.quick) for m in ("invariant", "gram")]
        for s in out["suite"]:
            for r in s["results"]:
                print(f"{s['mode']:9s} {r['attack']:30s} {r['label']:28s} {r['min_matched']}/{r['bits']} "
                      f"{r['claims']}/4 {r['delta_task_loss']:+.4f}", flush=True)
    if args.part in ("all", "tradeoff"):
        out["tradeoff"] = tradeoff((1.0, 4.0, 16.0) if not args.quick else (1.0, 4.0), steps, 5e-3)
    if args.part in ("all", "dp"):
        out["dp"] = under_dp()
    if args.part == "llama":  # its own file: a long run of another part rewrites RESULTS when it ends
        done = json.loads(LLAMA_RESULTS.read_text()) if LLAMA_RESULTS.exists() else {}
        bits, hidden, layers = args.llama
        name = (f"{layers}x{hidden}, {bits} bits" + (f", {args.directions} directions" if args.directions > 1 else "")
                + (f", alpha {args.alpha:g}" if args.alpha != 0.05 else "") + (f", rank {args.rank}" if args.rank != 4 else ""))
        done[name] = llama(bits=bits, hidden=hidden, layers=layers, directions=args.directions, alpha=args.alpha,
                           rank=args.rank)
        LLAMA_RESULTS.parent.mkdir(parents=True, exist_ok=True)
        LLAMA_RESULTS.write_text(json.dumps(done, indent=1) + "\n")
        print(f"wrote {LLAMA_RESULTS}")
        return
    if args.part == "survival":
        out.setdefault("survival", {})[args.grid] = survival(args.grid)
    out["load_after"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
