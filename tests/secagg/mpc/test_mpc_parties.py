"""Real CrypTen compute parties: separate OS processes over torch.distributed (gloo, loopback).

What runs where: the test process is the coordinator (server side and clients); the parties and the dealer
are processes started from a fork server and run CrypTen 0.4.1 through the compatibility layer. The sum,
the norm check (exact integer form and truncated form), the min-contributors guard and the abort on a
killed or stalled party are all exercised through those processes.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedguard.encoding import FixedPointSpec, encode_weighted, ring_sum, to_ring
from fedguard.errors import ProtocolAbort
from fedguard.federation import aggregate_updates, make_aggregator
from fedguard.federation.protocol import RoundSpec
from fedguard.federation.transport import InProcessTransport
from fedguard.rng import SecureRNG
from fedguard.secagg.mpc import NORM_CHECK_DROPPED, MpcAggregator, unweighted_input
from fedguard.secagg.mpc.crypten_rng import CHACHA
from fedguard.secagg.mpc.norm import MAX_LADDER_STEP, NormCheck
from fedguard.secagg.mpc.parties import CryptenParties, _prepare_process
from fedguard.updates import ClientUpdate

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(60)]

ENC = FixedPointSpec(clip=1.0, value_bits=16, ring_bits=64, max_weight=100)


@pytest.fixture(scope="module")
def parties() -> Iterator[CryptenParties]:
    with CryptenParties(3, norm_check=True, timeout_s=20.0) as p:
        yield p
    assert not any(p.alive())


def _run(agg: MpcAggregator, spec: RoundSpec, xs: dict[int, np.ndarray], **kw: object):  # type: ignore[no-untyped-def]
    rng = SecureRNG.for_testing(f"parties/{spec.round_id}")
    clients = {c: agg.client(spec, c, xs[c], rng=rng.spawn(str(c))) for c in xs}
    return InProcessTransport().run(agg.server(spec), clients, **kw)  # type: ignore[arg-type]


def _sum_of_squares(target: int, length: int, limit: int) -> np.ndarray:
    """A non-negative integer vector with Σ q_j^2 == target exactly (greedy; checked)."""
    q = np.zeros(length, dtype=np.int64)
    rest = target
    for j in range(length):
        q[j] = min(math.isqrt(rest), limit)
        rest -= int(q[j]) ** 2
    if rest:
        raise ValueError(f"greedy left {rest}")
    return q


def _draw_after_prepare(rank: int, port: int, queue: Any) -> None:
    """Child of the fork server: set up like a party/dealer process, then draw as CrypTen's dealer does."""
    import torch

    _prepare_process(rank, 4, port, 5.0, dealer=True)
    queue.put(int(torch.randint(-(2**63), 2**63 - 1, size=())))


def _draw_without_prepare(queue: Any) -> None:
    import torch

    queue.put(int(torch.randint(-(2**63), 2**63 - 1, size=())))


def _draws(target: Any, args: list[tuple[Any, ...]]) -> list[int]:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["fedguard.secagg.mpc.preload"])  # as CryptenParties.start does
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, queue), daemon=True) for a in args]
    for p in procs:
        p.start()
    out = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    return out


def test_party_and_dealer_processes_do_not_share_the_torch_seeds_the_dealer_draws() -> None:
    # control: children of one fork server inherit one torch default generator, so the dealer's
    # `torch.randint` seeds for the party generators would be replayable by every party
    control = _draws(_draw_without_prepare, [(), (), ()])
    assert len(set(control)) == 1
    # each party/dealer process reseeds from os.urandom before CrypTen draws anything
    draws = _draws(_draw_after_prepare, [(r, 29500) for r in range(3)])
    assert len(set(draws)) == 3


def test_every_party_and_the_dealer_draw_from_chacha20_streams(parties: CryptenParties) -> None:
    """CrypTen's own MT19937 generators are replaced in the running party processes (crypten_rng)."""
    reports = parties.generators
    assert len(reports) == 3
    for report in reports:
        assert set(report) == {"prev", "next", "local", "global", "dealer"}
        assert set(report.values()) == {CHACHA}


def test_the_coordinator_holds_no_party_private_key(parties: CryptenParties) -> None:
    seen: set[int] = set()

    def walk(obj: Any, depth: int = 0) -> list[Any]:
        if id(obj) in seen or depth > 6:
            return []
        seen.add(id(obj))
        attrs = list(getattr(obj, "__dict__", {}).values())
        for cls in type(obj).__mro__:
            attrs += [getattr(obj, a, None) for a in getattr(cls, "__slots__", ())]
        if isinstance(obj, (list, tuple, set, frozenset)):
            attrs += list(obj)
        if isinstance(obj, dict):
            attrs += list(obj.values())
        return [obj] + [o for a in attrs for o in walk(a, depth + 1)]

    found = walk(parties)
    assert any(isinstance(o, bytes) and len(o) == 32 for o in found)  # the public keys are reachable
    assert not any(isinstance(o, X25519PrivateKey) for o in found)


def test_secure_sum_in_crypten_parties_equals_plaintext_exactly(parties: CryptenParties) -> None:
    agg = MpcAggregator(parties=parties, min_clients=2)
    spec = RoundSpec(1, (10, 11, 12, 13), 33)
    rng = SecureRNG.for_testing("crypten-sum")
    xs = {c: rng.ring_elements(33, 64) for c in spec.participants}
    out = _run(agg, spec, xs, drop_at={12: "input"})
    assert out.result.contributors == (10, 11, 13)
    np.testing.assert_array_equal(out.result.ring_sum, ring_sum([xs[10], xs[11], xs[13]], 64))


def test_norm_check_accepts_at_the_bound_and_rejects_one_step_above(parties: CryptenParties) -> None:
    n = 8
    bound = 0.5
    check = NormCheck.for_bound(bound, ENC, n)
    assert check.chunks == 1  # one chunk: no tree sum
    T = check.threshold
    at = _sum_of_squares(T, n, ENC.max_int)
    above = _sum_of_squares(T + 1, n, ENC.max_int)
    below = _sum_of_squares(T // 4, n, ENC.max_int)
    signs = np.array([1, -1, 1, -1, 1, -1, 1, -1])
    qs = {20: at * signs, 21: above * signs, 22: below, 23: -above}
    weights = {20: 3, 21: 5, 22: 7, 23: 100}
    xs = {}
    for c, q in qs.items():
        x = encode_weighted((q / ENC.scale).astype(np.float32), weights[c], ENC, rounding="nearest")
        np.testing.assert_array_equal(unweighted_input(x, ENC, 64)[:-1], to_ring(q, 64))
        xs[c] = x
    agg = MpcAggregator(parties=parties, norm_bound=bound, min_clients=2)
    out = _run(agg, RoundSpec(2, tuple(qs), n + 1, fixed_point=ENC), xs)
    assert out.result.contributors == (20, 22)
    assert out.result.dropped[NORM_CHECK_DROPPED] == (21, 23)
    # the sum of the accepted clients is exact, weights included
    np.testing.assert_array_equal(out.result.ring_sum, ring_sum([xs[20], xs[22]], 64))


def test_clipping_under_mpc_equals_the_exact_reference_and_bounds_every_norm(parties: CryptenParties) -> None:
    n = 40
    bound = 0.2
    check = NormCheck.for_bound(bound, ENC, n, clip_halvings=2, n_clients=4)
    rng = np.random.default_rng(5)

    def scaled_to(norm: float) -> np.ndarray:
        v = rng.standard_normal(n)
        return np.round(v / np.linalg.norm(v) * norm * ENC.scale).astype(np.int64)

    # within the bound; 1.7x and 3.5x over (clipped); 9x over (beyond 2^2 = 4x: excluded)
    qs = {30: scaled_to(0.15), 31: scaled_to(0.34), 32: scaled_to(0.70), 33: scaled_to(1.8)}
    weights = {30: 3, 31: 5, 32: 7, 33: 11}
    xs = {c: encode_weighted((q / ENC.scale).astype(np.float32), weights[c], ENC, rounding="nearest")
          for c, q in qs.items()}
    agg = MpcAggregator(parties=parties, norm_bound=bound, min_clients=2, norm_action="clip",
                        clip_halvings=2)
    out = _run(agg, RoundSpec(9, tuple(qs), n + 1, fixed_point=ENC), xs)
    assert out.result.contributors == (30, 31, 32)
    assert out.result.dropped[NORM_CHECK_DROPPED] == (33,)
    expected, excluded = check.clipped_sum([(qs[c], weights[c]) for c in sorted(qs)])
    assert excluded == [3]
    np.testing.assert_array_equal(out.result.ring_sum, expected)  # exactly the plaintext reference
    # ... which is neither the exclusion result nor the unclipped sum: the clipped clients contribute, scaled
    assert not np.array_equal(expected, ring_sum([xs[30]], 64))
    assert not np.array_equal(expected, ring_sum([xs[30], xs[31], xs[32]], 64))
    assert int(expected[-1]) == 3 + 5 + 7
    factors = {c: check.clip_factor(q) for c, q in qs.items()}
    assert factors[30] == 1 << check.scale_bits  # an in-bound update is not scaled
    for c in (31, 32):  # clipped into the bound, less than one ladder step below it
        clipped = np.linalg.norm(qs[c] * factors[c] / (1 << check.scale_bits)) / ENC.scale
        assert bound / MAX_LADDER_STEP - 1e-6 <= clipped <= bound + 1e-9


def test_multi_chunk_norm_check_is_exact_at_the_boundary_and_for_huge_updates(parties: CryptenParties) -> None:
    enc = FixedPointSpec(clip=1.0, value_bits=24, ring_bits=64, max_weight=16)
    n = 70_000  # n·M^2 > 2^61: three chunk sums and a clamped tree sum
    bound = 30.0
    check = NormCheck.for_bound(bound, enc, n)
    assert check.chunks == 3 and check.levels == 2
    T = check.threshold
    # the exact boundary, spread over all chunks (the greedy fill puts M in the first ~900 coordinates)
    at = _sum_of_squares(T, n, enc.max_int)
    above = _sum_of_squares(T + 1, n, enc.max_int)
    rng = SecureRNG.for_testing("perm").numpy_generator()
    qs = {30: rng.permutation(at), 31: -rng.permutation(above),
          32: np.full(n, enc.max_int, dtype=np.int64),  # every chunk sum near 2^61: the largest inputs
          33: np.zeros(n, dtype=np.int64)}
    xs = {c: to_ring(np.append(q * 2, 2), 64) for c, q in qs.items()}  # weight 2: [w·q, w]
    for c, q in qs.items():  # the inputs really sit where the test claims
        assert check.decide(q) == (c in (30, 33))
    agg = MpcAggregator(parties=parties, norm_bound=bound)
    out = _run(agg, RoundSpec(3, tuple(xs), n + 1, fixed_point=enc), xs)
    assert out.result.contributors == (30, 33)
    assert out.result.dropped[NORM_CHECK_DROPPED] == (31, 32)
    np.testing.assert_array_equal(out.result.ring_sum, ring_sum([xs[30], xs[33]], 64))


def test_too_few_within_bound_abort_without_reveal_and_parties_stay_up(parties: CryptenParties) -> None:
    agg = MpcAggregator(parties=parties, norm_bound=0.1, min_clients=2)
    big = {c: encode_weighted(np.full(4, 0.5, np.float32), 1, ENC) for c in (40, 41)}
    small = {42: encode_weighted(np.full(4, 0.01, np.float32), 1, ENC)}
    with pytest.raises(ProtocolAbort, match="nothing revealed"):
        _run(agg, RoundSpec(4, (40, 41, 42), 5, fixed_point=ENC), big | small)
    assert all(parties.alive())
    again = {c: encode_weighted(np.full(4, 0.01, np.float32), 1, ENC) for c in (40, 41)}
    assert _run(agg, RoundSpec(5, (40, 41), 5, fixed_point=ENC), again).result.contributors == (40, 41)


def test_fedavg_with_norm_check_equals_plaintext_fedavg_over_the_accepted(parties: CryptenParties) -> None:
    enc = FixedPointSpec(clip=1.0, value_bits=20, ring_bits=64, max_weight=1000)
    gen = SecureRNG.for_testing("fedavg-mpc").numpy_generator()
    updates = [ClientUpdate(c, 6, gen.normal(0, s, 64).astype(np.float32), w)
               for c, s, w in ((0, 0.05, 10), (1, 0.05, 30), (2, 0.5, 20), (3, 0.05, 5))]
    agg = MpcAggregator(parties=parties, norm_bound=1.0, min_clients=2)
    mpc = aggregate_updates(updates, agg, enc, round_id=6, rng=SecureRNG.for_testing("q"))
    kept = [u for u in updates if u.client_id != 2]
    assert float(np.linalg.norm(updates[2].vector)) > 1.0 > max(float(np.linalg.norm(u.vector)) for u in kept)
    assert mpc.contributors == (0, 1, 3) and mpc.dropped[NORM_CHECK_DROPPED] == (2,)
    # the plaintext reference over the same quantisation streams of the accepted clients
    plain = aggregate_updates(updates, make_aggregator("plaintext"), enc, round_id=6,
                              rng=SecureRNG.for_testing("q"), drop_at={2: "input"})
    np.testing.assert_array_equal(mpc.mean, plain.mean)
    assert mpc.total_weight == 45


def _wait_dead(p: CryptenParties, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not any(p.alive()):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("failure", ["killed", "stalled"])
def test_a_killed_or_stalled_party_gives_protocol_abort_within_the_timeout(failure: str) -> None:
    timeout = 4.0
    parties = CryptenParties(2, timeout_s=timeout).start()
    try:
        agg = MpcAggregator(parties=parties)
        spec = RoundSpec(9, (1, 2, 3), 17)
        rng = SecureRNG.for_testing("kill")
        xs = {c: rng.ring_elements(17, 64) for c in spec.participants}
        assert _run(agg, spec, xs).result.contributors == (1, 2, 3)  # the pool works
        victim = parties.pids[1]
        os.kill(victim, signal.SIGKILL if failure == "killed" else signal.SIGSTOP)
        start = time.monotonic()
        server = agg.server(RoundSpec(10, (1, 2, 3), 17))
        with pytest.raises(ProtocolAbort, match="nothing revealed") as info:
            InProcessTransport().run(server, {c: agg.client(server.spec, c, xs[c]) for c in xs})
        elapsed = time.monotonic() - start
        assert info.value.round_id == 10
        if failure == "killed":
            assert elapsed < timeout  # a dead process is noticed at once, not after the timeout
        else:
            # the surviving party stopped itself when its gloo operation timed out, and said so
            assert timeout - 0.5 < elapsed < timeout + 2.0
            assert "MPC party 0 stopped" in str(info.value)
        assert _wait_dead(parties, 5.0), "the surviving party was not stopped"
        with pytest.raises(ProtocolAbort):
            server.close_stage()  # nothing can be extracted from the aborted round
        with pytest.raises(ProtocolAbort, match="earlier abort"):
            _run(agg, RoundSpec(11, (1, 2, 3), 17), xs)
    finally:
        parties.close()


def test_config_selected_crypten_backend_owns_and_stops_its_parties() -> None:
    agg = make_aggregator("mpc", backend="crypten", n_parties=2, min_clients=2, timeout_s=10.0)
    assert isinstance(agg, MpcAggregator) and isinstance(agg.parties, CryptenParties)
    try:
        spec = RoundSpec(12, (5, 6), 9)
        rng = SecureRNG.for_testing("config-backend")
        xs = {c: rng.ring_elements(9, 64) for c in spec.participants}
        np.testing.assert_array_equal(_run(agg, spec, xs).result.ring_sum, ring_sum(list(xs.values()), 64))
    finally:
        agg.close()
    assert _wait_dead(agg.parties, 5.0)


def test_crypten_parties_refuse_to_open_below_min_contributors(parties: CryptenParties) -> None:
    """``RoundSpec.min_contributors`` reaches the CrypTen party processes: with 3 of 4 inputs and
    ``min_contributors=4`` they open nothing; the message states both numbers."""
    agg = MpcAggregator(parties=parties, min_clients=2)
    spec = RoundSpec(9, (50, 51, 52, 53), 5, fixed_point=ENC, min_contributors=4)
    xs = {c: encode_weighted(np.full(4, 0.01, np.float32), 1, ENC) for c in spec.participants}
    server = agg.server(spec)
    clients = {c: agg.client(spec, c, xs[c]) for c in spec.participants}
    with pytest.raises(ProtocolAbort, match="only 3 client.*min_contributors=4"):
        InProcessTransport().run(server, clients, drop_at={53: "input"})
    assert all(parties.alive())
