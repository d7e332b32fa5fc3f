"""Where a Paillier round's protocol seconds go, piece by piece, at the SmolLM2 demo's sizes.

    .venv/bin/python benchmarks/paillier_profile.py            # demo encoding and 8-bit uploads, 2 workers
    .venv/bin/python benchmarks/paillier_profile.py --quick    # 1/16 of the values (plumbing check)

For 460,800 travelling values (+ the weight slot), 3 clients and a 2048-bit key, at the demo's encoding
(24-bit values, sample-count weights <= 300, 64-bit ring: 34-bit slots) and at 8/16-bit quantised uploads
(equal weights), each piece of the protocol is timed alone, without the trainer: key generation, packing,
one client's obfuscators + encryption (the default DJN route on ``--workers`` processes; the same with one
table per worker as before this session's change, for the side-by-side ratio; the key holder's CRT route),
serialisation and validation, the server's product, the key holder's decryption (``--workers`` processes)
and unpacking. Per-operation costs in one process (one multiplication modulo ``n^2``, one ``r^n``, one DJN
obfuscator, one CRT obfuscator, one CRT decryption) let the wall times be read as CPU seconds. The round's
protocol in the simulation is ``keygen + 3·(pack + encrypt) + validate + sum + decrypt + unpack`` (the key
holder is one of the 3 clients).

Writes benchmarks/results/paillier_profile.json (``--quick``: paillier_profile_quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gmpy2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedguard.encoding import encode_weighted, ring_sum  # noqa: E402
from fedguard.federation.protocol import RoundSpec  # noqa: E402
from fedguard.quantise import plan_upload  # noqa: E402
from fedguard.rng import SecureRNG  # noqa: E402
from fedguard.secagg.paillier import keys as K  # noqa: E402
from fedguard.secagg.paillier.aggregator import sum_ciphertexts  # noqa: E402
from fedguard.secagg.paillier.packing import SlotLayout  # noqa: E402

VALUES = 460_800


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def per_op(fn: Callable[[], Any], repeats: int) -> float:
    """Seconds per call of ``fn``, one process."""
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def old_style_djn(pub: K.PaillierPublicKey, count: int, rng: SecureRNG, workers: int) -> list[gmpy2.mpz]:
    """Before this session: the batch split by obfuscators, each worker building its own full table."""
    pool = K._executor(workers)
    sizes = [len(c) for c in K._split(list(range(count)), workers)]
    futures = [pool.submit(K._obfuscator_worker, (int(pub.n), size, rng.bytes(32), "djn", None)) for size in sizes]
    return [gmpy2.mpz(r) for f in futures for r in f.result()]


def profile(label: str, plan_kwargs: dict[str, Any], d: int, workers: int, kp: K.PaillierKeypair) -> dict[str, Any]:
    plan = plan_upload(n_clients=3, dimension=d, seed="profile", **plan_kwargs)
    fp = plan.spec
    weights = [1, 1, 1] if plan.equal_weights else [300, 290, 280]
    rng = np.random.default_rng(0)
    ring = [encode_weighted(rng.normal(0, 0.3 * fp.clip, d).astype(np.float32), w, fp,
                            rng=SecureRNG.for_testing(f"profile/{label}/{i}")) for i, w in enumerate(weights)]
    spec = RoundSpec(1, (0, 1, 2), d + 1, fp.ring_bits, fixed_point=fp)
    layout = SlotLayout.derive(modulus_bits=kp.public.bits, round_spec=spec)
    pub, priv = kp.public, kp.private
    srng = SecureRNG()
    out: dict[str, Any] = {"encoding": label, "value_bits": fp.value_bits, "ring_bits": fp.ring_bits,
                           "max_weight": fp.max_weight, "slot_bits": layout.slot_bits,
                           "slots_per_ciphertext": layout.slots_per_ciphertext, "ciphertexts": layout.n_ciphertexts,
                           "load_start": os.getloadavg()}
    pts: list[list[int]] = []
    t_pack = 0.0
    for r in ring:
        p, t = timed(lambda r=r: layout.pack(r, rng=srng))  # type: ignore[misc]
        pts.append(p)
        t_pack += t
    count = layout.n_ciphertexts
    obf_new, out["djn_obfuscators_split_rows_s"] = timed(lambda: K.make_obfuscators(pub, count, rng=srng, workers=workers))
    _, out["djn_obfuscators_table_per_worker_s"] = timed(lambda: old_style_djn(pub, count, srng, workers))
    obf_kh, out["crt_obfuscators_key_holder_s"] = timed(
        lambda: K.make_obfuscators(pub, count, rng=srng, workers=workers, private_key=priv))
    cts = []
    t_enc = 0.0
    for p, obf in zip(pts, (obf_kh, obf_new, obf_new)):  # (1 + m·n)·R: same cost whichever R
        c, t = timed(lambda p=p, obf=obf: [pub.encrypt_with(m, r) for m, r in zip(p, obf)])  # type: ignore[misc]
        cts.append(c)
        t_enc += t
    blobs, t_ser = timed(lambda: [pub.ciphertexts_to_bytes(c) for c in cts])
    parsed, t_val = timed(lambda: [pub.ciphertexts_from_bytes(b, count) for b in blobs])
    summed, t_sum = timed(lambda: sum_ciphertexts(pub, parsed))
    plain, t_dec = timed(lambda: priv.decrypt_many(summed, workers=workers))
    total, t_unpack = timed(lambda: layout.unpack(plain, 3))
    if not np.array_equal(total, ring_sum(ring, fp.ring_bits)):
        raise SystemExit(f"{label}: the decrypted sum differs from the ring sum")
    out.update({
        "pack_3_clients_s": t_pack, "encrypt_with_3_clients_s": t_enc, "serialise_s": t_ser,
        "validate_s": t_val, "server_sum_s": t_sum, "decrypt_s": t_dec, "unpack_s": t_unpack,
    })
    out["round_protocol_now_s"] = (t_pack + 2 * out["djn_obfuscators_split_rows_s"] + out["crt_obfuscators_key_holder_s"]
                                   + t_enc + t_ser + t_val + t_sum + t_dec + t_unpack)
    out["round_protocol_before_s"] = (t_pack + 3 * out["djn_obfuscators_table_per_worker_s"] + t_enc + t_ser + t_val
                                      + t_sum + t_dec + t_unpack)
    out["load_end"] = os.getloadavg()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--encodings", nargs="*", default=["demo", "8", "16"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    d = VALUES // 16 if args.quick else VALUES
    out_path = args.out or ROOT / "benchmarks" / "results" / ("paillier_profile_quick.json" if args.quick
                                                              else "paillier_profile.json")
    report: dict[str, Any] = {"values": d, "clients": 3, "workers": args.workers, "load_start": os.getloadavg(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.workers > 1:
        K.start_workers(args.workers)
    kp, report["keygen_s"] = timed(lambda: K.generate_keypair(2048))
    pub, priv = kp.public, kp.private
    rng = SecureRNG()
    a, b = pub.obfuscator(rng), pub.obfuscator(rng)
    n2 = pub.n_squared
    djn = K.DJNObfuscators(pub, rng)
    crt = K.CRTObfuscators(priv, rng)
    ct = pub.encrypt(12345, rng)
    report["per_op_ms"] = {
        "mulmod_n2": per_op(lambda: gmpy2.f_mod(a * b, n2), 20_000) * 1e3,
        "r_pow_n": per_op(lambda: pub.obfuscator(rng), 100) * 1e3,
        "djn_table_w8_build": per_op(lambda: K.DJNObfuscators(pub, rng), 1) * 1e3,
        "djn_obfuscator_w8": per_op(djn.obfuscator, 300) * 1e3,
        "crt_obfuscator": per_op(crt.obfuscator, 300) * 1e3,
        "crt_decrypt": per_op(lambda: priv.decrypt(ct), 300) * 1e3,
    }
    print(f"keygen {report['keygen_s']:.2f} s; per operation (ms, 1 process): "
          + ", ".join(f"{k} {v:.4g}" for k, v in report["per_op_ms"].items()), flush=True)
    encodings = {"demo": ("demo: 24-bit values, weights <= 300, 64-bit ring",
                          {"clip": 1.0, "value_bits": 24, "ring_bits": 64, "max_weight": 300}),
                 "8": ("8-bit upload", {"clip": 0.02, "value_bits": 24, "max_weight": 300, "upload_bits": 8}),
                 "16": ("16-bit upload", {"clip": 0.02, "value_bits": 24, "max_weight": 300, "upload_bits": 16})}
    report["profiles"] = []
    for key in args.encodings:
        label, kwargs = encodings[key]
        row = profile(label, kwargs, d, args.workers, kp)
        report["profiles"].append(row)
        print(f"[{label}] {row['ciphertexts']} ciphertexts/client ({row['slot_bits']}-bit slots): "
              + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k.endswith("_s")), flush=True)
        report["load_end"] = os.getloadavg()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=1, default=float) + "\n")
    print(f"wrote {out_path} (load {report['load_start']} -> {report['load_end']})")


if __name__ == "__main__":
    main()
