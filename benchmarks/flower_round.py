"""Round time and bytes over Flower's Deployment Engine vs the same job in one process (same run).

    /path/to/venv-with-flwr/bin/python benchmarks/flower_round.py --quick          # tiny GPT-2, masking, 3 clients
    .../python benchmarks/flower_round.py --config examples/flower_homo_lora.yaml  # the demo config (SmolLM2)
    .../python benchmarks/flower_round.py --dropout                                # masking, n=10, 30% killed
    .../python benchmarks/flower_round.py --private examples/homo_lora_private.yaml --rounds 2   # dp: over Flower

Round time: the config's job runs first in process (``fedguard train``'s trainer), then over Flower (a TLS
SuperLink, one SuperNode + worker per client, ``fedguard flower run``'s launcher), in the same run; per
round it reports the round's seconds as each run's round table records them (training, aggregation,
evaluation, checkpoint) and the ratio Flower ÷ in-process. Process start-up (model loading in every
worker, Flower's processes) is reported apart, not in the ratio. Both runs must end with bit-identical
adapters (checked).

Bytes: per round, fedguard's own accounting of its wire messages (the round table's ``bytes_up`` /
``bytes_down``, which include the broadcast of ``θ_r``) beside the bytes of the Flower messages carrying
them as Flower serialises them (``GridExchange.flower_bytes``).

``--dropout``: masking with 10 clients over Flower, 3 SuperNodes killed on receiving the *share* stage of
round 1 (mid-round): the round must complete over the 7 survivors with the exact aggregate — the global
adapter bit-identical to the in-process round with the same 3 clients dropped at the same stage, and to
the plaintext sum of the 7 survivors' quantised updates (:func:`survivors_exact`).

Writes benchmarks/results/flower_round[_quick|_dropout].json.
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


def _tiny(run_dir: Path, clients: int, rounds: int, aggregator: str, **options: Any) -> Any:
    from tests.train.conftest import tiny_config, write_task

    run_dir.mkdir(parents=True, exist_ok=True)
    task = write_task(run_dir / "task.jsonl", n=max(48, 12 * clients))
    return tiny_config(run_dir, task, data__partition="iid" if clients > 3 else "attribute",
                       data__max_examples=max(48, 12 * clients),
                       federation={"clients": clients, "rounds": rounds, "aggregator": aggregator,
                                   "aggregator_options": options})


def _with(config: Any, **changes: Any) -> Any:
    from fedguard_train.config import TrainConfig

    raw = config.to_dict()
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            raw[section][name] = value
        else:
            raw[section] = value
    return TrainConfig.from_dict(raw)


def _load(uptime: str = "/proc/loadavg") -> str:
    return Path(uptime).read_text().split(" ")[0]


def _group_cpu(groups: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) of the live processes in each process group, by the group's name (the
    SuperNode's group holds its SuperExec; a ClientApp that already exited is not counted)."""
    tick = os.sysconf("SC_CLK_TCK")
    by_group: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        by_group[int(fields[2])] = by_group.get(int(fields[2]), 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return {name: round(by_group.get(pgid, 0.0), 2) for name, pgid in groups.items()}


def _flower(config: Any, work: Path, name: str, options: Any) -> tuple[dict[str, Any], float, float]:
    from fedguard_train.flower.launcher import Deployment

    cfg = _with(config, run_dir=str(work / name))
    t0 = time.perf_counter()
    with Deployment(cfg, options) as deployment:
        deployment.start()
        started = time.perf_counter()
        summary = deployment.run(overwrite=True)
        # where the CPU went in the long-lived processes (polling at idle included), for the report
        summary["process_cpu_s"] = _group_cpu({n: p.pid for n, p in deployment.procs.items()})
    if summary.get("status") != "completed":
        raise SystemExit(f"the Flower run {name} did not complete: {summary}")
    return summary, time.perf_counter() - t0, started - t0


def compare(config: Any, work: Path, *, poll: float = 0.1, cold: bool = False, direct: bool = True) -> dict[str, Any]:
    from fedguard_train.checkpoint import load_latest
    from fedguard_train.flower.launcher import FlowerOptions
    from fedguard_train.runner import build_trainer

    out: dict[str, Any] = {"config": {"model": config.model.name_or_path, "clients": config.n_parties,
                                      "rounds": config.federation.rounds,
                                      "aggregator": config.federation.aggregator},
                           "load_before": _load()}
    local_cfg = _with(config, run_dir=str(work / "in_process"))
    t0 = time.perf_counter()
    trainer = build_trainer(local_cfg, quiet=True)
    out["in_process_setup_s"] = time.perf_counter() - t0
    local = trainer.run(overwrite=True)
    out["in_process_total_s"] = time.perf_counter() - t0
    # the same remote round driver and workers without Flower (DirectExchange, one process): what the
    # stage-by-stage protocol costs by itself, apart from Flower's transport
    from fedguard_train.flower.coordinator import remote_trainer
    from fedguard_train.flower.worker import ClientWorker, DirectExchange

    if direct:
        direct_cfg = _with(config, run_dir=str(work / "direct"))
        workers = {k: ClientWorker(direct_cfg, k) for k in range(direct_cfg.n_parties)}
        try:
            direct_run = remote_trainer(direct_cfg, DirectExchange(workers)).run(overwrite=True)
        finally:
            for worker in workers.values():
                worker.close()
        out["direct_round_s"] = [row["seconds"] for row in direct_run.history]
    flower_cfg = _with(config, run_dir=str(work / "flower"))
    summary, out["flower_total_s"], out["flower_start_s"] = _flower(config, work, "flower", FlowerOptions(poll=poll))
    out["flower_process_cpu_s"] = summary["process_cpu_s"]
    if cold:  # the same run with Flower's own process start per message (no fork server), same conditions
        cold_summary, out["flower_cold_total_s"], _ = _flower(config, work, "flower_cold",
                                                              FlowerOptions(poll=poll, prefork=False))
        out["flower_cold_round_s"] = [row["seconds"] for row in cold_summary["history"]]
        out["flower_cold_process_cpu_s"] = cold_summary["process_cpu_s"]
        out["flower_cold_stage_wall_s"] = {r: sum(s["wall_s"] for s in v)
                                           for r, v in cold_summary.get("stage_times", {}).items()}
    out["load_after"] = _load()
    rounds = []
    for row_in, row_fl in zip(local.history, summary["history"]):
        r = str(row_in["round"])
        rounds.append({"round": row_in["round"], "in_process_s": row_in["seconds"], "flower_s": row_fl["seconds"],
                       "ratio": row_fl["seconds"] / row_in["seconds"],
                       "fedguard_bytes_up": row_fl["bytes_up"], "fedguard_bytes_down": row_fl["bytes_down"],
                       "in_process_bytes_up": row_in["bytes_up"], "in_process_bytes_down": row_in["bytes_down"],
                       "flower_bytes_up": summary["flower_bytes"][r]["up"],
                       "flower_bytes_down": summary["flower_bytes"][r]["down"],
                       "flower_round_trips": summary["round_trips"][r],
                       # where the Flower round's time goes: per stage, the round trip's wall time and the
                       # slowest worker's own work on it (training in the first); the rest is Flower's
                       "stages": summary.get("stage_times", {}).get(r, []),
                       "stage_wall_s": sum(s["wall_s"] for s in summary.get("stage_times", {}).get(r, [])),
                       "worker_max_s": sum(s["worker_max_s"] for s in summary.get("stage_times", {}).get(r, []))})
        rounds[-1]["flower_transport_s"] = rounds[-1]["stage_wall_s"] - rounds[-1]["worker_max_s"]
    out["rounds"] = rounds
    out["poll_s"] = poll
    a, b = load_latest(Path(local_cfg.run_dir)), load_latest(Path(flower_cfg.run_dir))
    out["bit_identical"] = bool(a is not None and b is not None and a.vector.tobytes() == b.vector.tobytes())
    out["round_ratio_mean"] = sum(r["flower_s"] for r in rounds) / sum(r["in_process_s"] for r in rounds)
    if direct:
        out["direct_ratio_mean"] = sum(out["direct_round_s"]) / sum(r["in_process_s"] for r in rounds)
    if cold:
        out["cold_round_ratio_mean"] = sum(out["flower_cold_round_s"]) / sum(r["in_process_s"] for r in rounds)
    return out


def survivors_exact(config: Any, work: Path, killed: tuple[int, ...], stage: str = "share") -> dict[str, Any]:
    """How "exact" is checked for a Flower run of round 1 with ``killed`` clients dropped at ``stage``: its
    checkpointed global adapter against (a) the in-process masking round with the same clients dropped at
    the same stage and (b) the **plaintext sum of the survivors' updates**: ``run_round`` with the plaintext
    aggregator over the survivors only — the same quantised ring inputs (each client's quantisation stream
    is keyed by its id), summed in the clear, decoded to the weighted mean and added to ``θ_1``. Both must
    be bit-identical. Also reported: the largest distance of the released mean from the float weighted mean
    of the survivors' unquantised ``Δ_k``, against the fixed-point bound. Each client trains once (cached)."""
    import numpy as np
    import torch

    from fedguard.federation.plaintext import PlaintextAggregator
    from fedguard.federation.round import run_round
    from fedguard.rng import SecureRNG
    from fedguard_train.checkpoint import load_latest
    from fedguard_train.runner import build_trainer

    torch.set_num_threads(1)
    ref = build_trainer(_with(config, run_dir=str(work / "ref")), quiet=True)
    theta = ref.global_vector()
    cache: dict[int, Any] = {}

    def train(c: int, v: Any) -> Any:
        if c not in cache:
            cache[c] = ref.client_step(1, c, v)
        return cache[c]

    n = config.n_parties
    survivors = tuple(c for c in range(n) if c not in killed)
    masked = run_round(1, theta, range(n), train, ref.aggregator, ref.spec, hooks=ref.hooks,
                       rng=SecureRNG.for_testing(f"{config.seed}/aggregate/1"), drop_at={k: stage for k in killed})
    plain = run_round(1, theta, survivors, train, PlaintextAggregator(), ref.spec, hooks=ref.hooks,
                      rng=SecureRNG.for_testing(f"{config.seed}/aggregate/1"))
    got = load_latest(Path(config.run_dir))
    flower = None if got is None else np.asarray(got.vector)
    weights = np.array([float(cache[c].weight) for c in survivors])
    float_mean = sum(w * cache[c].delta.astype(np.float64) for w, c in zip(weights, survivors)) / weights.sum()
    return {"contributors_in_process": list(masked.contributors), "survivors": list(survivors),
            "exact_vs_in_process_masking": bool(flower is not None
                                                and flower.tobytes() == masked.global_vector.tobytes()),
            "exact_vs_plaintext_sum_of_survivors": bool(flower is not None
                                                        and flower.tobytes() == plain.global_vector.tobytes()),
            "max_abs_vs_float_mean": None if flower is None else float(np.abs(flower - theta - float_mean).max()),
            "fixed_point_bound": float(ref.spec.error_bound()),
            "threshold": ref.aggregator.threshold(n) if ref.aggregator is not None else None}


def dropout(work: Path) -> dict[str, Any]:
    """n=10 masking, 3 SuperNodes killed at round 1's share stage."""
    from fedguard_train.flower.launcher import Deployment, FlowerOptions

    killed = (2, 5, 8)
    config = _tiny(work / "flower", 10, 1, "masking")
    opts = FlowerOptions(stage_timeout=90.0, first_timeout=900.0, torch_threads=1,
                         faults={k: "kill:1:share" for k in killed})
    load_before = _load()
    t0 = time.perf_counter()
    with Deployment(config, opts) as deployment:
        deployment.start()
        summary = deployment.run(overwrite=True)
    seconds = time.perf_counter() - t0
    load_after = _load()
    check = survivors_exact(config, work, killed)
    stages = summary.get("stage_times", {}).get("1", [])
    return {"clients": 10, "killed": list(killed), "stage": "share", "status": summary.get("status"),
            "contributors_flower": summary["history"][0]["clients"] if summary.get("history") else None,
            "drops": summary.get("drops"), **check,
            "exact": check["exact_vs_in_process_masking"] and check["exact_vs_plaintext_sum_of_survivors"],
            "seconds": seconds, "stage_wall_s": {s["stage"]: s["wall_s"] for s in stages},
            "stage_timeout_s": opts.stage_timeout, "load_before": load_before, "load": load_after}


def in_process_epsilon(config: Any, work: Path) -> list[float]:
    """ε after each of the config's rounds as the in-process trainer's DP hook accounts them: the trainer is
    built (model loaded, so the hook is calibrated to the same layout and encoding) and its hooks start every
    round with all clients, as ``run_round`` does — the write-ahead record is ε's event (distributed
    placement records it with ``min_survivors`` contributors and the release adds nothing); no client trains."""
    from fedguard_train.runner import build_trainer

    trainer = build_trainer(_with(config, run_dir=str(work / "eps")), quiet=True)
    out = []
    for r in range(1, config.federation.rounds + 1):
        trainer.hooks.on_round_start(r, tuple(range(config.n_parties)))
        out.append(_accountant_epsilon(trainer))
    return out


def _accountant_epsilon(trainer: Any) -> float:
    from fedguard_train.privacy import ClientDPHook

    hooks = [h for h in getattr(trainer.hooks, "hooks", ()) if isinstance(h, ClientDPHook)]
    if len(hooks) != 1 or hooks[0].dp.accountant is None:
        raise SystemExit("the config has no dp: section with an accountant")
    return float(hooks[0].dp.accountant.epsilon())


def private(config_path: str, rounds: int, work: Path) -> dict[str, Any]:
    """A DP config (``dp:``) over Flower for ``rounds`` rounds (evaluated after the last), TLS, the launcher's
    defaults: per-round ε from the ServerApp's round table beside the in-process hook's ε for the same rounds
    (:func:`in_process_epsilon`), the rounds' times, bytes and drops."""
    from fedguard_train.config import TrainConfig
    from fedguard_train.flower.launcher import FlowerOptions, run_deployment

    config = TrainConfig.from_yaml(config_path)
    config = _with(config, federation__rounds=rounds, eval__every=rounds, run_dir=str(work / "flower"))
    load_before = _load()
    t0 = time.perf_counter()
    summary = run_deployment(config, FlowerOptions(), overwrite=True)
    seconds = time.perf_counter() - t0
    load_after = _load()
    eps_in = in_process_epsilon(config, work)
    history = summary.get("history", [])
    eps_flower = [row.get("epsilon") for row in history]
    return {"config": config_path, "rounds": rounds, "status": summary.get("status"),
            "epsilon_flower": eps_flower, "epsilon_in_process": eps_in,
            "same_epsilon": len(eps_flower) == rounds and all(
                isinstance(a, float) and abs(a - b) <= 1e-9 * max(1.0, b) for a, b in zip(eps_flower, eps_in)),
            "history": history, "drops": summary.get("drops"), "flower_bytes": summary.get("flower_bytes"),
            "seconds": seconds, "load_before": load_before, "load": load_after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="a run config (default with --quick: tiny GPT-2, masking, 3 clients)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dropout", action="store_true")
    parser.add_argument("--private", metavar="CONFIG", help="a dp: config over Flower: its per-round epsilon beside "
                                                            "the in-process hook's (with --rounds, default 2)")
    parser.add_argument("--poll", type=float, default=0.1, help="FlowerOptions.poll (Flower's poll intervals)")
    parser.add_argument("--no-direct", action="store_true", help="skip the DirectExchange run (no Flower)")
    parser.add_argument("--cold", action="store_true",
                        help="also run Flower without the flwr-clientapp fork server, in the same run")
    parser.add_argument("--rounds", type=int, default=None, help="override federation.rounds")
    parser.add_argument("--eval-examples", type=int, default=None,
                        help="override eval.examples and evaluate only after the last round (eval.every = rounds): "
                             "evaluation is the same code in both runs and would dilute the ratio")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON file to write (default: benchmarks/results/flower_round[_quick|_dropout].json, "
                             "or flower_private.json)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedguard-flower-bench-"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.dropout:
        result = dropout(work)
        name = "flower_round_dropout"
    elif args.private:
        result = private(args.private, args.rounds or 2, work)
        name = "flower_private"
    else:
        from fedguard_train.config import TrainConfig

        if args.config:
            config = TrainConfig.from_yaml(args.config)
            name = "flower_round"
        else:
            config = _tiny(work / "cfg", 3, 3, "masking")
            name = "flower_round_quick"
        if args.rounds is not None:
            config = _with(config, federation__rounds=args.rounds)
        if args.eval_examples is not None:
            config = _with(config, eval__examples=args.eval_examples, eval__every=config.federation.rounds)
        result = compare(config, work, poll=args.poll, cold=args.cold, direct=not args.no_direct)
    out = args.out or ROOT / "benchmarks" / "results" / f"{name}.json"
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps(result, indent=1, default=str))
    print(f"written {out}")


if __name__ == "__main__":
    main()
