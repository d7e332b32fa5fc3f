"""The faster routes to the same Paillier ciphertexts: the key holder's CRT obfuscators, DJN table rows split
among worker processes, and pools filled in the background while clients train.

Each route must produce what the reference computation produces (the CRT obfuscators are the *same values*
``h_s^α`` as :class:`DJNObfuscators` for the same draws; the split rows multiply to ``h_s^α`` for the
concatenated digits), so the DCR argument of docs/secagg-paillier.md carries over unchanged, and every sum
stays exact.
"""

from __future__ import annotations

import os
import pickle
import time

import gmpy2
import numpy as np
import pytest
from gmpy2 import mpz

from fedguard.encoding import FixedPointSpec
from fedguard.errors import ConfigError
from fedguard.federation import InProcessTransport, aggregate_updates, make_aggregator
from fedguard.federation.protocol import RoundSpec
from fedguard.rng import SecureRNG
from fedguard.secagg.paillier import keys as paillier_keys
from fedguard.secagg.paillier.errors import ForeignKeyError
from fedguard.secagg.paillier.keys import (
    CRTObfuscators,
    DJNObfuscators,
    ObfuscatorPool,
    encrypt_many,
    exponent_bits,
    make_obfuscators,
    obfuscator_source,
    start_workers,
)
from fedguard.updates import ClientUpdate
from tests.secagg.paillier.keys import small_keypair

OPTIONS = {"key_bits": 512, "allow_insecure_test_keys": True}


@pytest.mark.parametrize("count", [None, 3])  # None: window-8 tables mod p^2, q^2; 3: plain powmod
def test_key_holder_crt_obfuscators_are_exactly_the_djn_values_for_the_same_draws(count: int | None) -> None:
    """Same ``x`` and ``α`` from the same stream: the CRT route returns ``h_s^α mod n^2`` bit for bit."""
    kp = small_keypair()
    djn = DJNObfuscators(kp.public, SecureRNG.for_testing("same-draws"), window=8)  # α: 8·rows bits, little-endian
    crt = CRTObfuscators(kp.private, SecureRNG.for_testing("same-draws"), count=count)
    assert exponent_bits(kp.public.bits) % 8 == 0  # so both draw α from the same number of bytes
    expected = [djn.obfuscator() for _ in range(6)]
    got = [crt.obfuscator() for _ in range(6)]
    assert got == expected
    assert len({int(v) for v in got}) == 6 and all(kp.private.decrypt(v) == 0 for v in got)  # n-th residues


def test_crt_obfuscators_stay_secret_and_refuse_another_key() -> None:
    kp, other = small_keypair(0), small_keypair(1)
    crt = CRTObfuscators(kp.private, SecureRNG.for_testing("secret"))
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(crt)
    assert "secret" in repr(crt) and str(int(kp.private._p)) not in repr(crt)
    with pytest.raises(ForeignKeyError, match="the key holder's private key is under key"):
        obfuscator_source(other.public, SecureRNG.for_testing("x"), "djn", private_key=kp.private)
    with pytest.raises(ForeignKeyError):
        ObfuscatorPool(other.public, private_key=kp.private)


def test_key_holder_encryption_by_crt_decrypts_exactly() -> None:
    kp = small_keypair()
    plaintexts = [0, 1, 2**300 + 5, int(kp.public.n) - 1] + list(range(40))
    cts = encrypt_many(kp.public, plaintexts, rng=SecureRNG.for_testing("kh"), private_key=kp.private)
    assert [int(kp.private.decrypt(c)) for c in cts] == plaintexts
    assert len({int(c) for c in cts}) == len(cts)
    # "standard" with the private key stays r^n (the CRT route is the DJN value only)
    std = obfuscator_source(kp.public, SecureRNG.for_testing("std"), "standard", private_key=kp.private)
    assert kp.private.decrypt(std()) == 0


def test_split_table_rows_multiply_to_h_to_the_concatenated_exponent() -> None:
    """What each worker computes (its rows, its digits), multiplied, is ``h_s^α`` for ``α`` whose base-2^w
    digits are the workers' digits in row order: checked against one ``powmod``."""
    kp = small_keypair()
    pub, n2 = kp.public, kp.public.n_squared
    for window in (8, 5):
        rows = -(-exponent_bits(pub.bits) // window)
        base_seed, seeds, count = b"b" * 32, [b"1" * 32, b"2" * 32, b"3" * 32], 4
        cuts = [0, rows // 3, 2 * rows // 3, rows]
        parts = [paillier_keys._djn_rows_worker((int(pub.n), base_seed, window, lo, hi, seed, count))
                 for lo, hi, seed in zip(cuts, cuts[1:], seeds)]
        h = pub.obfuscator(SecureRNG.from_seed(base_seed))
        for j in range(count):
            alpha = 0
            for lo, hi, seed in zip(cuts, cuts[1:], seeds):
                stream = SecureRNG.from_seed(seed)
                width = (hi - lo) * window
                for _ in range(j + 1):  # the j-th obfuscator's digits
                    if window == 8:
                        e = int.from_bytes(stream.bytes(hi - lo), "little")
                    else:
                        e = int.from_bytes(stream.bytes((width + 7) // 8), "little") & ((1 << width) - 1)
                alpha |= e << (window * lo)
            product = mpz(1)
            for part in parts:
                product = gmpy2.f_mod(product * part[j], n2)
            assert product == gmpy2.powmod(h, alpha, n2), (window, j)


@pytest.mark.multiprocess
def test_parallel_djn_and_crt_obfuscators_are_distinct_nth_residues() -> None:
    kp = small_keypair()
    for private in (None, kp.private):
        values = make_obfuscators(kp.public, 60, rng=SecureRNG.for_testing(f"par/{private is None}"), workers=2,
                                  private_key=private)
        assert len({int(v) for v in values}) == 60
        assert all(kp.private.decrypt(v) == 0 and gmpy2.gcd(v, kp.public.n) == 1 for v in values)
    cts = encrypt_many(kp.public, list(range(100, 160)), rng=SecureRNG.for_testing("par-enc"), workers=2)
    assert [int(m) for m in kp.private.decrypt_many(cts, workers=2)] == list(range(100, 160))


@pytest.mark.multiprocess
def test_background_fill_returns_at_once_runs_at_low_priority_and_take_waits_for_it() -> None:
    kp = small_keypair()
    start_workers(2, background=True)
    pids = list(paillier_keys._EXECUTORS[(2, True)]._processes)
    assert len(pids) == 2 and all(os.getpriority(os.PRIO_PROCESS, pid) == 19 for pid in pids)
    pool = ObfuscatorPool(kp.public, rng=SecureRNG.for_testing("bg"))
    started = time.perf_counter()
    pool.fill(400, workers=2, background=True)
    assert time.perf_counter() - started < 0.5  # nothing computed here
    assert len(pool) == 400 and pool.pending == 400  # promised, counted once
    values = pool.take(400)
    assert pool.pending == 0 and len(pool) == 0
    assert len({int(v) for v in values}) == 400 and all(kp.private.decrypt(v) == 0 for v in values)
    pool.fill(50, workers=2, background=True)
    pool.discard()
    assert len(pool) == 0 and pool.take(5) == []


@pytest.mark.multiprocess
def test_background_precompute_in_the_round_loop_stays_exact_and_hands_out_each_obfuscator_once() -> None:
    spec_fp = FixedPointSpec(clip=1.0, value_bits=16, ring_bits=32, max_weight=10)
    with make_aggregator("paillier", {**OPTIONS, "precompute": True, "precompute_background": True,
                                      "workers": 2}) as agg:
        for round_id in (1, 2):
            spec = RoundSpec(round_id, (0, 1, 2), 201, 32, fixed_point=spec_fp)
            need = agg.layout(spec).n_ciphertexts
            assert agg.precompute(spec) == 3 * need and [agg.pooled(c) for c in range(3)] == [need] * 3
            rng = SecureRNG.for_testing(f"bg-round/{round_id}")
            updates = [ClientUpdate(c, round_id, (rng.normal(200) * 0.2).astype(np.float32), 1 + c) for c in range(3)]
            plain = aggregate_updates(updates, make_aggregator("plaintext"), spec_fp, round_id=round_id,
                                      rng=rng.spawn("q"))
            out = aggregate_updates(updates, agg, spec_fp, round_id=round_id, rng=rng.spawn("q"),
                                    transport=InProcessTransport())
            np.testing.assert_array_equal(out.mean, plain.mean)
            assert [agg.pooled(c) for c in range(3)] == [0] * 3
        # the key holder's pool makes its obfuscators by CRT, the others by DJN
        kinds = {c: pool._private is not None for c, pool in agg._pools.items()}
        assert kinds == {0: True, 1: False, 2: False}
        agg.precompute(RoundSpec(3, (0, 1, 2), 201, 32, fixed_point=spec_fp))
    assert agg._pools == {}  # close() forgot every pool


def test_precompute_background_needs_precompute_and_a_bool() -> None:
    with pytest.raises(ConfigError, match="precompute_background needs precompute: true"):
        make_aggregator("paillier", {**OPTIONS, "precompute_background": True})
    with pytest.raises(ConfigError, match="precompute_background must be a bool"):
        make_aggregator("paillier", {**OPTIONS, "precompute": True, "precompute_background": 1})
