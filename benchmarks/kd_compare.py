"""FedHeteroLLM's ordering check and FedCoLLM's "both sides improve" check on SmolLM2, in one process.

    .venv/bin/python benchmarks/kd_compare.py hetero                  # examples/hetero_smollm2.yaml
    .venv/bin/python benchmarks/kd_compare.py co                      # examples/co_smollm2.yaml
    .venv/bin/python benchmarks/kd_compare.py hetero --set lam=0.5 temperature=1.0   # a KD variant
    .venv/bin/python benchmarks/kd_compare.py co --quick              # tiny random models, seconds

hetero (issue 17): the example as configured (**fed + KD**), the same with ``hetero.lam: 0`` (**fed without
KD**: FedHomoLLM on the mentee, no teacher built), fed + KD at the ``--lams`` values (default 0.3), **each
client alone with KD** (``run_local``: the client
step for as many rounds, no aggregation) and **each teacher** on the held-out split; then checks
fed+KD ≥ fed without KD ≥ local+KD (ROUGE-L, and perplexity the other way round) and prints it as measured.

co (issue 18): the example as configured (**co-tuned**), the same with ``co.directions: to_llm, co.lam: 0``
(the aggregate dispatched unchanged = **FedHomoLLM on the small model without the server step**, and the
LLM taking the same LM steps on the public batches = **LLM fine-tuned on the public data alone**), **each
client alone** (``run_local``), with ``--logits`` the FedMKT variant (``co.send_logits: true``) and with
``--also KEY=VALUE ...`` one more co-tuned run with those settings of the ``co:`` section (e.g.
``selective=false``: the small model teaches the LLM on every public sequence); round 0 of the co-tuned run
is the **zero-shot LLM**. Each co-tuned row also shows the share of public sequences on which the small
model taught the LLM (1.00 without ``selective``; with it, the share where its NLL was the lower).

Same data, test split (16 WordNet examples), seeds and healed model (cached) in every row. Each run's wall
seconds and the load average are recorded. Writes benchmarks/results/kd_compare_<trainer>[_<tag>].json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCORES = ("rougeL", "bleu4", "perplexity")


def _value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def _raw(trainer: str, quick: bool, settings: list[str]) -> dict[str, Any]:
    import yaml

    raw: dict[str, Any] = yaml.safe_load((ROOT / "examples" / f"{trainer}_smollm2.yaml").read_text())
    section = raw[trainer]
    for item in settings:
        key, _, text = item.partition("=")
        target = section
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = _value(text)
    if quick:
        raw["model"] = {"name_or_path": "tiny:llama"}
        raw["data"]["max_examples"] = 120
        heal = {"steps": 3, "batch_size": 2, "seq_len": 16}
        if trainer == "hetero":
            section.update(mentee_layers=1, mentee_heal=heal,
                           teachers={f"client{k}": {"source": "tiny:llama", "finetune_steps": 2}
                                     for k in range(raw["federation"]["clients"])})
        else:
            section.update(server_model="tiny:llama:4", small_layers=1, public_examples=16, public_seq_len=16,
                           server_steps=2, small_heal=heal)
    return raw


def _scores(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    return {k: float(row[f"{prefix}{k}"]) for k in SCORES}


def _run(trainer_cls: Any, raw: dict[str, Any], run_dir: Path, local: bool = False) -> dict[str, Any]:
    from fedguard_train.config import TrainConfig

    config = TrainConfig.from_dict({**raw, "run_dir": str(run_dir)})
    start = time.perf_counter()
    trainer = trainer_cls(config, quiet=True)
    result = trainer.run()
    out: dict[str, Any] = {"baseline": result.baseline, "history": result.history,
                           "seconds": time.perf_counter() - start, "load": os.getloadavg()}
    if local:
        start = time.perf_counter()
        out["local"] = trainer.run_local()
        out["local_seconds"] = time.perf_counter() - start
    for name in ("hetero.json", "heal.json"):
        if (run_dir / name).is_file():
            out[name.removesuffix(".json")] = json.loads((run_dir / name).read_text())
    if getattr(trainer, "heal_info", None) is not None:
        out["heal_line"] = trainer.heal_info.describe()
    return out


def _line(label: str, s: dict[str, float]) -> str:
    return f"| {label} | {s['rougeL']:.2f} | {s['bleu4']:.2f} | {s['perplexity']:,.1f} |"


def hetero(raw: dict[str, Any], tmp: Path, lams: list[float]) -> tuple[dict[str, Any], list[str]]:
    from fedguard_train.trainers.hetero import FedHeteroLLM

    kd = _run(FedHeteroLLM, raw, tmp / "kd", local=True)
    nokd = _run(FedHeteroLLM, {**raw, "hetero": {**raw["hetero"], "lam": 0.0}}, tmp / "nokd")
    sweep = {lam: _run(FedHeteroLLM, {**raw, "hetero": {**raw["hetero"], "lam": lam}}, tmp / f"lam{lam}")
             for lam in lams}
    fed_kd, fed = _scores(kd["history"][-1]), _scores(nokd["history"][-1])
    local = [_scores(r) for r in kd["local"]]
    lines = ["| model (final round) | ROUGE-L | BLEU-4 | perplexity |", "|---|---:|---:|---:|",
             _line("mentee before training (round 0)", _scores(kd["baseline"])),
             _line(f"fed + KD (lam {raw['hetero'].get('lam', 1.0)})", fed_kd),
             *[_line(f"fed + KD (lam {lam})", _scores(r["history"][-1])) for lam, r in sweep.items()],
             _line("fed without KD (lam 0)", fed)]
    lines += [_line(f"client {k} alone with KD", s) for k, s in enumerate(local)]
    lines += [_line(f"teacher of client {k}", {x: t[x] for x in SCORES})
              for k, t in enumerate(kd["hetero"]["teachers"])]
    best_local = max(s["rougeL"] for s in local)
    checks = {"fed+KD >= fed without KD (ROUGE-L)": fed_kd["rougeL"] >= fed["rougeL"],
              "fed+KD <= fed without KD (perplexity)": fed_kd["perplexity"] <= fed["perplexity"],
              "fed without KD >= every client alone with KD (ROUGE-L)": fed["rougeL"] >= best_local,
              "fed+KD >= every client alone with KD (ROUGE-L)": fed_kd["rougeL"] >= best_local}
    lines += ["", *[f"- {name}: {'holds' if ok else 'does NOT hold'}" for name, ok in checks.items()]]
    per_round = ["", "| round | LM loss | KD loss | ROUGE-L | perplexity |", "|---:|---:|---:|---:|---:|"]
    per_round += [f"| {r['round']} | {r.get('lm_loss', float('nan')):.3f} | {r.get('kd_loss', float('nan')):.3f} | "
                  f"{r['rougeL']:.2f} | {r['perplexity']:,.1f} |" for r in kd["history"]]
    return {"kd": kd, "nokd": nokd, "sweep": {str(k): v for k, v in sweep.items()}, "checks": checks}, lines + per_round


def _teaches(run: dict[str, Any]) -> str:
    """The share of public sequences on which the small model taught the LLM, per round."""
    shares = [r.get("server_small_teaches") for r in run["history"] if r.get("round", 0) > 0]
    if not shares or any(v is None for v in shares):
        return "1.00 (no selection)"
    return " / ".join(f"{float(v):.2f}" for v in shares)


def co(raw: dict[str, Any], tmp: Path, logits: bool, also: list[str]) -> tuple[dict[str, Any], list[str]]:
    from fedguard_train.trainers.co import FedCoLLM

    both = _run(FedCoLLM, raw, tmp / "both", local=True)
    base = _run(FedCoLLM, {**raw, "co": {**raw["co"], "directions": "to_llm", "lam": 0.0}}, tmp / "base")
    out: dict[str, Any] = {"both": both, "base": base}
    final, ref = both["history"][-1], base["history"][-1]
    lines = ["| model (final round) | ROUGE-L | BLEU-4 | perplexity |", "|---|---:|---:|---:|",
             _line("LLM zero-shot (round 0)", _scores(both["baseline"], "llm_")),
             _line("LLM fine-tuned on the public data alone", _scores(ref, "llm_")),
             _line("**LLM co-tuned**", _scores(final, "llm_")),
             _line("small model before training (round 0, healed)", _scores(both["baseline"])),
             *[_line(f"small model, client {r['client']} alone", _scores(r)) for r in both["local"]],
             _line("small model, FedHomoLLM without the server step", _scores(ref)),
             _line("**small model co-tuned**", _scores(final))]
    checks = {"LLM co-tuned >= zero-shot (ROUGE-L)": final["llm_rougeL"] >= both["baseline"]["llm_rougeL"],
              "LLM co-tuned >= public-only (ROUGE-L)": final["llm_rougeL"] >= ref["llm_rougeL"],
              "LLM co-tuned <= public-only (perplexity)": final["llm_perplexity"] <= ref["llm_perplexity"],
              "small co-tuned >= FedHomoLLM small (ROUGE-L)": final["rougeL"] >= ref["rougeL"],
              "small co-tuned <= FedHomoLLM small (perplexity)": final["perplexity"] <= ref["perplexity"],
              "small co-tuned >= every client alone (ROUGE-L)":
                  final["rougeL"] >= max(r["rougeL"] for r in both["local"])}
    teach = [f"- share of public sequences on which the small model taught the LLM, per round: co-tuned "
             f"{_teaches(both)}"]
    if also:
        extra = {k: _value(v) for k, _, v in (item.partition("=") for item in also)}
        variant = _run(FedCoLLM, {**raw, "co": {**raw["co"], **extra}}, tmp / "also")
        out["also"] = {"settings": extra, **variant}
        label = ", ".join(f"{k} {v}" for k, v in extra.items())
        lines += [_line(f"LLM co-tuned ({label})", _scores(variant["history"][-1], "llm_")),
                  _line(f"small co-tuned ({label})", _scores(variant["history"][-1]))]
        checks[f"LLM co-tuned ({label}) >= public-only (ROUGE-L)"] = \
            variant["history"][-1]["llm_rougeL"] >= ref["llm_rougeL"]
        checks[f"LLM co-tuned ({label}) <= public-only (perplexity)"] = \
            variant["history"][-1]["llm_perplexity"] <= ref["llm_perplexity"]
        teach.append(f"- the same with {label}: {_teaches(variant)}")
    if logits:
        mkt = _run(FedCoLLM, {**raw, "co": {**raw["co"], "send_logits": True}}, tmp / "logits")
        out["logits"] = mkt
        lines += [_line("LLM co-tuned + FedMKT logits to clients", _scores(mkt["history"][-1], "llm_")),
                  _line("small co-tuned + FedMKT logits to clients", _scores(mkt["history"][-1]))]
        checks["FedMKT logits: small >= co-tuned without them (ROUGE-L)"] = \
            mkt["history"][-1]["rougeL"] >= final["rougeL"]
    lines += ["", *[f"- {name}: {'holds' if ok else 'does NOT hold'}" for name, ok in checks.items()], *teach]
    per_round = ["", "| run | round | LLM ROUGE-L | LLM ppl | small ROUGE-L | small ppl | server s | small teaches |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("both", "base", "also", "logits"):
        for r in out.get(name, {}).get("history", []):
            per_round.append(f"| {name} | {r['round']} | {r['llm_rougeL']:.2f} | {r['llm_perplexity']:,.1f} | "
                             f"{r['rougeL']:.2f} | {r['perplexity']:,.1f} | {float(r.get('server_seconds', 0)):.1f} | "
                             f"{r.get('server_small_teaches', '-')} |")
    out["checks"] = checks
    return out, lines + per_round


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trainer", choices=("hetero", "co"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override keys of the trainer's section (e.g. lam=0.5, small_heal.steps=100)")
    parser.add_argument("--logits", action="store_true", help="co: also the FedMKT logits variant")
    parser.add_argument("--also", nargs="*", default=[], metavar="KEY=VALUE",
                        help="co: one more co-tuned run with these co: settings (e.g. selective=false)")
    parser.add_argument("--lams", type=float, nargs="*", default=[0.3],
                        help="hetero: further fed + KD runs at these lam values (the KD-strength sweep)")
    parser.add_argument("--tag", default="", help="suffix of the JSON file")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    raw = _raw(args.trainer, args.quick, args.set)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"fedguard-{args.trainer}-compare-") as tmp:
        if args.trainer == "hetero":
            out, lines = hetero(raw, Path(tmp), args.lams)
        else:
            out, lines = co(raw, Path(tmp), args.logits, args.also)
    out.update(settings=args.set, quick=args.quick, wall_seconds=time.perf_counter() - start,
               load_average_end=os.getloadavg(), threads=args.threads)
    heal = next((r["heal_line"] for r in out.values() if isinstance(r, dict) and "heal_line" in r), None)
    print(f"\n{args.trainer} {' '.join(args.set)}  (wall {out['wall_seconds']:.0f} s, load {os.getloadavg()})")
    if heal:
        print(f"healed model: {heal}")
    print("\n".join(lines))
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    name = f"kd_compare_{args.trainer}{'_quick' if args.quick else ''}{'_' + args.tag if args.tag else ''}.json"
    (results / name).write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {results / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
