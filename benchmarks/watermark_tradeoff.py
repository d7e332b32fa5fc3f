"""Trade-off curves of issue 14's missed goals: fidelity vs fine-tuning survival, and the overwriting attacker.

Anchor: the **unwatermarked twin** — the same base model, data, batches and training length without any
regulariser — for fidelity; the attacker's **plain fine-tuning** (0 attacker keys, same batches) for the
price of overwriting. Everything is a measurement of this run; seeded (``--seed``); one progress bar.

Setting, per family (a tiny random Llama — RoPE, GQA 4/2 heads, RMSNorm — and a tiny GPT-2, both 2 layers ×
64, vocabulary 64, sequences of 16):

* **public base**: every weight pretrained (AdamW, 3e-3) on successor sequences of a secret permutation
  (``fedguard.toy_task``; 5% noise tokens), so the base is a converged model of the pre-training task;
* **owners' task**: a quarter of the permutation's entries re-mapped (a new rule to learn); two owners
  train LoRA r 8 on every projection + the norm scales together (centrally, as the issue's "2 owners"
  Llama setting) for ``--owner-steps`` at lr 5e-3 (the training lr) with their gram keys' regularisers;
  the twin trains the same without them. The task metric is held-out next-token loss and accuracy
  (2,048 sequences neither the owners nor the attacker trained on), averaged over 4 evaluations in the
  last 40% of the owners' steps (constant lr: the loss fluctuates around its plateau); the model is there,
  so the attacker's fine-tuning cannot just keep training an under-trained model;
* **(a) fidelity vs survival**: per owners' ``bits`` and regulariser weight α: fidelity cost (held-out
  loss and accuracy vs the twin) and the worst owner's bits / claims after 200 and 1,000 steps of
  same-task fine-tuning of the released parameters at the training lr on the attacker's own data;
* **(b) the overwriting attacker**: on the owners' model at the largest α whose fidelity cost is within
  1% (loss), ``k`` = 1..4 attacker keys of the owners' plan at the owners' α, and 4 keys at multiples of
  that α; the owners' fewest bits / claims and the attacker's held-out task loss minus the control's;
* **defences tried**: 16 secret Gram directions per block (the owners' 64 bits spread over 16× the feature
  values, so that the attacker's random constraints — of the same plan — overlap less with theirs);
  128-bit keys (the same significance, a claim needs 72%, not 80%, of the bits); and the sign-flip test
  (:func:`fedguard.watermark.verify.sign_flip_p_value`): every result carries both the binomial count's
  claims and the sign-flip test's (same significance 1e-6; which one a claim uses is fixed before looking);
* **(c)** ``--part simulation``: the issue's own 4-client GPT-2 simulation (4 layers × 64, 32 bits per
  client, gram keys), run longer than the default (``--sim-rounds`` × ``--sim-local``), then 200 / 1,000
  steps of fine-tuning of the released adapter + norms at the training lr.

    .venv/bin/python benchmarks/watermark_tradeoff.py [--quick] [--part all|curves|simulation]

Writes ``benchmarks/results/watermark_tradeoff.json`` and ``watermark_tradeoff.png`` (``--quick``:
``watermark_tradeoff_quick.*``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacks.watermark.finetune import finetune  # noqa: E402
from attacks.watermark.overwrite import overwrite  # noqa: E402
from attacks.watermark.result import AttackResult, measure  # noqa: E402
from fedguard.rng import SecureRNG  # noqa: E402
from fedguard.toy_task import successor_sequences  # noqa: E402
from fedguard.watermark import SignWatermark, make_sign_key, prepare_norm_targets  # noqa: E402
from fedguard.watermark.keys import SignKey  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VOCAB, SEQ, HIDDEN, LAYERS = 64, 16, 64, 2
LR = 5e-3
FIDELITY_BUDGET = 0.01


@dataclass(frozen=True)
class Keys:
    """One owners' key plan of the sweep: bits and Gram directions per block, the α values swept, and the
    overwriting attacker run against the largest α within the fidelity budget (attacker key counts, and
    multiples of the owners' α tried with 4 keys)."""

    bits: int
    directions: int
    alphas: tuple[float, ...]
    overwrite_keys: tuple[int, ...]
    strengths: tuple[float, ...]
    gamma0: float = 1.0

    @property
    def name(self) -> str:
        return (f"{self.bits} bits" + (f", {self.directions} directions" if self.directions > 1 else "")
                + (f", gamma0 {self.gamma0:g}" if self.gamma0 != 1.0 else ""))


@dataclass(frozen=True)
class Plan:
    """The sweep's sizes (``--quick`` shrinks every count for a smoke run)."""

    pretrain_steps: int
    owner_steps: int
    finetune_steps: tuple[int, ...]
    overwrite_steps: int
    keys: tuple[Keys, ...]
    n_train: int = 512
    n_eval: int = 2048


FULL = Plan(pretrain_steps=500, owner_steps=400, finetune_steps=(200, 1000), overwrite_steps=400, keys=(
    Keys(64, 1, (0.001, 0.003, 0.01, 0.03, 0.1), (0, 1, 2, 3, 4), (3.0, 10.0, 30.0)),
    # the defence tried: the same bits read along 16 secret directions per block (16x the feature values
    # for the attacker's random constraints to miss), and more bits at the same significance
    Keys(64, 16, (0.003, 0.01, 0.03), (0, 1, 2, 3, 4), (3.0, 10.0)),
    Keys(128, 1, (0.01,), (0, 4), ()),
))
# the margin: the hinge is zero once every bit clears γ0, so α sets how hard violations are pulled and γ0
# how far the bits sit from 0 when the model is released (what fine-tuning's drift has to cross)
GAMMA0 = Plan(pretrain_steps=500, owner_steps=400, finetune_steps=(200, 1000), overwrite_steps=400, keys=(
    Keys(64, 1, (0.01,), (), (), gamma0=10.0), Keys(64, 1, (0.01,), (0, 4), (), gamma0=30.0),
))
QUICK = Plan(pretrain_steps=60, owner_steps=40, finetune_steps=(20, 40), overwrite_steps=20, n_train=128,
             n_eval=128, keys=(Keys(64, 1, (0.003, 0.03), (0, 4), (10.0,)), Keys(64, 4, (0.01,), (0, 4), ())))


PLANS = {"full": FULL, "gamma0": GAMMA0}


class Bar:
    """One tqdm bar over every optimiser step of the run (stderr; disabled with ``quiet``)."""

    def __init__(self, total: int, quiet: bool) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, unit="step", mininterval=5.0, disable=quiet, desc="watermark trade-off")

    def update(self, n: int) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def plan_steps(plan: Plan, families: int) -> int:
    owners = sum(len(k.alphas) for k in plan.keys) + 1
    per_family = (plan.pretrain_steps + owners * plan.owner_steps + plan.owner_steps // 4
                  + (owners - 1) * max(plan.finetune_steps)
                  + sum(len(k.overwrite_keys) + len(k.strengths) for k in plan.keys) * plan.overwrite_steps)
    return families * per_family


# ---------------------------------------------------------------------------------------------- the setting

def build_base(family: str, seed: int) -> torch.nn.Module:
    """A randomly initialised tiny model of ``family`` (every weight trainable)."""
    torch.manual_seed(seed)
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                                            num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=0,
                                            pad_token_id=0))
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=HIDDEN, n_layer=LAYERS, n_head=4,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0))


def with_adapter(base: torch.nn.Module, family: str) -> torch.nn.Module:
    """A copy of ``base`` with LoRA r 8 (α 32) on every projection and trainable norm scales."""
    from peft import LoraConfig, get_peft_model

    targets = (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] if family == "llama"
               else ["c_attn", "c_proj", "c_fc"])
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0,
                                                           target_modules=targets, fan_in_fan_out=family == "gpt2",
                                                           task_type="CAUSAL_LM"))
    prepare_norm_targets(model)
    return model


@dataclass
class Task:
    """Sequences of the pre-training rule, and the owners' rule: the owners' training set, the attacker's
    own set (same distribution, other draws) and a held-out set neither trains on."""

    pretrain: torch.Tensor
    owners: torch.Tensor
    attacker: torch.Tensor
    heldout: torch.Tensor


def make_task(seed: int, plan: Plan) -> Task:
    gen = np.random.default_rng(seed)
    perm = gen.permutation(VOCAB)
    moved = gen.choice(VOCAB, size=VOCAB // 4, replace=False)
    task_perm = perm.copy()
    task_perm[moved] = perm[np.roll(moved, 1)]  # a quarter of the successors re-mapped among themselves

    def draw(p: np.ndarray, n: int) -> torch.Tensor:
        return successor_sequences(0, 1, n, p, gen, seq_len=SEQ)

    return Task(draw(perm, 2048), draw(task_perm, plan.n_train), draw(task_perm, plan.n_train),
                draw(task_perm, plan.n_eval))


def train(model: torch.nn.Module, data: torch.Tensor, steps: int, lr: float, marks: Sequence[SignWatermark],
          seed: int, bar: Bar, batch: int = 16, heldout: torch.Tensor | None = None,
          average_last: int = 4) -> dict[str, float]:
    """AdamW on every parameter that requires grad; task loss + the owners' regularisers; fixed batch order
    and dropout masks. With ``heldout``: the held-out metrics averaged over ``average_last`` evaluations
    spread over the last 40% of the steps (a constant-lr run fluctuates around its plateau; one evaluation
    would mix that fluctuation into the fidelity comparison), plus the final model's own."""
    every = max(1, int(0.4 * steps) // max(1, average_last))
    at = {steps - i * every for i in range(average_last)} if heldout is not None else set()
    seen: list[dict[str, float]] = []
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # GPT-2's dropout masks: the same for the twin and the watermarked runs
        for step in range(steps):
            idx = torch.randint(0, data.shape[0], (batch,), generator=gen)
            loss = model(input_ids=data[idx], labels=data[idx]).loss
            for m in marks:
                loss = loss + m.loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update(1)
            if step + 1 in at and heldout is not None:
                seen.append(evaluate(model, heldout))
                model.train()
    if not seen:
        return {}
    return {"loss": float(np.mean([e["loss"] for e in seen])), "accuracy": float(np.mean([e["accuracy"] for e in seen])),
            "final_loss": seen[-1]["loss"], "final_accuracy": seen[-1]["accuracy"], "evaluations": float(len(seen))}


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: torch.Tensor) -> dict[str, float]:
    """Held-out next-token loss and accuracy (argmax of the logits at t equals the token at t+1)."""
    was = model.training
    model.eval()
    out = model(input_ids=data, labels=data)
    pred = out.logits[:, :-1].argmax(-1)
    acc = float((pred == data[:, 1:]).double().mean())
    model.train(was)
    return {"loss": float(out.loss), "accuracy": acc}


def owners_keys(model: torch.nn.Module, family: str, plan: Keys, alpha: float, seed: int) -> list[SignKey]:
    """Two owners' gram keys; the seeds depend on (family, bits, directions, seed), not on α, so the α sweep
    changes nothing but the regulariser's weight."""
    return [make_sign_key(model, bits=plan.bits, mode="gram", n_clients=2, alpha=alpha, owner=f"owner-{i}",
                          directions=plan.directions, gamma0=plan.gamma0,
                          rng=SecureRNG.for_testing(f"tradeoff/{family}/{plan.bits}/{plan.directions}/{seed}/{i}"))
            for i in range(2)]


def _row(r: AttackResult, control: float | None = None) -> dict[str, Any]:
    out = {"label": r.label, "strength": r.strength, "bits": r.bits, "fewest_bits": r.min_matched,
           "claims": r.claims, "claims_sign_flip": r.claims_sign_flip, "owners": len(r.owners),
           "max_p_binomial": r.max_p_value,
           "max_p_sign_flip": r.max_sign_flip_p_value,
           "heldout_loss": r.task_loss, "delta_heldout_loss": r.delta_task_loss}
    if control is not None:
        out["cost_vs_control"] = r.task_loss - control
    return out


# ------------------------------------------------------------------------------------------------ the curves

def curves(family: str, plan: Plan, seed: int, bar: Bar) -> dict[str, Any]:
    task = make_task(seed, plan)
    base = build_base(family, seed)
    for p in base.parameters():
        p.requires_grad_(True)
    t0 = time.perf_counter()
    train(base, task.pretrain, plan.pretrain_steps, 3e-3, [], seed, bar)
    base.eval()
    out: dict[str, Any] = {"family": family, "base_on_pretraining_rule": evaluate(base, task.pretrain[:512]),
                           "base_on_owners_rule": evaluate(base, task.heldout)}
    twin = with_adapter(base, family)
    ref = train(twin, task.owners, plan.owner_steps, LR, [], seed + 1, bar, heldout=task.heldout)
    # the twin's curve near the end: is the owners' model at its plateau?
    probe = copy.deepcopy(twin)
    train(probe, task.owners, plan.owner_steps // 4, LR, [], seed + 2, bar)
    out["twin"] = {**ref, "after_quarter_more_steps": evaluate(probe, task.heldout)}
    del probe
    print(f"[{family}] base on its rule {out['base_on_pretraining_rule']}, on the owners' rule "
          f"{out['base_on_owners_rule']}; twin {ref}; +{plan.owner_steps // 4} steps {out['twin']['after_quarter_more_steps']}",
          flush=True)
    sweep = []
    owned: dict[tuple[str, float], tuple[torch.nn.Module, list[SignKey]]] = {}
    for kp in plan.keys:
        bits = kp.bits
        for alpha in kp.alphas:
            model = with_adapter(base, family)
            keys = owners_keys(model, family, kp, alpha, seed)
            marks = [SignWatermark(k, model) for k in keys]
            fid = train(model, task.owners, plan.owner_steps, LR, marks, seed + 1, bar, heldout=task.heldout)
            owned[(kp.name, alpha)] = (copy.deepcopy(model), keys)
            released = measure(model, keys, task.heldout, attack="none", strength=0.0, label="as released",
                               reference_loss=fid["final_loss"])
            ft = finetune(model, keys, task.attacker, steps=(0, *plan.finetune_steps), lr=LR, seed=seed + 3,
                          eval_data=task.heldout)
            bar.update(max(plan.finetune_steps))
            row = {"keys": kp.name, "bits": bits, "directions": kp.directions, "gamma0": kp.gamma0, "alpha": alpha,
                   **{f"heldout_{k}": v for k, v in fid.items()},
                   "fidelity_cost_loss": (fid["loss"] - ref["loss"]) / ref["loss"],
                   "fidelity_cost_accuracy": (ref["accuracy"] - fid["accuracy"]) / ref["accuracy"],
                   "released": _row(released), "finetune": [_row(r) for r in ft]}
            sweep.append(row)
            print(f"[{family}] {kp.name} alpha {alpha:g}: held-out loss {fid['loss']:.4f} "
                  f"({row['fidelity_cost_loss']:+.2%}), acc {fid['accuracy']:.4f} ({-row['fidelity_cost_accuracy']:+.2%}); "
                  f"released {released.min_matched}/{bits} ({released.claims}/2); "
                  + ", ".join(f"FT {int(r.strength)}: {r.min_matched}/{bits} ({r.claims}/2 binomial, "
                              f"{r.claims_sign_flip}/2 sign-flip, dloss {r.delta_task_loss:+.4f})" for r in ft[1:]),
                  flush=True)
    out["sweep"] = sweep
    out["overwrite"] = []
    for kp in plan.keys:
        bits = kp.bits
        if not kp.overwrite_keys:
            continue
        rows = [r for r in sweep if r["keys"] == kp.name]
        within = [r["alpha"] for r in rows if r["fidelity_cost_loss"] <= FIDELITY_BUDGET]
        alpha = max(within) if within else min(kp.alphas)
        model, keys = owned[(kp.name, alpha)]
        rng = SecureRNG.for_testing(f"tradeoff/{family}/{seed}/attacker")
        results = overwrite(model, keys, task.attacker, attacker_keys=kp.overwrite_keys,
                            steps=plan.overwrite_steps, lr=LR, seed=seed + 4, eval_data=task.heldout, rng=rng)
        bar.update(len(kp.overwrite_keys) * plan.overwrite_steps)
        control = results[0].task_loss if kp.overwrite_keys[0] == 0 else None
        by_strength = []
        for mult in kp.strengths:
            (r,) = overwrite(model, keys, task.attacker, attacker_keys=(4,), steps=plan.overwrite_steps, lr=LR,
                             alpha=alpha * mult, seed=seed + 4, eval_data=task.heldout, rng=rng)
            bar.update(plan.overwrite_steps)
            by_strength.append({"alpha_multiple": mult, **_row(r, control)})
        entry = {"keys": kp.name, "bits": bits, "directions": kp.directions, "owners_alpha": alpha, "within_budget": bool(within), "steps": plan.overwrite_steps,
                 "by_keys": [_row(r, control) for r in results], "by_strength_4_keys": by_strength}
        out["overwrite"].append(entry)
        for r in entry["by_keys"] + by_strength:
            print(f"[{family}] overwrite {kp.name} (owners' alpha {alpha:g}): {r['label']}"
                  f"{' x' + str(r['alpha_multiple']) + ' alpha' if 'alpha_multiple' in r else ''}: owners "
                  f"{r['fewest_bits']}/{bits} ({r['claims']}/2 binomial, {r['claims_sign_flip']}/2 sign-flip); "
                  f"attacker's held-out loss {r['heldout_loss']:.4f}, cost vs control {r.get('cost_vs_control', float('nan')):+.4f}",
                  flush=True)
    out["seconds"] = time.perf_counter() - t0
    out["load"] = os.getloadavg()
    return out


# -------------------------------------------------------------------------------------------- (c) simulation

def simulation(rounds: int, local: int, steps: Sequence[int], quiet: bool) -> dict[str, Any]:
    """The 4-client GPT-2 simulation (gram keys, 32 bits per client) run for ``rounds`` × ``local`` steps;
    the released adapter + norms fine-tuned at the training lr on the union of the clients' data."""
    from fedguard.watermark.simulation import SimulationConfig, run_federated, task_data

    t0 = time.perf_counter()
    cfg = SimulationConfig(mode="gram", rounds=rounds, local_steps=local)
    plain = run_federated(cfg, watermark=False)
    res = run_federated(cfg)
    train_sets, test = task_data(cfg, SecureRNG.for_testing(cfg.seed))
    if res.model is None:
        raise RuntimeError("run_federated returned no model")
    ft = finetune(res.model, res.keys, torch.cat(train_sets), steps=(0, *steps), lr=cfg.lr, eval_data=test)
    out = {"rounds": rounds, "local_steps": local, "bits": cfg.bits, "clients": cfg.clients,
           "eval_loss": res.eval_loss, "eval_loss_without_watermark": plain.eval_loss,
           "eval_history": res.eval_history, "eval_history_without_watermark": plain.eval_history,
           "fidelity_cost_loss": (res.eval_loss - plain.eval_loss) / plain.eval_loss,
           "finetune": [_row(r) for r in ft], "seconds": time.perf_counter() - t0, "load": os.getloadavg()}
    print(f"[simulation {rounds}x{local}] eval {res.eval_loss:.4f} vs {plain.eval_loss:.4f} "
          f"({out['fidelity_cost_loss']:+.2%}); "
          + ", ".join(f"FT {int(r.strength)}: {r.min_matched}/{r.bits} ({r.claims}/4 binomial, "
                      f"{r.claims_sign_flip}/4 sign-flip, dloss {r.delta_task_loss:+.4f})" for r in ft), flush=True)
    return out


# ----------------------------------------------------------------------------------------------------- output

def draw(results: dict[str, Any], path: Path) -> None:
    """(a) fewest bits after the longest fine-tuning vs fidelity cost, per family and bits; (b) owners'
    fewest bits vs attacker keys, and vs the attacker's α multiple, with the attacker's cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = [f for f in results.get("families", {}).values()]
    if not fams:
        return
    fig, axes = plt.subplots(len(fams), 3, figsize=(13.0, 3.8 * len(fams)), squeeze=False)
    cost: Any = None
    for row, fam in zip(axes, fams, strict=True):
        ax = row[0]
        for name in dict.fromkeys(r["keys"] for r in fam["sweep"]):
            rows = [r for r in fam["sweep"] if r["keys"] == name]
            bits = rows[0]["bits"]
            xs = [100 * r["fidelity_cost_loss"] for r in rows]
            longest = int(rows[0]["finetune"][-1]["strength"])
            ax.plot(xs, [r["finetune"][-1]["fewest_bits"] / bits for r in rows], marker="o", linestyle="none",
                    label=f"{name}, after {longest} FT steps")
            ax.plot(xs, [r["released"]["fewest_bits"] / bits for r in rows], marker="x", linestyle="none",
                    label=f"{name}, as released")
            for x, r in zip(xs, rows, strict=True):
                ax.annotate(f"α {r['alpha']:g}", (x, r["finetune"][-1]["fewest_bits"] / bits), fontsize=6)
        ax.axvline(100 * FIDELITY_BUDGET, color="red", linestyle="--", linewidth=1)
        ax.axhline(51 / 64, color="grey", linestyle=":", linewidth=1, label="claim at 1e-6, 64 bits (51)")
        ax.axhline(92 / 128, color="grey", linestyle="-.", linewidth=1, label="claim at 1e-6, 128 bits (92)")
        ax.set_xlabel("fidelity cost (held-out loss vs twin, %)", fontsize=7)
        ax.set_ylabel("fewest bits / N (worst owner)", fontsize=7)
        ax.set_title(f"{fam['family']}: fidelity vs fine-tuning survival", fontsize=8)
        ax.legend(fontsize=6)
        for i, ow in enumerate(fam["overwrite"]):
            ks = [r["strength"] for r in ow["by_keys"]]
            ax = row[1]
            ax.plot(ks, [r["fewest_bits"] / ow["bits"] for r in ow["by_keys"]], marker="o",
                    label=f"{ow['keys']} (α {ow['owners_alpha']:g})")
            ax2 = row[2]
            mults = [1.0] + [r["alpha_multiple"] for r in ow["by_strength_4_keys"]]
            four = [r for r in ow["by_keys"] if r["strength"] == 4.0]
            pts = four + ow["by_strength_4_keys"]
            if len(pts) == len(mults):
                ax2.semilogx(mults, [r["fewest_bits"] / ow["bits"] for r in pts], marker="o",
                             color=f"C{i}", label=f"{ow['keys']}: owners' fewest bits / N")
                cost = ax2.twinx() if i == 0 else cost
                cost.semilogx(mults, [r.get("cost_vs_control", float("nan")) for r in pts], marker="s",
                              color=f"C{i}", linestyle="--", label=f"{ow['keys']}: attacker's Δ loss")
                cost.set_ylabel("attacker's held-out Δ loss vs control (dashed)", fontsize=7)
        row[1].axhline(51 / 64, color="grey", linestyle=":", linewidth=1)
        row[1].set_xlabel("attacker keys (0 = fine-tuning alone)", fontsize=7)
        row[1].set_title(f"{fam['family']}: overwriting, owners' fewest bits", fontsize=8)
        row[1].legend(fontsize=6)
        row[2].axhline(51 / 64, color="grey", linestyle=":", linewidth=1)
        row[2].set_xlabel("attacker's α / owners' α (4 keys)", fontsize=7)
        row[2].set_title(f"{fam['family']}: attacker strength and its price", fontsize=8)
        row[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None, *, out_dir: Path = RESULTS,
         on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke run (seconds)")
    parser.add_argument("--part", choices=("all", "curves", "simulation"), default="all")
    parser.add_argument("--plan", choices=sorted(PLANS), default="full",
                        help="full: the alpha/bits/directions sweep and the overwriter; gamma0: the margin sweep "
                             "(writes watermark_tradeoff_gamma0.*)")
    parser.add_argument("--family", choices=("llama", "gpt2"), action="append",
                        help="model families for the curves (default both)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sim-rounds", type=int, default=6)
    parser.add_argument("--sim-local", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    plan = QUICK if args.quick else PLANS[args.plan]
    families = args.family or ["llama", "gpt2"]
    stem = "watermark_tradeoff_quick" if args.quick else "watermark_tradeoff" + (
        "" if args.plan == "full" else f"_{args.plan}")
    path = out_dir / f"{stem}.json"
    out: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    out.update({"load_before": os.getloadavg(), "threads": torch.get_num_threads(), "seed": args.seed,
                "plan": dataclasses.asdict(plan),
                "significance": 1e-6})
    t0 = time.perf_counter()
    if args.part in ("all", "curves"):
        bar = Bar(plan_steps(plan, len(families)), args.quiet)
        out.setdefault("families", {})
        for fam in families:
            out["families"][fam] = curves(fam, plan, args.seed, bar)
        bar.close()
    if args.part in ("all", "simulation"):
        rounds, local = (2, 5) if args.quick else (args.sim_rounds, args.sim_local)
        out["simulation"] = simulation(rounds, local, (20, 40) if args.quick else (200, 1000), args.quiet)
    out["seconds"] = time.perf_counter() - t0
    out["load_after"] = os.getloadavg()
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    draw(out, out_dir / f"{stem}.png")
    print(f"wrote {path} and {stem}.png ({out['seconds']:.0f} s, load {out['load_before']} -> {out['load_after']})")
    if on_result is not None:
        on_result(out)
    return out


if __name__ == "__main__":
    main()
