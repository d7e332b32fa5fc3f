"""Benchmark: MPC secure aggregation (3 CrypTen compute parties) beside plaintext and masking.

One process run measures, on the *same* encoded inputs (10 clients x 1M parameters by default):

* ``plaintext``: the reference aggregator (the server sums the clear ring vectors);
* ``masking``: the pairwise-masking backend, when ``fedguard.secagg.masking`` is importable;
* ``mpc-sum``: 3 CrypTen party processes, secure sum only — wall time of the whole round *after the
  parties are up* (client sharing + encryption, relay, party decryption, local adds, reveal);
* ``mpc-norm``: the same round with the L2 norm check under MPC (one client over the bound), reported
  as its own row so the norm-check cost is visible separately;
* ``mpc-clip``: the norm check with ``norm_action="clip"`` (over-bound updates scaled into the bound under
  MPC; here the one far-over client is beyond the clip range and excluded, so the result is checked
  against the same sum);
* ``mpc-in-process``: ``backend: simulated`` parties (no CrypTen, no protection), to separate protocol cost
  from process cost.

Every secure result is checked against the plaintext sum (exact equality). Timings on a shared 2-core
machine are noisy: the JSON records the machine's load average next to the numbers.

    .venv/bin/python benchmarks/mpc.py            # 10 clients x 1M
    .venv/bin/python benchmarks/mpc.py --quick    # 3 clients x 20k
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedguard.encoding import FixedPointSpec, encode_weighted, ring_sum
from fedguard.errors import ConfigError
from fedguard.federation import make_aggregator
from fedguard.federation.protocol import AggregateResult, Aggregator, RoundSpec
from fedguard.rng import SecureRNG
from fedguard.secagg.mpc import NORM_CHECK_DROPPED, MpcAggregator
from fedguard.secagg.mpc.parties import CryptenParties, SimulatedParties

RESULTS = Path(__file__).resolve().parent / "results" / "mpc.json"


def run_round(agg: Aggregator, spec: RoundSpec, inputs: dict[int, np.ndarray], seed: str) -> dict[str, Any]:
    """Drive one round by hand, timing client work and server/party work apart."""
    rng = SecureRNG.for_testing(seed)
    start = time.perf_counter()
    clients = {c: agg.client(spec, c, inputs[c], rng=rng.spawn(str(c))) for c in spec.participants}
    server = agg.server(spec, rng=rng.spawn("server"))
    client_s = server_s = 0.0
    up = 0
    t = time.perf_counter()
    outbox = server.open()
    server_s += time.perf_counter() - t
    while True:
        replies = {}
        for c in sorted(outbox):
            t = time.perf_counter()
            replies[c] = clients[c].handle(outbox[c])
            client_s += time.perf_counter() - t
            up += len(replies[c])
        t = time.perf_counter()
        for c, r in replies.items():
            server.accept(c, r)
        step = server.close_stage()
        server_s += time.perf_counter() - t
        if isinstance(step, AggregateResult):
            break
        outbox = step
    return {"result": step, "wall_s": time.perf_counter() - start, "clients_s": client_s,
            "server_and_parties_s": server_s, "bytes_up": up,
            "party0_steps_s": dict(getattr(server, "party_seconds", {}))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 clients x 20k parameters")
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--params", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="rounds per configuration (the median is reported)")
    ap.add_argument("--no-norm", action="store_true", help="skip the norm-check row (and the dealer)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    n_clients = args.clients or (3 if args.quick else 10)
    n_params = args.params or (20_000 if args.quick else 1_000_000)

    enc = FixedPointSpec(clip=1.0, value_bits=24, ring_bits=64, max_weight=1 << 16)
    gen = SecureRNG.for_testing("bench-mpc/data").numpy_generator()
    vectors = {c: gen.normal(0, 0.01, n_params).astype(np.float32) for c in range(n_clients)}
    vectors[n_clients - 1] *= 50  # one client far over the norm bound
    norm_bound = 0.02 * float(np.sqrt(n_params))  # ~2x an honest client's norm (0.01·sqrt(n))
    rng = SecureRNG.for_testing("bench-mpc/quantise")
    inputs = {c: encode_weighted(v, 100 + c, enc, rng=rng.spawn(str(c))) for c, v in vectors.items()}
    spec = RoundSpec(0, tuple(range(n_clients)), n_params + 1, 64, fixed_point=enc)  # the norm check reads enc
    expected_all = ring_sum(list(inputs.values()), 64)
    expected_kept = ring_sum([inputs[c] for c in range(n_clients - 1)], 64)

    rows: dict[str, dict[str, Any]] = {}

    def measure(name: str, agg: Aggregator, expected: np.ndarray, rspec: RoundSpec = spec) -> None:
        runs = []
        for r in range(args.repeats):
            out = run_round(agg, RoundSpec(r, rspec.participants, rspec.vector_length, 64, fixed_point=rspec.fixed_point),
                            inputs, f"{name}/{r}")
            if not np.array_equal(out["result"].ring_sum, expected):
                raise SystemExit(f"{name}: the secure sum differs from the plaintext sum")
            runs.append(out)
        med = sorted(runs, key=lambda o: o["wall_s"])[len(runs) // 2]
        rows[name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in med.items() if k != "result"}
        rows[name]["wall_s_all"] = [round(o["wall_s"], 4) for o in runs]
        rows[name]["wall_s_min"] = round(min(o["wall_s"] for o in runs), 4)
        rows[name]["dropped"] = {k: list(v) for k, v in med["result"].dropped.items()}
        print(f"{name:>16}: {med['wall_s']:7.3f} s wall  (clients {med['clients_s']:.3f} s, "
              f"server+parties {med['server_and_parties_s']:.3f} s, {med['bytes_up'] / 1e6:.1f} MB up)")
        if med["party0_steps_s"]:
            print(f"{'':>16}  party 0 steps: {med['party0_steps_s']}")

    print(f"{n_clients} clients x {n_params} parameters, ring Z_2^64, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}")
    measure("plaintext", make_aggregator("plaintext"), expected_all)
    try:
        masking = make_aggregator("masking")
    except (ConfigError, ImportError) as err:
        print(f"{'masking':>16}: unavailable ({err})")
    else:
        measure("masking", masking, expected_all)
    measure("mpc-in-process", MpcAggregator(parties=SimulatedParties(3)), expected_all)

    t = time.perf_counter()
    with CryptenParties(3, norm_check=not args.no_norm, timeout_s=300.0) as parties:
        startup = time.perf_counter() - t
        print(f"{'parties up':>16}: {startup:7.3f} s (3 CrypTen parties{'' if args.no_norm else ' + dealer'}, "
              "not counted below)")
        measure("mpc-sum", MpcAggregator(parties=parties), expected_all)
        if not args.no_norm:
            measure("mpc-norm", MpcAggregator(parties=parties, norm_bound=norm_bound), expected_kept)
            # clipping: honest clients are within the bound (factor 1, exact), the 50x one is beyond 2^2: excluded
            measure("mpc-clip", MpcAggregator(parties=parties, norm_bound=norm_bound,
                                              norm_action="clip", clip_halvings=2), expected_kept)
    if not args.no_norm and rows["mpc-norm"]["dropped"].get(NORM_CHECK_DROPPED) != [n_clients - 1]:
        raise SystemExit("mpc-norm: the over-bound client was not the one excluded")

    base = rows["plaintext"]["wall_s"]
    ratios = {name: round(r["wall_s"] / base, 2) for name, r in rows.items()}
    norm_extra = (rows["mpc-norm"]["server_and_parties_s"] - rows["mpc-sum"]["server_and_parties_s"]
                  if "mpc-norm" in rows else float("nan"))
    print("ratios to plaintext:", ratios)
    print(f"norm check adds {norm_extra:.3f} s of party time for {n_clients} clients "
          f"(target for the secure sum: <= 5 s; measured {rows['mpc-sum']['wall_s']:.3f} s)")
    report = {
        "benchmark": "mpc",
        "clients": n_clients,
        "parameters": n_params,
        "compute_parties": 3,
        "norm_bound": norm_bound,
        "quick": args.quick,
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_start": os.getloadavg()[0],
                    "python": platform.python_version(), "platform": platform.platform()},
        "parties_startup_s": round(startup, 3),
        "rows": rows,
        "ratios_to_plaintext": ratios,
        "norm_check_extra_party_s": None if np.isnan(norm_extra) else round(norm_extra, 4),
        "target_secure_sum_s": 5.0,
        "note": "shared 2-core machine: timings are noisy; medians of --repeats rounds",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
