"""The cost of privacy per round, end to end: round time per aggregator ÷ plaintext, bytes vs fp32, ROUGE-L.

    .venv/bin/python benchmarks/round_cost.py            # SmolLM2-135M, examples/homo_lora.yaml settings
    .venv/bin/python benchmarks/round_cost.py --quick    # tiny random GPT-2, seconds (checks the plumbing)

Three parts, all in one run (so that the ratios share the machine's load):

1. **Round time.** The trainer (FedHomoLLM, LoRA, 3 clients, the example's data and local steps) runs one
   round with each aggregator — plaintext, masking, MPC (CrypTen party processes), Paillier (2048-bit key
   generated in the round, packed, DJN obfuscators, ``--paillier-workers`` processes) — all at the same
   encoding, by default the example's own (since session 5 an 8-bit quantised upload at the public clip;
   ``--upload-bits reference`` for the 24-bit fp32-equivalent one, or a 16/32-bit upload). A hook records
   the time from the round's start to the decoded mean (local training of every client + encoding + the
   protocol over serialised messages; evaluation excluded), and the protocol part alone (from the last
   client's update to the decoded mean). Plaintext runs first and last; the ratio uses their mean. Paillier
   also runs with ``precompute`` (the pools filled before local training: offline seconds reported apart and
   added in the end-to-end ratio) and ``precompute_background`` (filled on nice-19 processes *during* local
   training: inside the round's time). Reported: round time ÷ plaintext, end to end ÷ plaintext, and the
   contention-robust ``(T_plain + Δprotocol) / T_plain``.
2. **Bytes and quality.** ``rounds`` rounds (default 3, the example's) of the plaintext aggregator with the
   reference encoding (24-bit values, 64-bit ring: the "fp32" reference, its quantisation step is 1.2e-7 of
   the clip) and with 16- and 8-bit quantised uploads (equal client weights), the 8-bit one also with the
   Hadamard rotation: bytes up per client per round from the real messages ÷ the bytes of a float32 upload
   of the same adapter (one wire message of ``d`` float32 values), and ROUGE-L / perplexity after the last
   round. The shared public scale of the quantised uploads is ``clip = 1.25 · lr · local_steps`` (AdamW
   moves a coordinate by about ``lr`` per step), from public hyperparameters only.
3. **Quantisation error.** The first-round client updates of the reference run (real LoRA deltas) are
   summed through the encoding at 8/16/32-bit uploads and 24-bit values (64-bit ring), with and without
   rotation: bytes per value on the wire and the aggregate NMSE ``‖mean̂ − mean‖² / ‖mean‖²`` (mean of 5
   quantisation draws), at the public clip and at the oracle clip ``max |y|`` (the largest value to encode).

Writes benchmarks/results/round_cost.json (``--quick``: round_cost_quick.json) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedguard import wire  # noqa: E402
from fedguard.encoding import decode_weighted_mean, encode_weighted, ring_sum  # noqa: E402
from fedguard.quantise import plan_upload  # noqa: E402
from fedguard.rng import SecureRNG  # noqa: E402
from fedguard.updates import ClientUpdate  # noqa: E402
from fedguard_train.config import TrainConfig  # noqa: E402
from fedguard_train.hooks import TrainerHook  # noqa: E402


class RoundTimer(TrainerHook):
    """Times each round up to the decoded mean: start → last client update → aggregate (no evaluation);
    keeps the first round's client updates (after the hooks, before the upload plan) when asked."""

    name = "round-timer"

    def __init__(self, keep_updates: bool = False) -> None:
        self.keep_updates = keep_updates
        self.rounds: list[dict[str, float]] = []
        self.updates: list[np.ndarray] = []
        self._start = self._last = self._cpu_start = self._cpu_last = 0.0

    def on_round_start(self, round_id: int, participants: Sequence[int]) -> None:
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def client_update(self, update: ClientUpdate) -> ClientUpdate:
        self._last, self._cpu_last = time.perf_counter(), time.process_time()
        if self.keep_updates and update.round == 1:
            self.updates.append(update.vector.copy())
        return update

    def aggregate(self, round_id: int, mean: np.ndarray, contributors: Sequence[int]) -> np.ndarray:
        now = time.perf_counter()
        # training_cores: CPU seconds of this process (all its threads) per wall second from the round's start
        # to the last client update: how much of the machine local training keeps busy
        self.rounds.append({"round": round_id, "round_seconds": now - self._start, "protocol_seconds": now - self._last,
                            "training_cores": (self._cpu_last - self._cpu_start) / max(self._last - self._start, 1e-9)})
        return mean


def base_config(quick: bool, run_dir: Path, task: Path | None) -> dict[str, Any]:
    if quick:
        assert task is not None
        return {"run_dir": str(run_dir), "seed": 0, "trainer": "homo", "model": {"name_or_path": "tiny:gpt2"},
                "adapter": {"method": "lora", "r": 4, "dropout": 0.0},
                "data": {"source": "jsonl", "path": str(task), "max_examples": 60, "test_size": 6, "partition": "iid"},
                "federation": {"clients": 3, "rounds": 2},
                "training": {"local_steps": 2, "batch_size": 4, "lr": 0.01},
                "eval": {"max_new_tokens": 4, "examples": 4}}
    raw = TrainConfig.from_yaml(ROOT / "examples" / "homo_lora.yaml").to_dict()
    raw["run_dir"] = str(run_dir)
    return raw


REFERENCE_ENCODING: dict[str, Any] = {"clip": 1.0, "value_bits": 24, "ring_bits": "auto", "upload_bits": None,
                                      "rotation": False}
"""The fp32-equivalent encoding (24-bit values at clip 1, step 1.2e-7, in the ring sized to need: 64 bits for the
demo's ~300 examples per client); the trainer's defaults, and the demo's encoding before session 5."""


def split_encoding(raw: dict[str, Any]) -> dict[str, Any]:
    """Remove the example's upload encoding from ``raw`` (which is left at :data:`REFERENCE_ENCODING`, so
    every variant below states its own encoding against the reference) and return it."""
    fed = raw["federation"]
    demo = {key: fed.get(key, default) for key, default in REFERENCE_ENCODING.items()}
    fed.update(REFERENCE_ENCODING)
    return demo


def timing_encoding(upload_bits: str, demo: dict[str, Any], public_clip: float) -> dict[str, Any]:
    """The timing runs' encoding, the same for every aggregator: ``demo`` (the example's own), ``reference``
    (:data:`REFERENCE_ENCODING`) or an ``8``/``16``/``32``-bit quantised upload at the public clip."""
    if upload_bits == "demo":
        return dict(demo)
    if upload_bits == "reference":
        return dict(REFERENCE_ENCODING)
    return {**REFERENCE_ENCODING, "upload_bits": int(upload_bits), "clip": public_clip}


def run_variant(raw: dict[str, Any], name: str, federation: dict[str, Any], *, rounds: int, evaluate: bool,
                keep_updates: bool = False) -> dict[str, Any]:
    from fedguard_train.trainers.homo import FedHomoLLM

    cfg = json.loads(json.dumps(raw))
    cfg["run_dir"] = str(Path(raw["run_dir"]) / name)
    cfg["federation"] = {**cfg["federation"], **federation, "rounds": rounds}
    if not evaluate:  # timing runs: the smallest evaluation the trainer allows (excluded from the timings anyway)
        cfg["eval"] = {**cfg["eval"], "examples": 1, "max_new_tokens": 1}
    config = TrainConfig.from_dict(cfg)
    timer = RoundTimer(keep_updates)
    started = time.perf_counter()
    trainer = FedHomoLLM(config, hooks=[timer], quiet=True)
    result = trainer.run(overwrite=True)
    d = trainer.layout.size
    fp32_upload = wire.encoded_size(wire.Message(kind="fp32-upload", round=1, stage="input", sender=0,
                                                 recipient=wire.SERVER, arrays={"x": np.zeros(d, np.float32)}))
    clients = config.federation.clients
    out: dict[str, Any] = {
        "variant": name, "aggregator": config.federation.aggregator, "federation": federation,
        "ring_bits": trainer.spec.ring_bits, "value_bits": trainer.spec.value_bits, "clip": trainer.spec.clip,
        "travelling_values": d, "rounds": timer.rounds, "wall_seconds": time.perf_counter() - started,
        "bytes_up_per_client": [row["bytes_up"] / clients for row in result.history],
        "fp32_upload_bytes": fp32_upload,
        "upload_vs_fp32": float(np.mean([row["bytes_up"] / clients for row in result.history]) / fp32_upload),
        "final": {k: result.history[-1].get(k) for k in ("rougeL", "rouge1", "perplexity", "train_loss")},
        "baseline": {k: result.baseline.get(k) for k in ("rougeL", "perplexity")},
    }
    out["_offline"] = [row.get("offline_seconds") for row in result.history]
    if keep_updates:
        out["_updates"] = timer.updates
    return out


def nmse_table(updates: list[np.ndarray], public_clip: float, seed: int = 0) -> list[dict[str, Any]]:
    """Aggregate NMSE of the encoding (equal weights) over the clients' real updates, 5 quantisation draws."""
    n, d = len(updates), updates[0].size
    exact = np.mean(np.stack(updates).astype(np.float64), axis=0)
    rows = []
    encodings: list[tuple[str, dict[str, Any]]] = [("8-bit upload", {"upload_bits": 8}),
                                                    ("16-bit upload", {"upload_bits": 16}),
                                                    ("32-bit upload", {"upload_bits": 32}),
                                                    ("24-bit values, 64-bit ring", {"value_bits": 24, "ring_bits": 64})]
    for label, fields in encodings:
        for rotation in (False, True):
            base: dict[str, Any] = {"value_bits": 24, **fields}
            probe = plan_upload(clip=1.0, n_clients=n, max_weight=1, dimension=d, rotation=rotation, seed="nmse",
                                **base)
            rotated = [probe.forward(ClientUpdate(c, 1, u, 1)).vector for c, u in enumerate(updates)]
            oracle = float(max(np.abs(r).max() for r in rotated))
            for clip_name, clip in (("public", public_clip), ("oracle", oracle)):
                plan = plan_upload(clip=clip, n_clients=n, max_weight=1, dimension=d, rotation=rotation, seed="nmse",
                                   **base)
                errors = []
                for draw in range(5):
                    rng = SecureRNG.for_testing(f"nmse/{seed}/{label}/{rotation}/{clip_name}/{draw}")
                    ring = [encode_weighted(plan.forward(ClientUpdate(c, 1, u, 1)).vector, 1, plan.spec,
                                            rng=rng.spawn(str(c))) for c, u in enumerate(updates)]
                    mean, _ = decode_weighted_mean(ring_sum(ring, plan.spec.ring_bits), plan.spec)
                    got = plan.inverse(mean, 1).astype(np.float64)
                    errors.append(float(np.sum((got - exact) ** 2) / np.sum(exact ** 2)))
                rows.append({"encoding": label, "rotation": rotation, "clip": clip_name, "clip_value": clip,
                             "ring_bits": plan.spec.ring_bits, "value_bits": plan.spec.value_bits,
                             "bytes_per_value": plan.bytes_per_value, "nmse": float(np.mean(errors)),
                             "nmse_draws": errors})
    return rows


def quality_variants(public_clip: float) -> list[tuple[str, dict[str, Any]]]:
    """Part 2's encodings (plaintext aggregator): the fp32-equivalent reference (24-bit values at clip 1,
    step 1.2e-7, in a 64-bit ring: 2× fp32's bytes; the demo's ~300 examples per client need 34 bits at 24-bit
    values, so ``ring_bits: auto`` is 64 here too), a 32-bit ring (16-bit values at the public clip,
    sample-count weights, ``ring_bits: auto``), 32/16/8-bit quantised uploads at the public clip (equal
    weights), and 8/16-bit with the Hadamard rotation."""
    return [
        ("fp32-reference (24-bit values, 64-bit ring)", {"ring_bits": 64}),
        ("32-bit ring (16-bit values, ring auto)", {"value_bits": 16, "clip": public_clip}),
        ("32-bit upload", {"upload_bits": 32, "clip": public_clip}),
        ("16-bit upload", {"upload_bits": 16, "clip": public_clip}),
        ("8-bit upload", {"upload_bits": 8, "clip": public_clip}),
        ("8-bit upload + rotation", {"upload_bits": 8, "clip": public_clip, "rotation": True}),
        ("16-bit upload + rotation", {"upload_bits": 16, "clip": public_clip, "rotation": True}),
    ]


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


PAILLIER_VARIANTS = ("paillier", "paillier+precompute", "paillier+background")


def timing_order(aggregators: Sequence[str], repeats: int,
                 paillier_variants: Sequence[str] = PAILLIER_VARIANTS) -> list[tuple[int, str]]:
    """(repeat, label) in run order: a discarded plaintext warm-up (repeat -1), then ``repeats`` times
    plaintext followed by every other aggregator (Paillier also pooled: ``+precompute`` fills the pools
    before local training, ``+background`` on low-priority processes during it), and a closing plaintext, so
    that every private run has a plaintext run on each side of it."""
    others = [a for a in aggregators if a != "plaintext"]
    if "paillier" in others:  # pooled: obfuscators made before local training (offline) / during it (background)
        at = others.index("paillier")
        others[at:at + 1] = [v for v in PAILLIER_VARIANTS if v in paillier_variants]
    order = [(-1, "plaintext")]
    for rep in range(repeats):
        order += [(rep, "plaintext")] + [(rep, label) for label in others]
    return order + [(repeats, "plaintext")]


def timing_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each private run ÷ the mean of the plaintext runs just before and just after it (same load, same
    moment), then the median over repeats; the end-to-end ratio adds the offline seconds spent before the
    round (Paillier's pool filled before local training) to the private run's time; also the contention-robust ``(T_plain + P − P_plain) / T_plain``
    (P: the protocol part, from the last client update to the decoded mean)."""
    runs = [r for r in rows if r["repeat"] >= 0]
    plain_idx = [i for i, r in enumerate(runs) if r["label"] == "plaintext"]
    per_label: dict[str, dict[str, list[float]]] = {}
    for i, r in enumerate(runs):
        if r["label"] == "plaintext":
            continue
        before = max(j for j in plain_idx if j < i)
        after = min(j for j in plain_idx if j > i)
        t_p = float(np.mean([runs[j]["rounds"][0]["round_seconds"] for j in (before, after)]))
        p_p = float(np.mean([runs[j]["rounds"][0]["protocol_seconds"] for j in (before, after)]))
        t, p = r["rounds"][0]["round_seconds"], r["rounds"][0]["protocol_seconds"]
        entry = per_label.setdefault(r["label"], {"ratio": [], "ratio_protocol_delta": [], "round_seconds": [],
                                                   "protocol_seconds": [], "offline_seconds": [],
                                                   "end_to_end_ratio": []})
        offline = float(sum(o or 0.0 for o in r["offline_seconds"]))
        entry["ratio"].append(t / t_p)
        entry["end_to_end_ratio"].append((t + offline) / t_p)
        entry["ratio_protocol_delta"].append((t_p + p - p_p) / t_p)
        entry["round_seconds"].append(t)
        entry["protocol_seconds"].append(p)
        entry["offline_seconds"].append(offline)
    summary: dict[str, Any] = {}
    for label, entry in per_label.items():
        summary[label] = {**entry, "ratio_median": float(np.median(entry["ratio"])),
                          "ratio_protocol_delta_median": float(np.median(entry["ratio_protocol_delta"])),
                          "end_to_end_ratio_median": float(np.median(entry["end_to_end_ratio"])),
                          "protocol_seconds_median": float(np.median(entry["protocol_seconds"]))}
    plain = [runs[j]["rounds"][0] for j in plain_idx]
    summary["plaintext"] = {"round_seconds": [p["round_seconds"] for p in plain],
                            "protocol_seconds": [p["protocol_seconds"] for p in plain]}
    return summary


def warm_paillier_workers(workers: int) -> None:
    """Start Paillier's worker processes (the normal and the low-priority pool) with a trivial job each."""
    from fedguard.secagg.paillier.keys import start_workers

    if workers > 1:
        start_workers(workers)
    start_workers(max(1, workers), background=True)


def timing_part(raw: dict[str, Any], args: argparse.Namespace, report: dict[str, Any], save: Any) -> None:
    """Part 1: one round per run, in :func:`timing_order`; rows and summary into ``report``."""
    if "paillier" in args.aggregators:  # spawn the worker processes once, before anything is timed (a
        warm_paillier_workers(args.paillier_workers)  # trainer process pays this once in its lifetime)
    for i, (rep, label) in enumerate(timing_order(args.aggregators, args.repeats, args.paillier_variants)):
        name = label.split("+")[0]
        options: dict[str, Any] = {}
        if label.endswith("+precompute") or label.endswith("+background"):
            options["precompute"] = True
        if label.endswith("+background"):
            options["precompute_background"] = True
        if name == "paillier":  # a client encrypts (and the key holder decrypts) on this machine's cores
            options["workers"] = args.paillier_workers
        if name == "paillier" and args.quick:
            options.update(key_bits=512, allow_insecure_test_keys=True)
        if name == "mpc" and args.quick:
            options = {"backend": "simulated"}
        # every aggregator (plaintext too) at the same encoding
        federation: dict[str, Any] = {"aggregator": name, "aggregator_options": options, **args.timing_encoding}
        row = run_variant(raw, f"time-{i}-{name}", federation, rounds=1, evaluate=False)
        row["label"], row["repeat"] = label, rep
        row["offline_seconds"] = row.pop("_offline")
        row["load"] = load_line()
        report["timing"].append(row)
        r = row["rounds"][0]
        print(f"[timing] {'warm-up ' if rep < 0 else ''}{label}: round {r['round_seconds']:.1f} s (protocol "
              f"{r['protocol_seconds']:.2f} s, training kept {r['training_cores']:.2f} cores busy), "
              f"{row['bytes_up_per_client'][0] / 1e6:.2f} MB up/client, "
              f"load {row['load']}", flush=True)
        save()
    report["timing_summary"] = timing_summary(report["timing"])
    for label, entry in report["timing_summary"].items():
        if label != "plaintext":
            print(f"[timing] {label}: round ÷ plaintext {entry['ratio_median']:.3f}, end to end (+ offline "
                  f"{np.median(entry['offline_seconds']):.1f} s) {entry['end_to_end_ratio_median']:.3f} (runs "
                  f"{', '.join(f'{x:.3f}' for x in entry['ratio'])}), (T+ΔP)/T {entry['ratio_protocol_delta_median']:.3f}, "
                  f"protocol {entry['protocol_seconds_median']:.2f} s", flush=True)
    save()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model (checks the plumbing)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the quality runs (default: the example's)")
    parser.add_argument("--aggregators", nargs="*", default=["plaintext", "masking", "mpc", "paillier"])
    parser.add_argument("--variants", type=int, nargs="*", default=None,
                        help="quality: indices into quality_variants (default: all; 0 = the reference)")
    parser.add_argument("--paillier-workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="timing: Paillier encryption/decryption processes (default: 2, this machine's cores)")
    parser.add_argument("--upload-bits", default="demo", choices=("demo", "reference", "8", "16", "32"),
                        help="timing: every aggregator at this encoding: the example's own (default; an 8-bit "
                             "upload since session 5), the 24-bit fp32-equivalent reference, or a quantised upload")
    parser.add_argument("--repeats", type=int, default=2, help="timing: plaintext/private alternations")
    parser.add_argument("--paillier-variants", nargs="*", default=list(PAILLIER_VARIANTS), choices=PAILLIER_VARIANTS,
                        help="timing: which Paillier runs (no pool, pool before training, pool during training)")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out_path = args.out or ROOT / "benchmarks" / "results" / ("round_cost_quick.json" if args.quick else "round_cost.json")
    tmp = Path(tempfile.mkdtemp(prefix="round-cost-"))
    task = None
    if args.quick:
        task = tmp / "task.jsonl"
        words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
        task.write_text("".join(json.dumps({"prompt": f"define {w}{i}", "response": f"{w} number {i}"}) + "\n"
                                for i in range(12) for w in words))
    raw = base_config(args.quick, tmp / "runs", task)
    demo_encoding = split_encoding(raw)
    rounds = args.rounds or int(raw["federation"]["rounds"])
    lr, steps = float(raw["training"]["lr"]), int(raw["training"]["local_steps"])
    public_clip = 1.25 * lr * steps
    args.timing_encoding = timing_encoding(args.upload_bits, demo_encoding, public_clip)
    report: dict[str, Any] = {"quick": args.quick, "load_start": load_line(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "config": "tiny:gpt2" if args.quick else "examples/homo_lora.yaml",
                              "public_clip": public_clip, "demo_encoding": demo_encoding,
                              "timing_encoding": args.timing_encoding, "timing": [], "quality": []}

    def save() -> None:
        report["load_end"] = load_line()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=1, default=float) + "\n")

    if not args.skip_timing:
        timing_part(raw, args, report, save)
    updates: list[np.ndarray] = []
    if not args.skip_quality:
        variants = [(i, label, fed) for i, (label, fed) in enumerate(quality_variants(public_clip))
                    if args.variants is None or i in args.variants]
        for i, label, fed in variants:
            row = run_variant(raw, f"quality-{i}", {"aggregator": "plaintext", **fed}, rounds=rounds, evaluate=True,
                              keep_updates=(i == 0))
            row.pop("_offline")
            if "_updates" in row:
                updates = row.pop("_updates")
                report["nmse"] = nmse_table(updates, public_clip)  # load-independent: saved first
                save()
            row["label"] = label
            row["load"] = load_line()
            report["quality"].append(row)
            print(f"[quality] {label}: ROUGE-L {row['final']['rougeL']}, ppl {row['final']['perplexity']}, "
                  f"upload {row['upload_vs_fp32']:.3f}x fp32 ({row['ring_bits']}-bit ring, {row['value_bits']}-bit "
                  f"values), load {row['load']}", flush=True)
            save()
    if updates:
        for r in report["nmse"]:
            print(f"[nmse] {r['encoding']:28s} rotation={r['rotation']!s:5s} clip={r['clip']:6s} "
                  f"{r['bytes_per_value']:.3f} B/value  NMSE {r['nmse']:.3e}", flush=True)
    save()
    print(f"wrote {out_path} (load {report['load_start']} -> {report['load_end']})")


if __name__ == "__main__":
    main()
