"""Pairwise-masking secure aggregation (fedguard.secagg.masking) side by side with Flower's SecAgg+ primitives.

Run:  .venv/bin/python benchmarks/secagg_masking.py [--quick] [--flwr-path DIR]
      .venv/bin/python benchmarks/secagg_masking.py --signed-only [--quick] [--pairs 3]
      (Flower is looked for in --flwr-path, $FEDGUARD_FLWR_PATH, then .bench/flwr: ``make .bench/flwr/.installed``)

``--signed-only``: the signed protocol against an active server (signed keys, coin-flipped graph, consistency
round) beside the honest-but-curious one at n=100, 1M parameters, 30% dropped after sharing, interleaved
pairs in one run, with the ratio against the issue's <= 1.2x goal and Flower's client mask step and server
unmask loop on the same counts; writes results/secagg_masking_signed.json (``--quick``: small sizes, no file).

Three measurements (the issue's targets in brackets):

1. **Client masking**, one client, ``--params`` parameters (1M), ``--neighbours`` neighbours (10) [no slower
   than Flower's quantise + mask generation + add]. Ours: the real client step of the ``mask`` stage (decrypt
   the d encrypted share pairs, d X25519+HKDF agreements, 1 + d ChaCha20 mask expansions, add, serialise)
   plus quantisation (:func:`fedguard.encoding.encode_weighted`). Flower: the same steps with its primitives,
   as its ``secaggplus_mod`` runs them (Fernet decrypt, ECDH P-384 + HKDF from the PEM private key,
   ``quantize``, ``pseudo_rand_gen``, ``parameters_addition``/``subtraction``/``mod``).
2. **Server unmasking**, ``--clients`` clients (100), ``--dropped`` of them (30%) silent after sending
   their shares, ``--params`` parameters [<= 10 s on 2 cores]. Ours: a full protocol run through the
   in-process transport; the number reported is the server's close of the ``unmask`` stage (reconstruct
   every needed secret from Shamir shares, check commitments, regenerate and subtract the masks), with the
   server's other stages and the clients' time reported beside it. Flower: its server unmask loop on the
   same mask counts (``combine_shares`` per client, then ``generate_shared_key`` + ``pseudo_rand_gen`` per
   uncancelled pair and ``pseudo_rand_gen`` per self mask). Both for SecAgg+ (``--neighbours``) and, unless
   ``--skip-classic``, classic SecAgg (complete graph).
3. **Bytes up per client** [masked input <= 1.1x the plaintext upload; key/share messages reported apart],
   from the real serialised messages.

Flower is optional: if ``flwr`` cannot be imported (add its location with ``--flwr-path`` or the environment
variable ``FEDGUARD_FLWR_PATH``), its columns are reported as unavailable and nothing is substituted.
Timings are medians of ``--repeats`` runs on whatever machine runs this; on a shared machine they are noisy.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedguard import wire
from fedguard.encoding import FixedPointSpec, encode_weighted
from fedguard.federation.protocol import AggregateResult, RoundSpec
from fedguard.rng import SecureRNG
from fedguard.secagg.masking import MaskingAggregator
from fedguard.secagg.masking.crypto import (
    PAIR_MASK_NONCE,
    PURPOSE_MASK,
    Mask,
    agree,
    apply_masks,
    generate_private_key,
    public_bytes,
)

RESULTS = Path(__file__).resolve().parent / "results" / "secagg_masking.json"
FLOWER_CLIP = 8.0            # Flower's SecAggPlusWorkflow defaults
FLOWER_TARGET = 1 << 22
FLOWER_MOD = 1 << 32


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _load_flower(extra_path: str | None) -> tuple[dict[str, Any] | None, str]:
    default = Path(__file__).resolve().parent.parent / ".bench" / "flwr"  # where `make .bench/flwr/.installed` puts it
    for path in filter(None, [extra_path, os.environ.get("FEDGUARD_FLWR_PATH"),
                              str(default) if default.is_dir() else None]):
        if path not in sys.path:
            sys.path.append(path)  # appended: fedguard's own numpy/cryptography keep precedence
    names = {
        "flwr.common": ["ndarray_to_bytes"],
        "flwr.common.secure_aggregation.crypto.shamir": ["combine_shares", "create_shares"],
        "flwr.common.secure_aggregation.crypto.symmetric_encryption": ["decrypt", "encrypt", "generate_shared_key"],
        "flwr.common.secure_aggregation.ndarrays_arithmetic": [
            "factor_combine", "parameters_addition", "parameters_mod", "parameters_multiply", "parameters_subtraction"],
        "flwr.common.secure_aggregation.quantization": ["quantize"],
        "flwr.common.secure_aggregation.secaggplus_utils": ["pseudo_rand_gen", "share_keys_plaintext_concat"],
        "flwr.supercore.primitives.asymmetric": [
            "bytes_to_private_key", "bytes_to_public_key", "generate_key_pairs", "private_key_to_bytes",
            "public_key_to_bytes"],
    }
    try:
        flwr = importlib.import_module("flwr")
        fns = {name: getattr(importlib.import_module(mod), name) for mod, group in names.items() for name in group}
    except (ImportError, AttributeError) as err:
        return None, f"flwr not importable: {err}"
    return fns, str(getattr(flwr, "__version__", "unknown"))


# -- 1. client masking ---------------------------------------------------------------------------------
def _our_client_once(params: int, neighbours: int, floats: np.ndarray, fx: FixedPointSpec, label: str
                     ) -> tuple[float, float, int]:
    """(quantise seconds, mask-stage seconds, masked-reply bytes) for client 0 of a d+1 client round."""
    spec = RoundSpec(0, tuple(range(neighbours + 1)), params + 1, fx.ring_bits)
    rng = SecureRNG.for_testing(label)
    start = time.perf_counter()
    ring = encode_weighted(floats, 100, fx, rng=rng.spawn("quantise"))
    quantise = time.perf_counter() - start
    filler = rng.ring_elements(params + 1, fx.ring_bits)
    agg = MaskingAggregator(rng=rng.spawn("graph"))  # complete graph on d + 1 clients: exactly d neighbours
    server = agg.server(spec)
    clients = {c: agg.client(spec, c, ring if c == 0 else filler, rng=rng.spawn(str(c))) for c in spec.participants}
    outbox = server.open()
    while server.stage != "mask":
        for c in sorted(outbox):
            server.accept(c, clients[c].handle(outbox[c]))
        step = server.close_stage()
        assert isinstance(step, dict)
        outbox = step
    start = time.perf_counter()
    reply = clients[0].handle(outbox[0])
    mask = time.perf_counter() - start
    return quantise, mask, len(reply)


def bench_client(params: int, neighbours: int, repeats: int, flower: dict[str, Any] | None) -> dict[str, Any]:
    gen = SecureRNG.for_testing("bench/floats")
    floats = (gen.normal(params, std=0.05)).astype(np.float32)
    fx = FixedPointSpec(clip=FLOWER_CLIP, value_bits=24, ring_bits=64, max_weight=1 << 16)
    runs = [_our_client_once(params, neighbours, floats, fx, f"bench/client/{i}") for i in range(repeats)]
    quantise = statistics.median(r[0] for r in runs)
    mask = statistics.median(r[1] for r in runs)
    acc = np.zeros(params + 1, dtype=np.uint64)
    seeds = [Mask(gen.bytes(32), 1, PAIR_MASK_NONCE) for _ in range(neighbours + 1)]
    expand = _median_time(lambda: apply_masks(acc, seeds), repeats)
    mine, peer = generate_private_key(gen), public_bytes(generate_private_key(gen))
    ka = _median_time(lambda: [agree(mine, peer, purpose=PURPOSE_MASK, round_id=0, a=0, b=i + 1)
                               for i in range(neighbours)], repeats)
    ours: dict[str, Any] = {"quantise_s": quantise, "mask_stage_s": mask, "total_s": quantise + mask,
            "mask_expansion_s": expand, "key_agreements_s": ka, "masked_reply_bytes": runs[0][2],
            "prg": "ChaCha20, 256-bit seeds", "key_agreement": "X25519 + HKDF-SHA256"}
    out: dict[str, Any] = {"params": params, "neighbours": neighbours, "fedguard": ours}
    if flower is None:
        out["flower"] = None
        return out
    f = flower
    sk1, _ = f["generate_key_pairs"]()
    sk1_pem = f["private_key_to_bytes"](sk1)
    peers_pk = [f["public_key_to_bytes"](f["generate_key_pairs"]()[1]) for _ in range(neighbours)]
    enc_sk, _ = f["generate_key_pairs"]()
    enc_keys = [f["generate_shared_key"](enc_sk, f["bytes_to_public_key"](pk)) for pk in peers_pk]
    rd_seed = os.urandom(32)
    b_shares = f["create_shares"](rd_seed, 6, neighbours + 1)
    sk_shares = f["create_shares"](sk1_pem, 6, neighbours + 1)
    cts = [f["encrypt"](k, f["share_keys_plaintext_concat"](i + 1, 0, b_shares[i], sk_shares[i]))
           for i, k in enumerate(enc_keys)]

    def flower_quantise() -> list[np.ndarray]:
        params_list = f["parameters_multiply"]([floats], 100 / 1000)
        return f["factor_combine"](100, f["quantize"](params_list, FLOWER_CLIP, FLOWER_TARGET))

    def flower_mask(q: list[np.ndarray]) -> list[np.ndarray]:
        for k, ct in zip(enc_keys, cts, strict=True):
            f["decrypt"](k, ct)
        dims = [a.shape for a in q]
        q = f["parameters_addition"](q, f["pseudo_rand_gen"](rd_seed, FLOWER_MOD, dims))
        for i, pk in enumerate(peers_pk):
            shared = f["generate_shared_key"](f["bytes_to_private_key"](sk1_pem), f["bytes_to_public_key"](pk))
            m = f["pseudo_rand_gen"](shared, FLOWER_MOD, dims)
            q = f["parameters_addition"](q, m) if i % 2 else f["parameters_subtraction"](q, m)
        q = f["parameters_mod"](q, FLOWER_MOD)
        return [f["ndarray_to_bytes"](a) for a in q]  # the reply, as secaggplus_mod serialises it

    fq, fm, fm_cpu, reply = [], [], [], None
    for _ in range(repeats):
        start = time.perf_counter()
        q = flower_quantise()
        fq.append(time.perf_counter() - start)
        start, cpu = time.perf_counter(), time.thread_time()
        reply = flower_mask(q)
        fm.append(time.perf_counter() - start)
        fm_cpu.append(time.thread_time() - cpu)
    f_expand = _median_time(lambda: [f["pseudo_rand_gen"](rd_seed, FLOWER_MOD, [(params,), ()])
                                     for _ in range(neighbours + 1)], repeats)
    f_ka = _median_time(lambda: [f["generate_shared_key"](f["bytes_to_private_key"](sk1_pem), f["bytes_to_public_key"](pk))
                                 for pk in peers_pk], repeats)
    flw: dict[str, Any] = {"quantise_s": statistics.median(fq), "mask_stage_s": statistics.median(fm),
           "mask_stage_cpu_s": statistics.median(fm_cpu),
           "total_s": statistics.median(fq) + statistics.median(fm), "mask_expansion_s": f_expand,
           "key_agreements_s": f_ka,
           "masked_reply_payload_bytes": sum(len(b) for b in reply or []),
           "prg": "numpy RandomState (MT19937) seeded with the 32-bit XOR fold of the seed",
           "key_agreement": "ECDH P-384 + HKDF-SHA256 (private key re-parsed from PEM per neighbour)"}
    out["flower"] = flw
    out["ratio_fedguard_over_flower_total"] = ours["total_s"] / flw["total_s"]
    out["ratio_fedguard_over_flower_mask_expansion"] = ours["mask_expansion_s"] / flw["mask_expansion_s"]
    return out


def flower_seed_collision(flower: dict[str, Any]) -> dict[str, Any]:
    """Two different 256-bit seeds whose 32-bit XOR folds agree give Flower the same mask."""
    a = bytearray(os.urandom(32))
    b = bytearray(a)
    b[0] ^= 0xFF
    b[4] ^= 0xFF  # word 0 and word 1 both flip the same bits: the XOR fold is unchanged
    ma = flower["pseudo_rand_gen"](bytes(a), FLOWER_MOD, [(1000,)])[0]
    mb = flower["pseudo_rand_gen"](bytes(b), FLOWER_MOD, [(1000,)])[0]
    return {"seeds_differ": bytes(a) != bytes(b), "masks_equal": bool(np.array_equal(ma, mb)),
            "effective_seed_bits": 32}


# -- 2. server unmasking and 3. bytes ------------------------------------------------------------------
def _signed_aggregator(n: int, neighbours: int | None, rng: SecureRNG) -> MaskingAggregator:
    from fedguard.identity import Identity, Roster
    from fedguard.secagg.masking.signed import SignedMaskingAggregator

    identities = {c: Identity.generate(c) for c in range(n)}
    return SignedMaskingAggregator(roster=Roster.of(identities, "bench"), identities=identities,
                                   neighbours=neighbours, rng=rng)


def bench_server(n: int, params: int, dropped_frac: float, neighbours: int | None, label: str, workers: int = 2,
                 signed: bool = False) -> dict[str, Any]:
    rng = SecureRNG.for_testing(f"bench/server/{label}")
    agg = (_signed_aggregator(n, neighbours, rng.spawn("graph")) if signed
           else MaskingAggregator(neighbours=neighbours, rng=rng.spawn("graph")))
    spec = RoundSpec(1, tuple(range(n)), params + 1, 64)
    x = rng.ring_elements(params + 1, 64)  # one input shared by every client (memory); the sum is n_alive·x
    gen = rng.numpy_generator()
    everyone = set(spec.participants)
    silent_from = agg.stages.index("mask")  # the dropped clients go silent after sending their shares

    def draw_dropped() -> tuple[set[int], int]:
        """Uniformly random dropped clients, redrawn until the protocol survives the pattern (with a sparse
        graph some patterns leave a dropped client with fewer than t surviving holders: the round would
        abort). Drawn when the mask stage starts: the signed protocol's graph exists only from then on."""
        for attempt in range(1, 10_001):
            dropped = {int(c) for c in gen.permutation(n)[: round(dropped_frac * n)]}
            alive = [everyone] * silent_from + [everyone - dropped] * (len(agg.stages) - silent_from)
            if agg.survives(spec, alive):
                return dropped, attempt
        raise RuntimeError(f"no survivable pattern of {dropped_frac:.0%} dropouts found for {label}")

    dropped: set[int] = set()
    attempt = 0
    server = agg.server(spec)
    clients = {c: agg.client(spec, c, x, rng=rng.spawn(f"client/{c}")) for c in spec.participants}
    server_s: dict[str, float] = {}
    client_s: dict[str, float] = {}
    server_cpu: dict[str, float] = {}  # CPU time of this thread: less sensitive to other jobs than wall time
    client_cpu: dict[str, float] = {}
    up: dict[str, list[int]] = {}
    start = time.perf_counter()
    outbox = server.open()
    server_s["open"] = time.perf_counter() - start
    result: AggregateResult | None = None
    parallel_close, unmask_cpu, twin_result = float("nan"), float("nan"), None
    while result is None:
        stage = server.stage
        if stage == "mask":
            dropped, attempt = draw_dropped()
        c_time = s_time = c_cpu = s_cpu = 0.0
        sizes = []
        for c in sorted(outbox):
            if stage in ("mask", "consistency", "unmask") and c in dropped:
                continue
            t0, p0 = time.perf_counter(), time.thread_time()
            reply = clients[c].handle(outbox[c])
            t1, p1 = time.perf_counter(), time.thread_time()
            server.accept(c, reply)
            s_time += time.perf_counter() - t1
            s_cpu += time.thread_time() - p1
            c_time += t1 - t0
            c_cpu += p1 - p0
            sizes.append(len(reply))
        if stage == "unmask" and workers > 1:  # the same close, on a copy, with mask regeneration in processes
            twin = copy.deepcopy(server)
            setattr(twin, "_workers", workers)  # noqa: B010 - benchmark: same state, other worker count
            t0 = time.perf_counter()
            twin_result = twin.close_stage()
            parallel_close = time.perf_counter() - t0
            del twin
        t0, c0, p0 = time.perf_counter(), time.process_time(), time.thread_time()
        step = server.close_stage()
        close = time.perf_counter() - t0
        if stage == "unmask":
            unmask_cpu = time.process_time() - c0
        server_s[f"{stage}_accept"] = s_time
        server_s[f"{stage}_close"] = close
        server_cpu[f"{stage}_accept"] = s_cpu
        server_cpu[f"{stage}_close"] = time.thread_time() - p0
        client_s[stage] = c_time / max(1, len(sizes))
        client_cpu[stage] = c_cpu / max(1, len(sizes))
        up[stage] = sizes
        if isinstance(step, AggregateResult):
            result = step
        else:
            outbox = step
    survivors = n - len(dropped)
    expected = x * np.uint64(survivors)
    exact = bool(np.array_equal(result.ring_sum, expected)) and result.contributors == tuple(
        sorted(set(spec.participants) - dropped))
    if isinstance(twin_result, AggregateResult):
        exact = exact and bool(np.array_equal(twin_result.ring_sum, expected))
    graph = agg.graph(spec)
    alive = set(spec.participants) - dropped
    pair_masks = sum(len(graph.neighbours(w) & alive) for w in dropped)
    plaintext_bytes = wire.encoded_size(wire.Message(kind="plaintext/input", round=1, stage="input", sender=0,
                                                     recipient=wire.SERVER, arrays={"x": x}))
    bytes_up = {stage: {"mean": statistics.mean(v), "max": max(v)} for stage, v in up.items()}
    other = sum(bytes_up[s]["mean"] for s in ("advertise", "coin", "share", "consistency", "unmask") if s in bytes_up)
    params_used = agg.params(n)
    return {
        "signed": signed, "client_total_s": sum(client_s.values()),
        "n_clients": n, "params": params, "neighbours": params_used.neighbours, "threshold": params_used.threshold,
        "dropped_after_sharing": len(dropped), "exact_sum": exact, "patterns_drawn_until_survivable": attempt,
        "server_unmask_close_s": server_s["unmask_close"],
        "server_unmask_close_cpu_s": unmask_cpu,
        f"server_unmask_close_s_with_{workers}_workers": parallel_close if workers > 1 else None,
        "server_s": server_s, "server_total_s": sum(server_s.values()),
        "server_cpu_s": server_cpu, "server_total_cpu_s": sum(server_cpu.values()),
        "client_mean_s_per_stage": client_s,
        "client_mean_cpu_s_per_stage": client_cpu, "client_total_cpu_s": sum(client_cpu.values()),
        "masks_regenerated_by_server": {"self": survivors, "pairwise": pair_masks},
        "bytes_up_per_client": bytes_up,
        "plaintext_upload_bytes": plaintext_bytes,
        "ratio_masked_input_over_plaintext": bytes_up["mask"]["mean"] / plaintext_bytes,
        "key_and_share_bytes_up_per_client": other,
        "ratio_total_up_over_plaintext": (bytes_up["mask"]["mean"] + other) / plaintext_bytes,
    }


def survival_table(n: int, dropped_frac: float, degrees: list[int | None], trials: int) -> list[dict[str, Any]]:
    """Monte Carlo: probability that a round completes when a uniformly random ``dropped_frac`` of the
    clients go silent after sending their shares (evaluated with ``MaskingAggregator.survives``)."""
    rows = []
    spec = RoundSpec(1, tuple(range(n)), 1, 64)
    everyone = set(spec.participants)
    for d in degrees:
        agg = MaskingAggregator(neighbours=d, rng=SecureRNG.for_testing(f"bench/survival/{d}"))
        gen = SecureRNG.for_testing(f"bench/survival-patterns/{d}").numpy_generator()
        ok = 0
        for _ in range(trials):
            dropped = {int(c) for c in gen.permutation(n)[: round(dropped_frac * n)]}
            ok += agg.survives(spec, [everyone, everyone, everyone - dropped, everyone - dropped])
        p = agg.params(n)
        rows.append({"neighbours": p.neighbours, "threshold": p.threshold, "p_complete": ok / trials, "trials": trials})
    return rows


def flower_server_unmask(flower: dict[str, Any], n: int, params: int, survivors: int, pair_masks: int,
                         neighbours: int, threshold: int) -> dict[str, Any]:
    """Flower's unmask loop on the same counts: ``combine_shares`` for every client (b-seeds of survivors,
    PEM private keys of the dropped), a key agreement + PRG per uncancelled pair, a PRG per self mask."""
    f = flower
    dims = [(1,), (params,)]
    masked = [np.zeros(1, dtype=np.int64), np.zeros(params, dtype=np.int64)]
    sk_pem = f["private_key_to_bytes"](f["generate_key_pairs"]()[0])
    pk_pem = f["public_key_to_bytes"](f["generate_key_pairs"]()[1])
    seed_shares = f["create_shares"](os.urandom(32), threshold, neighbours + 1)[:threshold]
    sk_shares = f["create_shares"](sk_pem, threshold, neighbours + 1)[:threshold]
    dropped = n - survivors
    start, cpu = time.perf_counter(), time.thread_time()
    for _ in range(survivors):
        seed = f["combine_shares"](seed_shares)
        masked = f["parameters_subtraction"](masked, f["pseudo_rand_gen"](seed, FLOWER_MOD, dims))
    per_dropped = [pair_masks // dropped + (1 if i < pair_masks % dropped else 0) for i in range(dropped)]
    for count in per_dropped:
        secret = f["combine_shares"](sk_shares)
        for _ in range(count):
            key = f["generate_shared_key"](f["bytes_to_private_key"](secret), f["bytes_to_public_key"](pk_pem))
            masked = f["parameters_addition"](masked, f["pseudo_rand_gen"](key, FLOWER_MOD, dims))
    f["parameters_mod"](masked, FLOWER_MOD)
    return {"server_unmask_s": time.perf_counter() - start, "server_unmask_cpu_s": time.thread_time() - cpu,
            "self_masks": survivors, "pairwise_masks": pair_masks,
            "secrets_combined": n}


def signed_side_by_side(args: argparse.Namespace) -> int:
    """The signed protocol (signed keys, coin-flipped graph, consistency round) beside the
    honest-but-curious one in the same run: ``--pairs`` interleaved pairs (HbC, signed, HbC, signed, ...) at
    the same sizes, each reporting client and server cost; the ratios are per pair and their median
    (interleaving shares the machine's load between the two). With Flower available (``make .bench/flwr``,
    ``--flwr-path`` or ``FEDGUARD_FLWR_PATH``), Flower's SecAgg+ client mask step and server unmask loop on the
    same counts are timed beside them."""
    load = list(os.getloadavg())
    flower, flower_version = _load_flower(args.flwr_path)
    print(f"flower: {flower_version if flower else 'unavailable - ' + flower_version}")
    pairs: list[dict[str, Any]] = []
    for i in range(args.pairs):
        row = {}
        for signed in (False, True):
            row["signed" if signed else "honest_but_curious"] = bench_server(
                args.clients, args.params, args.dropped, args.neighbours, f"signed-vs-hbc/{i}", workers=1,
                signed=signed)
        hbc, sig = row["honest_but_curious"], row["signed"]
        row["ratio_client_total"] = sig["client_total_s"] / hbc["client_total_s"]
        row["ratio_server_total"] = sig["server_total_s"] / hbc["server_total_s"]
        row["ratio_server_unmask_close"] = sig["server_unmask_close_s"] / hbc["server_unmask_close_s"]
        row["ratio_bytes_up_total"] = sig["ratio_total_up_over_plaintext"] / hbc["ratio_total_up_over_plaintext"]
        # the mask stage is the same code in both (and most of the noise under load): the signed protocol's
        # own client cost is what its other stages add, set against the honest-but-curious total
        outside = {name: r["client_total_s"] - r["client_mean_s_per_stage"]["mask"] for name, r in row.items()
                   if isinstance(r, dict)}
        row["client_extra_outside_mask_s"] = outside["signed"] - outside["honest_but_curious"]
        row["ratio_client_with_extra_only"] = 1 + row["client_extra_outside_mask_s"] / hbc["client_total_s"]
        server_outside = {name: r["server_total_s"] - r["server_unmask_close_s"] for name, r in row.items()
                          if isinstance(r, dict)}
        row["server_extra_outside_unmask_close_s"] = server_outside["signed"] - server_outside["honest_but_curious"]
        row["ratio_server_with_extra_only"] = 1 + row["server_extra_outside_unmask_close_s"] / hbc["server_total_s"]
        row["ratio_client_total_cpu"] = sig["client_total_cpu_s"] / hbc["client_total_cpu_s"]
        row["ratio_server_total_cpu"] = sig["server_total_cpu_s"] / hbc["server_total_cpu_s"]
        pairs.append(row)
        for name in ("honest_but_curious", "signed"):
            r = row[name]
            print(f"[pair {i}] {name:>18}: client {r['client_total_s']*1e3:8.1f} ms/client (per stage "
                  f"{ {k: round(v * 1e3, 1) for k, v in r['client_mean_s_per_stage'].items()} }), "
                  f"server {r['server_total_s']:.2f} s (unmask close {r['server_unmask_close_s']:.2f} s), "
                  f"exact={r['exact_sum']}")
        print(f"[pair {i}] ratio signed / HbC: client {row['ratio_client_total']:.3f}x, server "
              f"{row['ratio_server_total']:.3f}x, bytes up {row['ratio_bytes_up_total']:.4f}x; the signed stages' "
              f"own cost: client +{row['client_extra_outside_mask_s']*1e3:.1f} ms "
              f"({row['ratio_client_with_extra_only']:.3f}x), server +{row['server_extra_outside_unmask_close_s']*1e3:.0f} ms "
              f"({row['ratio_server_with_extra_only']:.3f}x); CPU time: client {row['ratio_client_total_cpu']:.3f}x, "
              f"server {row['ratio_server_total_cpu']:.3f}x (load now {os.getloadavg()[0]:.1f})")
    keys = ("ratio_client_total", "ratio_server_total", "ratio_server_unmask_close", "ratio_bytes_up_total",
            "ratio_client_with_extra_only", "ratio_server_with_extra_only", "client_extra_outside_mask_s",
            "server_extra_outside_unmask_close_s", "ratio_client_total_cpu", "ratio_server_total_cpu")
    median = {k: statistics.median(p[k] for p in pairs) for k in keys}
    report: dict[str, Any] = {
        "benchmark": "secagg_masking_signed", "quick": args.quick, "n_clients": args.clients, "params": args.params,
        "dropped_frac": args.dropped, "neighbours": args.neighbours, "pairs": pairs, "median": median,
        "goal": "signed <= 1.2x honest-but-curious (client and server)",
        "loadavg_at_start": load, "cpus": os.cpu_count(),
        "flower": {"available": flower is not None, "version_or_error": flower_version},
    }
    if flower is not None:
        last = pairs[-1]["signed"]
        client = bench_client(args.params, args.neighbours, args.repeats, flower)
        unmask = flower_server_unmask(flower, args.clients, args.params, last["masks_regenerated_by_server"]["self"],
                                      last["masks_regenerated_by_server"]["pairwise"], last["neighbours"],
                                      last["threshold"])
        signed_mask_stage = statistics.median(p["signed"]["client_mean_s_per_stage"]["mask"] for p in pairs)
        signed_unmask = statistics.median(p["signed"]["server_unmask_close_s"] for p in pairs)
        signed_mask_cpu = statistics.median(p["signed"]["client_mean_cpu_s_per_stage"]["mask"] for p in pairs)
        signed_unmask_cpu = statistics.median(p["signed"]["server_cpu_s"]["unmask_close"] for p in pairs)
        report["flower"].update({
            "client_mask_stage_s": client["flower"]["mask_stage_s"],
            "client_quantise_plus_mask_s": client["flower"]["total_s"],
            "server_unmask_s": unmask["server_unmask_s"],
            "ratio_signed_client_mask_stage_over_flower": signed_mask_stage / client["flower"]["mask_stage_s"],
            "ratio_signed_server_unmask_over_flower": signed_unmask / unmask["server_unmask_s"],
            "client_mask_stage_cpu_s": client["flower"]["mask_stage_cpu_s"],
            "server_unmask_cpu_s": unmask["server_unmask_cpu_s"],
            "ratio_signed_client_mask_stage_over_flower_cpu": signed_mask_cpu / client["flower"]["mask_stage_cpu_s"],
            "ratio_signed_server_unmask_over_flower_cpu": signed_unmask_cpu / unmask["server_unmask_cpu_s"],
            "note": "like for like: the signed protocol's client mask stage (decrypt d share pairs, d agreements, "
                    "1 + d mask expansions, add, serialise) vs Flower's; its server unmask close vs Flower's "
                    "unmask loop on the same mask counts. Flower has no signature or consistency stage.",
        })
        print(f"flower: client mask stage {client['flower']['mask_stage_s']*1e3:.1f} ms vs signed "
              f"{signed_mask_stage*1e3:.1f} ms ({report['flower']['ratio_signed_client_mask_stage_over_flower']:.2f}x); "
              f"server unmask {unmask['server_unmask_s']:.2f} s vs signed {signed_unmask:.2f} s "
              f"({report['flower']['ratio_signed_server_unmask_over_flower']:.2f}x); CPU time: client mask "
              f"{report['flower']['ratio_signed_client_mask_stage_over_flower_cpu']:.2f}x, server unmask "
              f"{report['flower']['ratio_signed_server_unmask_over_flower_cpu']:.2f}x Flower's")
    report["loadavg_at_end"] = list(os.getloadavg())
    print(f"median ratio signed / honest-but-curious over {len(pairs)} pairs: client "
          f"{median['ratio_client_total']:.3f}x (its own stages alone {median['ratio_client_with_extra_only']:.3f}x), "
          f"server {median['ratio_server_total']:.3f}x (alone {median['ratio_server_with_extra_only']:.3f}x) "
          f"(goal <= 1.2x); CPU time: client {median['ratio_client_total_cpu']:.3f}x, server "
          f"{median['ratio_server_total_cpu']:.3f}x; bytes up "
          f"{median['ratio_bytes_up_total']:.4f}x; load {load} -> {report['loadavg_at_end']}")
    out = args.out if args.out is not None else (None if args.quick else RESULTS.with_name("secagg_masking_signed.json"))
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes; prints, writes JSON only with --out")
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--dropped", type=float, default=0.3)
    ap.add_argument("--neighbours", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=3, help="--signed-only: interleaved HbC/signed pairs")
    ap.add_argument("--unmask-workers", type=int, default=2, help="also time the unmask close with this many processes")
    ap.add_argument("--skip-classic", action="store_true", help="skip the complete-graph server run")
    ap.add_argument("--signed-only", action="store_true",
                    help="only the side-by-side run of the signed (active-server) protocol against the "
                         "honest-but-curious one; writes results/secagg_masking_signed.json")
    ap.add_argument("--flwr-path", default=None, help="extra directory on sys.path holding flwr")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.params, args.clients, args.repeats, args.pairs = 50_000, 20, 2, 1
    out_path = args.out if args.out is not None else (None if args.quick else RESULTS)

    if args.signed_only:
        return signed_side_by_side(args)
    flower, flower_version = _load_flower(args.flwr_path)
    print(f"flower: {flower_version if flower else 'unavailable - ' + flower_version}")
    report: dict[str, Any] = {
        "benchmark": "secagg_masking", "quick": args.quick,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "loadavg_at_start": list(os.getloadavg())},
        "flower": {"available": flower is not None, "version_or_error": flower_version},
        "caveat": "shared machine (other jobs running): timings are noisy medians of a few repeats",
    }

    client = bench_client(args.params, args.neighbours, args.repeats, flower)
    report["client_masking"] = client
    o = client["fedguard"]
    print(f"\n[client masking] {args.params} params, {args.neighbours} neighbours (median of {args.repeats})")
    print(f"  fedguard: quantise {o['quantise_s']*1e3:8.1f} ms  mask stage {o['mask_stage_s']*1e3:8.1f} ms  "
          f"total {o['total_s']*1e3:8.1f} ms  ({args.neighbours + 1} mask expansions {o['mask_expansion_s']*1e3:.1f} ms, "
          f"{args.neighbours} agreements {o['key_agreements_s']*1e3:.1f} ms)")
    if flower is not None and client.get("flower"):
        fl = client["flower"]
        print(f"  flower:   quantise {fl['quantise_s']*1e3:8.1f} ms  mask stage {fl['mask_stage_s']*1e3:8.1f} ms  "
              f"total {fl['total_s']*1e3:8.1f} ms  ({args.neighbours + 1} mask expansions {fl['mask_expansion_s']*1e3:.1f} ms, "
              f"{args.neighbours} agreements {fl['key_agreements_s']*1e3:.1f} ms)")
        print(f"  ratio fedguard/flower: total {client['ratio_fedguard_over_flower_total']:.2f}x, "
              f"mask expansion {client['ratio_fedguard_over_flower_mask_expansion']:.2f}x")
        report["flower_seed_collision"] = flower_seed_collision(flower)
        print(f"  flower seed folding: different seeds, equal masks = {report['flower_seed_collision']['masks_equal']}")

    degrees: list[int | None] = sorted({args.neighbours, 14, 20, 30} & set(range(2, args.clients)))
    table = survival_table(args.clients, args.dropped, [*degrees, None], 200 if args.quick else 2000)
    report["survival_random_dropouts_after_sharing"] = table
    print(f"\n[survival] n={args.clients}, {args.dropped:.0%} random dropouts after sharing:")
    for row in table:
        print(f"  d={row['neighbours']:3d} t={row['threshold']:3d}: P(round completes) = {row['p_complete']:.3f}")

    report["server_unmasking"] = []
    configs = [("secagg+", args.neighbours)] + ([] if args.skip_classic else [("classic", None)])
    for label, d in configs:
        res = bench_server(args.clients, args.params, args.dropped, d, label, args.unmask_workers)
        res["variant"] = label
        if flower is not None:
            res["flower"] = flower_server_unmask(flower, args.clients, args.params,
                                                 res["masks_regenerated_by_server"]["self"],
                                                 res["masks_regenerated_by_server"]["pairwise"],
                                                 res["neighbours"], res["threshold"])
            res["ratio_fedguard_over_flower_unmask"] = res["server_unmask_close_s"] / res["flower"]["server_unmask_s"]
        report["server_unmasking"].append(res)
        print(f"\n[server unmask] {label}: n={res['n_clients']}, d={res['neighbours']}, t={res['threshold']}, "
              f"{res['dropped_after_sharing']} dropped after sharing, {args.params} params, exact={res['exact_sum']}")
        print(f"  fedguard: unmask close {res['server_unmask_close_s']:.2f} s wall, "
              f"{res['server_unmask_close_cpu_s']:.2f} s CPU (target <= 10 s); with {args.unmask_workers} processes "
              f"{res.get(f'server_unmask_close_s_with_{args.unmask_workers}_workers') or float('nan'):.2f} s wall; server total "
              f"{res['server_total_s']:.2f} s, masks regenerated {res['masks_regenerated_by_server']}")
        if "flower" in res:
            print(f"  flower:   unmask loop {res['flower']['server_unmask_s']:.2f} s  "
                  f"ratio {res['ratio_fedguard_over_flower_unmask']:.2f}x")
        print(f"  bytes up per client: masked input {res['bytes_up_per_client']['mask']['mean']:.0f} "
              f"vs plaintext {res['plaintext_upload_bytes']} ({res['ratio_masked_input_over_plaintext']:.4f}x); "
              f"keys+shares {res['key_and_share_bytes_up_per_client']:.0f} B; total "
              f"{res['ratio_total_up_over_plaintext']:.4f}x")

    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
        print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
