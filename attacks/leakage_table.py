"""The tiny-model leakage tables of docs/results.md: ``python -m attacks.leakage_table --out FILE.json``.

Update inversion (:mod:`attacks.inversion`) on a 2-block GPT-2-style model of width 128 (vocabulary 256,
random sequences of 12 tokens + EOS), each setting over ``--trials`` batches, what the server sees being:

* the full single-step gradient of one client, batch sizes 1, 4, 16;
* a multi-step local update ``θ_k − θ_r`` (5 steps, SGD or Adam) of one client;
* LoRA ranks 8 and 64 (single step, ``B`` initialised away from zero as after a first round);
* masking with 3 clients: each client's masked vector, and the revealed sum (the union batch);
* the revealed sum with Gaussian noise of std ``z·C`` (``z = 1``, the update clipped to ``C``), what
  distributed DP leaves in it.

Membership inference (:mod:`attacks.membership`) on the tiny GPT-2 of the tests (width 32): overfitted on
32 members (150 steps), lightly trained on them (20 steps), and a control model trained on other
examples; every attack, LiRA with 2 shadows (trained with the overfitting recipe).
Deterministic with ``--seed``; the numbers depend on nothing else.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.inversion import InversionConfig, batch_gradient, dager, score_recovery, target_parameters
from attacks.optimisation import LampConfig, Target, lamp

VOCAB, EOS, LENGTH = 256, 0, 12


def model_128(seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=128, n_layer=2, n_head=4,
                                      bos_token_id=EOS, eos_token_id=EOS))


def _batches(gen: torch.Generator, size: int) -> list[list[int]]:
    return [torch.randint(1, VOCAB, (LENGTH,), generator=gen).tolist() + [EOS] for _ in range(size)]


def _local_update(model: torch.nn.Module, batch: list[list[int]], names: Sequence[str], *, steps: int,
                  optimizer: str, lr: float) -> dict[str, torch.Tensor]:
    import copy

    local = copy.deepcopy(model)
    params = [p for p in local.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.Adam(params, lr=lr)
    ids = torch.tensor(batch)
    local.eval()
    for _ in range(steps):
        loss = local(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    before, after = dict(model.named_parameters()), dict(local.named_parameters())
    return {n: (after[n] - before[n]).detach() for n in names}


DP_SECTION: dict[str, Any] = {"placement": "distributed", "clip_norm": 1.0, "noise_multiplier": 1.0,
                               "min_survivors": 3, "target_delta": 1e-3}
"""The DP rows' ``dp:`` section: distributed discrete Gaussian, z = 1, C = 1, all 3 clients needed."""


def _protocol_round(model: torch.nn.Module, batches: list[list[list[int]]], names: Sequence[str],
                    dp: dict[str, Any] | None) -> Any:
    import tempfile

    from attacks.protocol_view import fedsgd_round

    with tempfile.TemporaryDirectory(prefix="fedguard-leakage-") as tmp:
        return fedsgd_round(model, batches, names, Path(tmp), aggregator="masking",
                            aggregator_options={"threshold": len(batches)}, dp=dp)


def _mean_scores(scores: Sequence[Any]) -> dict[str, float]:
    """The table's recovery columns: each :func:`score_recovery` field averaged over the trials."""
    return {k: float(np.mean([getattr(x, k) for x in scores]))
            for k in ("exact", "token_accuracy", "rouge1", "rouge2", "chance_rouge1")}


def _lora_model(seed: int, r: int) -> torch.nn.Module:
    """:func:`model_128` with a rank-``r`` LoRA on ``c_attn``, ``B`` initialised away from zero (as after a
    first round)."""
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model_128(seed), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                      target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.02)
    return lora


def inversion_rows(trials: int, seed: int, *, lamp_trials: int = 3, lamp_batches: Sequence[int] = (1, 4),
                   lamp_config: LampConfig | None = None) -> list[dict[str, Any]]:
    """DAGER rows (``trials`` batches each) and LAMP rows (``lamp_trials`` batches each)."""
    cfg = InversionConfig(eos_id=EOS, max_len=16, seed=seed)
    lcfg = lamp_config or LampConfig(eos_id=EOS, steps=300, restarts=1, seed=seed)
    rows: list[dict[str, Any]] = []
    View = Callable[[torch.nn.Module, list[list[list[int]]]], tuple[dict[str, Any], list[list[int]], float]]

    def measure(name: str, model: torch.nn.Module, batch_size: int, view: View, clients: int = 1,
                method: str = "dager", target: Target = "gradient") -> None:
        gen = torch.Generator().manual_seed(seed)
        scores, informative, distances, start = [], 0, [], time.perf_counter()
        n = trials if method == "dager" else lamp_trials
        for _ in range(n):
            batches = [_batches(gen, batch_size) for _ in range(clients)]
            updates, truth, noise = view(model, batches)
            if method == "dager":
                out = dager(model, updates, config=cfg, noise_std=noise, lengths_hint=[len(s) for s in truth])
                sequences, ok = out.sequences, out.informative
            else:
                found = lamp(model, updates, [len(s) for s in truth], config=lcfg, target=target)
                sequences, ok = found.sequences, found.final_distance < 0.1
                distances.append(found.final_distance)
            scores.append(score_recovery(truth, sequences, vocab_size=VOCAB, seed=seed))
            informative += ok
        row: dict[str, Any] = {"setting": name, "method": method, "batch": batch_size, "clients": clients,
                               "trials": n, **_mean_scores(scores), "informative": informative,
                               "seconds": time.perf_counter() - start}
        if distances:
            row["final_distance"] = float(np.mean(distances))
        rows.append(row)
        print(f"{method:5s} {name:52s} B={batch_size:<3d} exact {100 * row['exact']:5.1f}%  "
              f"tok {100 * row['token_accuracy']:5.1f}%  R1 {row['rouge1']:5.1f}  R2 {row['rouge2']:5.1f}  "
              f"chance R1 {row['chance_rouge1']:4.1f}  informative {informative}/{n}  {row['seconds']:.0f} s",
              flush=True)

    full = model_128(seed)
    names = list(target_parameters(full)[:2])
    every = [n for n, _ in full.named_parameters()]  # full fine-tuning: the server sees every gradient

    def gradient(model: torch.nn.Module, batches: list[list[list[int]]]) -> tuple[dict[str, Any], list[list[int]], float]:
        return batch_gradient(model, batches[0], every), batches[0], 0.0

    for b in (1, 4, 16):
        measure("full fine-tuning, 1-step gradient, plaintext", full, b, gradient)
    for b in lamp_batches:
        measure("full fine-tuning, 1-step gradient, plaintext", full, b, gradient, method="lamp")
    for opt, lr in (("sgd", 0.05), ("adam", 1e-3)):
        def update(model: torch.nn.Module, batches: list[list[list[int]]], opt: str = opt, lr: float = lr
                   ) -> tuple[dict[str, Any], list[list[int]], float]:
            return _local_update(model, batches[0], names, steps=5, optimizer=opt, lr=lr), batches[0], 0.0
        for b in (1, 4):
            measure(f"full fine-tuning, 5-step {opt} update, plaintext", full, b, update)

    # masking (3 clients) and masking + distributed DP: one real FedSGD round through run_round, the
    # masking aggregator and (for DP) the ClientDPHook, its server view captured and read back
    for label, dp in (("masking", None), ("masking + DP (z=1, C=1)", DP_SECTION)):
        def client_view(model: torch.nn.Module, batches: list[list[list[int]]], dp: dict[str, Any] | None = dp
                        ) -> tuple[dict[str, Any], list[list[int]], float]:
            view = _protocol_round(model, batches, every, dp)
            return view.clients[0], batches[0], view.noise_std

        def sum_view(model: torch.nn.Module, batches: list[list[list[int]]], dp: dict[str, Any] | None = dp
                     ) -> tuple[dict[str, Any], list[list[int]], float]:
            view = _protocol_round(model, batches, every, dp)
            return view.mean, [s for b in batches for s in b], view.noise_std / len(batches)

        for method in ("dager", "lamp"):
            measure(f"{label}, one client's captured masked vector", full, 1, client_view, clients=3,
                    method=method, target="update")
            measure(f"{label}, revealed sum of 3 clients (union)", full, 1, sum_view, clients=3,
                    method=method, target="update")

    for r in (8, 64):
        lora = _lora_model(seed, r)
        lnames = list(target_parameters(lora)[:2])

        def lora_grad(model: torch.nn.Module, batches: list[list[list[int]]], lnames: list[str] = lnames
                      ) -> tuple[dict[str, Any], list[list[int]], float]:
            return batch_gradient(model, batches[0], lnames), batches[0], 0.0
        measure(f"LoRA r={r}, 1-step gradient of A, plaintext", lora, 1, lora_grad)
    return rows


def lamp_extra_rows(trials: int, seed: int, *, batches: Sequence[int] = (16,), lora_batches: Sequence[int] = (1, 4),
                    ranks: Sequence[int] = (8, 64), lamp_config: LampConfig | None = None) -> list[dict[str, Any]]:
    """LAMP where the main table has DAGER only: the full single-step gradient at larger batches
    (``batches``), and LoRA's single-step gradient of every adapter tensor (A and B of each block's
    ``c_attn``, as the server receives it; ``B`` initialised away from zero as after a first round) at ranks
    ``ranks`` and batch sizes ``lora_batches``. Same model, data, LAMP budget and scoring as
    :func:`inversion_rows`."""
    lcfg = lamp_config or LampConfig(eos_id=EOS, steps=300, restarts=1, seed=seed)
    rows: list[dict[str, Any]] = []

    def measure(name: str, model: torch.nn.Module, names: Sequence[str], batch_size: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        scores, distances, start = [], [], time.perf_counter()
        for _ in range(trials):
            batch = _batches(gen, batch_size)
            found = lamp(model, batch_gradient(model, batch, names), [len(x) for x in batch], config=lcfg,
                         target="gradient")
            distances.append(found.final_distance)
            scores.append(score_recovery(batch, found.sequences, vocab_size=VOCAB, seed=seed))
        row: dict[str, Any] = {"setting": name, "method": "lamp", "batch": batch_size, "clients": 1,
                               "trials": trials, **_mean_scores(scores),
                               "informative": int(sum(d < 0.1 for d in distances)),
                               "final_distance": float(np.mean(distances)), "seconds": time.perf_counter() - start}
        rows.append(row)
        print(f"lamp  {name:52s} B={batch_size:<3d} exact {100 * row['exact']:5.1f}%  "
              f"tok {100 * row['token_accuracy']:5.1f}%  R1 {row['rouge1']:5.1f}  chance R1 {row['chance_rouge1']:4.1f}"
              f"  D {row['final_distance']:.3f}  {row['seconds']:.0f} s", flush=True)

    full = model_128(seed)
    every = [n for n, _ in full.named_parameters()]
    for b in batches:
        measure("full fine-tuning, 1-step gradient, plaintext", full, every, b)
    for r in ranks:
        lora = _lora_model(seed, r)
        adapter = [n for n, p in lora.named_parameters() if p.requires_grad]
        for b in lora_batches:
            measure(f"LoRA r={r}, 1-step gradient of the adapter, plaintext", lora, adapter, b)
    return rows


def membership_rows(seed: int) -> list[dict[str, Any]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from attacks.membership import MembershipConfig, ShadowRecipe, run_membership, train_shadow

    def items(s: int, n: int) -> list[dict[str, list[int]]]:
        gen = torch.Generator().manual_seed(s)
        return [{"input_ids": torch.randint(1, 64, (16,), generator=gen).tolist()} for _ in range(n)]

    torch.manual_seed(5)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    members, nonmembers, population, other = items(1, 32), items(2, 32), items(3, 32), items(4, 32)
    recipe = ShadowRecipe(steps=150, batch_size=8, lr=3e-3)
    light = ShadowRecipe(steps=20, batch_size=8, lr=3e-3)
    rows = []
    for name, train_on, how in (("overfitted on the members (150 steps)", members, recipe),
                                ("lightly trained on the members (20 steps)", members, light),
                                ("trained on other examples (control)", other, recipe)):
        target = train_shadow(base, train_on, how, seed=11)
        report = run_membership(target, members, nonmembers, reference=base, population=population,
                                config=MembershipConfig(shadows=2, recipe=recipe, n_boot=1000, seed=seed))
        for r in report.results:
            row = {"target": name, **r.to_json()}
            rows.append(row)
            print(f"{name:40s} {r.attack:9s} AUC {r.roc.auc:.3f} [{r.roc.auc_ci[0]:.3f}, {r.roc.auc_ci[1]:.3f}] "
                  f"TPR@1%FPR {100 * r.roc.tpr_at[0.01]:5.1f}%", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--lamp-trials", type=int, default=3, help="batches per LAMP row (it is the slow attack)")
    parser.add_argument("--lamp-batches", type=int, nargs="*", default=[1, 4], help="LAMP's plaintext batch sizes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lamp-extra", action="store_true",
                        help="only LAMP at --lamp-batches on the full gradient and on LoRA r=8/64 at --lora-batches "
                             "(lamp_extra_rows) — the rows the main table has with DAGER only")
    parser.add_argument("--lora-batches", type=int, nargs="*", default=[1, 4], help="with --lamp-extra: LoRA batch sizes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    if args.lamp_extra:
        extra: dict[str, Any] = {"lamp_extra": lamp_extra_rows(args.lamp_trials, args.seed, batches=args.lamp_batches,
                                                               lora_batches=args.lora_batches)}
        extra["seconds"] = time.perf_counter() - started
        Path(args.out).write_text(json.dumps(extra, indent=2) + "\n")
        return 0
    doc: dict[str, Any] = {
        "inversion": inversion_rows(args.trials, args.seed, lamp_trials=args.lamp_trials,
                                    lamp_batches=args.lamp_batches),
        "membership": membership_rows(args.seed)}
    doc["seconds"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
