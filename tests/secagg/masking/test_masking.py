"""Pairwise masking (SecAgg / SecAgg+): the aggregator contract, the server's view, dropouts, tampering."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from fedguard import wire
from fedguard.encoding import FixedPointSpec
from fedguard.errors import ConfigError, MessageError, ProtocolAbort, ProtocolViolation
from fedguard.federation import (
    AggregateResult,
    InProcessTransport,
    PlaintextAggregator,
    RoundSpec,
    aggregate_updates,
    make_aggregator,
)
from fedguard.federation.protocol import Aggregator, ClientSide, Outbox, ServerSide
from fedguard.rng import SecureRNG, expand_seed
from fedguard.secagg.masking import MaskingAggregator, ShareCommitmentError, shamir
from fedguard.secagg.masking.crypto import (
    PAIR_MASK_NONCE,
    SELF_MASK_NONCE,
    Mask,
    ShareDecryptionError,
    apply_masks,
    open_sealed,
    seal,
)
from fedguard.secagg.masking.graph import CommunicationGraph
from fedguard.testing.aggregator_contract import AggregatorContract
from fedguard.updates import ClientUpdate

ALPHA = 0.01  # significance of every statistical test in this file
BINS = 64


# -- the foundation's contract, for classic SecAgg and for SecAgg+ ------------------------------------------
class TestClassicSecAgg(AggregatorContract):
    def make_aggregator(self, n_clients: int) -> Aggregator:
        return MaskingAggregator(rng=SecureRNG.for_testing("classic"))


class TestClassicHighThresholdSmallRing(AggregatorContract):
    ring_bits = 20
    vector_length = 5

    def make_aggregator(self, n_clients: int) -> Aggregator:
        return MaskingAggregator(threshold=n_clients - 1, rng=SecureRNG.for_testing("classic-high"))


class TestSecAggPlusRing(AggregatorContract):
    """d = 2: each client masks with its two ring neighbours; many dropout patterns abort (disconnection,
    too few holders), and `survives` must predict exactly which."""

    min_clients = 4
    max_clients = 8

    def make_aggregator(self, n_clients: int) -> Aggregator:
        return MaskingAggregator(neighbours=2, rng=SecureRNG.for_testing("ring"))


class TestSecAggPlusDegree4(AggregatorContract):
    ring_bits = 32
    min_clients = 6
    max_clients = 9

    def make_aggregator(self, n_clients: int) -> Aggregator:
        return MaskingAggregator(neighbours=4, threshold=3, rng=SecureRNG.for_testing("degree4"))


# -- helpers -----------------------------------------------------------------------------------------------
def _round(n: int, length: int = 9, ring_bits: int = 64, round_id: int = 3) -> RoundSpec:
    return RoundSpec(round_id, tuple(range(n)), length, ring_bits)


def _inputs(spec: RoundSpec, label: str = "inputs") -> dict[int, np.ndarray]:
    rng = SecureRNG.for_testing(label)
    return {c: rng.ring_elements(spec.vector_length, spec.ring_bits) for c in spec.participants}


def _build(agg: MaskingAggregator, spec: RoundSpec, inputs: dict[int, np.ndarray], seed: str = "p"
           ) -> tuple[ServerSide, dict[int, ClientSide]]:
    rng = SecureRNG.for_testing(seed)
    clients = {c: agg.client(spec, c, inputs[c], rng=rng.spawn(str(c))) for c in spec.participants}
    return agg.server(spec), clients


def _step(server: ServerSide, clients: dict[int, ClientSide], outbox: Outbox,
          silent: frozenset[int] | set[int] = frozenset()) -> Outbox | AggregateResult:
    for cid in sorted(outbox):
        if cid not in silent:
            server.accept(cid, clients[cid].handle(outbox[cid]))
    return server.close_stage()


def _run_to(agg: MaskingAggregator, spec: RoundSpec, inputs: dict[int, np.ndarray], stage: str,
            silent: dict[str, set[int]] | None = None) -> tuple[ServerSide, dict[int, ClientSide], Outbox]:
    """Run stage by stage until the server has sent the messages of ``stage``."""
    server, clients = _build(agg, spec, inputs)
    outbox = server.open()
    while server.stage != stage:
        step = _step(server, clients, outbox, (silent or {}).get(server.stage, set()))
        assert isinstance(step, dict)
        outbox = step
    return server, clients, outbox


def _rewrite(payload: bytes, **arrays: np.ndarray) -> bytes:
    msg = wire.decode(payload)
    new = dict(msg.arrays)
    new.update(arrays)
    return wire.encode(wire.Message(msg.kind, msg.round, msg.stage, msg.sender, msg.recipient, dict(msg.meta), new))


def _capture_masked(agg: MaskingAggregator, spec: RoundSpec, inputs: dict[int, np.ndarray], seed: str
                    ) -> tuple[dict[int, np.ndarray], dict[int, ClientSide], AggregateResult]:
    seen: dict[int, np.ndarray] = {}

    def tap(stage: str, cid: int, reply: bytes) -> bytes:
        if stage == "mask":
            seen[cid] = wire.decode(reply).arrays["x"].copy()
        return reply

    server, clients = _build(agg, spec, inputs, seed)
    outcome = InProcessTransport().run(server, clients, tamper=tap)
    return seen, clients, outcome.result


def _b_seed(client: ClientSide) -> bytes:
    """The self-mask seed of a client: what the server reconstructs from the revealed shares."""
    keys = getattr(client, "_keys")  # noqa: B009 - reading the client's secret in a test of the server's view
    return bytes(keys.b_seed)


def _top_bits_histogram(v: np.ndarray, ring_bits: int) -> np.ndarray:
    bins = (v >> np.uint64(ring_bits - 6)).astype(np.int64)  # the 6 most significant bits: 64 bins
    return np.bincount(bins, minlength=BINS)


# -- configuration -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "n", "message"),
    [
        ({"neighbours": 4, "threshold": 2}, None, r"threshold t=2 must exceed half of the k=5 share holders .*t >= 3"),
        ({"neighbours": 4, "threshold": 6}, None, r"threshold t=6 exceeds the k=5 share holders .*neighbours=4"),
        ({"threshold": 5}, 4, r"threshold t=5 exceeds the k=4 share holders .*n=4 clients"),
        ({"threshold": 2}, 5, r"threshold t=2 must exceed half of the k=5 share holders"),
        ({"neighbours": 3}, 7, r"neighbours=3 with n=7 clients: a d-regular graph needs n·d even .*use neighbours=2 or 4"),
        ({"neighbours": 10}, 8, r"neighbours=10 must be in \[1, n-1\] = \[1, 7\] for n=8 clients"),
        ({"neighbours": 1}, 4, r"neighbours=1 splits n=4 clients into disconnected pairs"),
        ({"neighbours": 0}, None, r"neighbours must be None or an int >= 1, got 0"),
        ({"threshold": True}, None, r"threshold must be None .* got True"),
        ({"unmask_workers": 0}, None, r"unmask_workers must be an int >= 1, got 0"),
        ({}, 1, r"pairwise masking needs at least 2 clients, got 1"),
    ],
)
def test_neighbours_and_threshold_are_validated_against_each_other(kwargs: dict, n: int | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        agg = MaskingAggregator(**kwargs)
        if n is not None:
            agg.threshold(n)


def test_default_threshold_is_the_smallest_majority_of_holders() -> None:
    assert MaskingAggregator().params(100).threshold == 51
    p = MaskingAggregator(neighbours=10).params(100)
    assert (p.neighbours, p.holders, p.threshold) == (10, 11, 6)


def test_registry_builds_the_masking_aggregator_with_options() -> None:
    agg = make_aggregator("masking", neighbours=2)
    assert isinstance(agg, MaskingAggregator) and agg.neighbours == 2


def test_client_refuses_a_server_announcing_other_parameters() -> None:
    spec = _round(5)
    server = MaskingAggregator(threshold=4).server(spec)
    client = MaskingAggregator(threshold=3).client(spec, 0, _inputs(spec)[0])
    with pytest.raises(ProtocolViolation, match=r"threshold=4 \(expected 3\)"):
        client.handle(server.open()[0])
    assert client.stage == "advertise"


# -- graph and primitives ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "d"), [(8, 3), (8, 4), (9, 4), (7, 6), (10, 2), (2, 1)])
def test_harary_graph_is_regular_symmetric_and_d_connected(n: int, d: int) -> None:
    g = CommunicationGraph.harary(range(n), d, bytes(range(32)))
    assert all(len(g.neighbours(u)) == d and u not in g.neighbours(u) for u in range(n))
    assert all(u in g.neighbours(v) for u in range(n) for v in g.neighbours(u))
    assert g.complete == (d == n - 1)
    for removed in itertools.combinations(range(n), d - 1):  # fewer than d removals never disconnect
        assert g.is_connected(set(range(n)) - set(removed))


def test_graph_depends_on_the_secret_seed() -> None:
    a = CommunicationGraph.harary(range(20), 4, bytes(32))
    b = CommunicationGraph.harary(range(20), 4, bytes([1]) * 32)
    assert a == CommunicationGraph.harary(range(20), 4, bytes(32))
    assert a.adjacency != b.adjacency


def test_streamed_masks_equal_the_foundations_expand_seed_across_chunks() -> None:
    n = (1 << 17) + 3  # crosses the 1 MiB chunk boundary
    seeds = [SecureRNG.for_testing(f"seed{i}").bytes(32) for i in range(3)]
    acc = np.zeros(n, dtype=np.uint64)
    apply_masks(acc, [Mask(seeds[0], 1, PAIR_MASK_NONCE), Mask(seeds[1], -1, PAIR_MASK_NONCE),
                      Mask(seeds[2], 1, SELF_MASK_NONCE)])
    expected = (expand_seed(seeds[0], n, 64, nonce=PAIR_MASK_NONCE) - expand_seed(seeds[1], n, 64, nonce=PAIR_MASK_NONCE)
                + expand_seed(seeds[2], n, 64, nonce=SELF_MASK_NONCE))
    np.testing.assert_array_equal(acc, expected)
    other = np.zeros(n, dtype=np.uint64)
    apply_masks(other, [Mask(seeds[0], 1, SELF_MASK_NONCE)])  # another nonce: an independent stream
    assert not np.array_equal(other, expand_seed(seeds[0], n, 64, nonce=PAIR_MASK_NONCE))


@pytest.mark.multiprocess
def test_masks_expanded_in_worker_processes_equal_the_single_process_result() -> None:
    n = 3 * (1 << 17) + 11  # three 1 MiB chunks and a ragged end: slices start mid-stream
    masks = [Mask(SecureRNG.for_testing(f"w{i}").bytes(32), (-1) ** i, PAIR_MASK_NONCE) for i in range(3)]
    base = SecureRNG.for_testing("w-base").uint64(n)
    one, two = base.copy(), base.copy()
    apply_masks(one, masks)
    apply_masks(two, masks, workers=2)
    np.testing.assert_array_equal(one, two)
    with pytest.raises(ValueError, match="workers must be an int >= 1, got 0"):
        apply_masks(one, masks, workers=0)


@pytest.mark.multiprocess
def test_server_with_unmask_workers_gives_the_exact_sum() -> None:
    spec = _round(4, length=2 * (1 << 17) + 5)
    inputs = _inputs(spec)
    agg = MaskingAggregator(unmask_workers=2)
    server, clients = _build(agg, spec, inputs)
    result = InProcessTransport().run(server, clients, drop_at={3: "mask"}).result
    np.testing.assert_array_equal(result.ring_sum, inputs[0] + inputs[1] + inputs[2])


def test_share_ciphertexts_are_bound_to_round_sender_and_recipient() -> None:
    rng = SecureRNG.for_testing("aead")
    key = rng.bytes(32)
    blob = seal(key, b"two shares", round_id=4, sender=1, recipient=2, rng=rng)
    assert open_sealed(key, blob, round_id=4, sender=1, recipient=2) == b"two shares"
    for where in ({"round_id": 5, "sender": 1, "recipient": 2}, {"round_id": 4, "sender": 2, "recipient": 1},
                  {"round_id": 4, "sender": 1, "recipient": 3}):
        with pytest.raises(ShareDecryptionError, match="failed authentication"):
            open_sealed(key, blob, **where)
    flipped = bytearray(blob)
    flipped[20] ^= 1
    with pytest.raises(ShareDecryptionError):
        open_sealed(key, bytes(flipped), round_id=4, sender=1, recipient=2)


# -- what the server sees --------------------------------------------------------------------------------------
def test_a_masked_input_is_uniform_in_the_ring_chi_square() -> None:
    """Client 0 holds the most non-uniform input there is (all zeros). Its masked vector, and even what the
    server can compute after unmasking (masked vector minus the revealed self-mask), pass a chi-square
    uniformity test on the top 6 bits at ALPHA; the raw input fails the same test (the test has power)."""
    spec = _round(4, length=BINS * 80)
    inputs = _inputs(spec)
    inputs[0] = np.zeros(spec.vector_length, dtype=np.uint64)
    seen, clients, result = _capture_masked(MaskingAggregator(), spec, inputs, "uniform")
    assert result.contributors == (0, 1, 2, 3)
    after_unmask = seen[0].copy()
    apply_masks(after_unmask, [Mask(_b_seed(clients[0]), -1, SELF_MASK_NONCE)])  # b_0 is revealed
    for view in (seen[0], after_unmask):
        assert stats.chisquare(_top_bits_histogram(view, 64)).pvalue > ALPHA
    assert stats.chisquare(_top_bits_histogram(inputs[0] + np.uint64(1 << 60), 64)).pvalue < ALPHA


def test_a_masked_input_is_uniform_over_a_whole_small_ring() -> None:
    spec = _round(3, length=256 * 40, ring_bits=8)
    inputs = {c: np.full(spec.vector_length, 7, dtype=np.uint64) for c in spec.participants}
    seen, _, _ = _capture_masked(MaskingAggregator(), spec, inputs, "small-ring")
    assert int(seen[1].max()) < 256
    assert stats.chisquare(np.bincount(seen[1].astype(np.int64), minlength=256)).pvalue > ALPHA


def test_two_different_inputs_give_views_a_test_cannot_tell_apart() -> None:
    """Client 0 holds all zeros in one world and all 2^63 + 12345 in the other. A chi-square test of
    homogeneity on the server's views (masked vector; and masked vector minus the revealed self-mask) does
    not reject at ALPHA, while the same test separates the raw inputs perfectly."""
    spec = _round(3, length=BINS * 60)
    worlds = []
    for label, value in (("world-a", 0), ("world-b", (1 << 63) + 12345)):
        inputs = _inputs(spec, label)
        inputs[0] = np.full(spec.vector_length, value, dtype=np.uint64)
        seen, clients, _ = _capture_masked(MaskingAggregator(), spec, inputs, label)
        unmasked = seen[0].copy()
        apply_masks(unmasked, [Mask(_b_seed(clients[0]), -1, SELF_MASK_NONCE)])
        worlds.append((inputs[0], seen[0], unmasked))
    for view in (1, 2):
        table = np.array([_top_bits_histogram(w[view], 64) for w in worlds])
        assert stats.chi2_contingency(table).pvalue > ALPHA
    raw = np.array([_top_bits_histogram(w[0], 64) + 1 for w in worlds])
    assert stats.chi2_contingency(raw).pvalue < ALPHA


# -- dropouts ----------------------------------------------------------------------------------------------------
def test_holders_reveal_exactly_one_kind_of_share_per_owner() -> None:
    """Client 2 drops after sharing (it may only be late): holders reveal shares of its masking key, never of
    its self-mask seed; for survivors they reveal self-mask shares only. The sum is exact."""
    spec = _round(5)
    inputs = _inputs(spec)
    revealed: dict[int, tuple[set[int], set[int]]] = {}

    def tap(stage: str, cid: int, reply: bytes) -> bytes:
        if stage == "unmask":
            arrays = wire.decode(reply).arrays
            revealed[cid] = ({int(o) for o in arrays["b_owners"]}, {int(o) for o in arrays["s_owners"]})
        return reply

    server, clients = _build(MaskingAggregator(), spec, inputs)
    outcome = InProcessTransport().run(server, clients, drop_at={2: "mask"}, tamper=tap)
    assert outcome.result.contributors == (0, 1, 3, 4)
    np.testing.assert_array_equal(outcome.result.ring_sum, sum(inputs[c] for c in (0, 1, 3, 4)))
    for b_owners, s_owners in revealed.values():
        assert not b_owners & s_owners
        assert s_owners == {2} and 2 not in b_owners


@pytest.mark.parametrize(("neighbours", "threshold"), [(2, None), (4, 3), (4, None)])
def test_sparse_rounds_under_light_dropouts_are_exact_exactly_when_survives_says(
    neighbours: int, threshold: int | None
) -> None:
    """The contract's dropout patterns are heavy (most sparse rounds abort); here each client drops with
    probability 0.25 at a random stage, so both outcomes occur often, and each must match `survives`."""
    agg = MaskingAggregator(neighbours=neighbours, threshold=threshold, rng=SecureRNG.for_testing("light"))
    gen = SecureRNG.for_testing(f"light-dropouts/{neighbours}/{threshold}").numpy_generator()
    outcomes = {True: 0, False: 0}
    for trial in range(30):
        n = int(gen.integers(7, 13))
        spec = RoundSpec(trial, tuple(range(100, 100 + n)), 11, 64)
        silent_from = [int(gen.integers(0, 4)) if gen.random() < 0.25 else 4 for _ in range(n)]
        drop_at = {c: agg.stages[i] for c, i in zip(spec.participants, silent_from) if i < 4}
        alive = [{c for c, i in zip(spec.participants, silent_from) if i > s} for s in range(4)]
        inputs = _inputs(spec, f"light/{trial}")
        server, clients = _build(agg, spec, inputs, f"light/{trial}")
        predicted = agg.survives(spec, alive)
        outcomes[predicted] += 1
        if predicted:
            result = InProcessTransport().run(server, clients, drop_at=drop_at).result
            assert result.contributors == tuple(sorted(alive[2]))
            np.testing.assert_array_equal(result.ring_sum, sum(inputs[c] for c in alive[2]))
        else:
            with pytest.raises(ProtocolAbort):
                InProcessTransport().run(server, clients, drop_at=drop_at)
    assert outcomes[True] >= 5 and outcomes[False] >= 3, outcomes


def test_sparse_round_aborts_before_unmasking_when_survivors_are_disconnected() -> None:
    """On a ring (d = 2), two non-adjacent dropouts at the input stage split the survivors; unmasking would
    give the server the separate sums of the pieces, so the round aborts before any share is revealed."""
    spec = _round(8)
    agg = MaskingAggregator(neighbours=2, rng=SecureRNG.for_testing("split"))
    graph = agg.graph(spec)
    u = 0
    a, b = sorted(graph.neighbours(u))  # dropping u's two neighbours isolates u
    everyone = set(spec.participants)
    alive = [everyone, everyone, everyone - {a, b}, everyone - {a, b}]
    assert not agg.survives(spec, alive)
    server, clients, outbox = _run_to(agg, spec, _inputs(spec), "mask")
    with pytest.raises(ProtocolAbort, match="not connected"):
        _step(server, clients, outbox, {a, b})
    assert all(c.stage == "unmask" for cid, c in clients.items() if cid not in (a, b))  # nobody asked to reveal


def test_client_refuses_to_unmask_a_disconnected_or_too_small_survivor_set() -> None:
    spec = _round(8)
    agg = MaskingAggregator(neighbours=2, rng=SecureRNG.for_testing("client-check"))
    graph = agg.graph(spec)
    server, clients, outbox = _run_to(agg, spec, _inputs(spec), "unmask")
    a, b = sorted(graph.neighbours(0))
    far = next(c for c in spec.participants if c not in (0, a, b))
    cut = np.array(sorted(set(spec.participants) - {far, a}), dtype=np.int64)  # `far` splits the ring from 0's side
    victim = b
    if graph.is_connected(set(cut.tolist())):  # pick a cut that disconnects for this permutation
        cut = np.array(sorted(set(spec.participants) - {a, *(graph.neighbours(a) - {0})}), dtype=np.int64)
        victim = 0
    assert not graph.is_connected(set(cut.tolist()))
    with pytest.raises(ProtocolViolation, match="not connected"):
        clients[victim].handle(_rewrite(outbox[victim], survivors=cut))
    with pytest.raises(ProtocolViolation, match="only 1 survivors; t=2"):
        clients[victim].handle(_rewrite(outbox[victim], survivors=np.array([victim], dtype=np.int64)))
    assert clients[victim].stage == "unmask"  # refused messages change nothing: the real one still works
    step = _step(server, clients, outbox)
    assert isinstance(step, AggregateResult) and step.contributors == spec.participants


def test_weighted_fedavg_through_masking_equals_plaintext_exactly_with_dropouts() -> None:
    fx = FixedPointSpec(clip=1.0, value_bits=20, ring_bits=64, max_weight=1000)
    rng = SecureRNG.for_testing("fedavg")
    updates = [ClientUpdate(i, 2, rng.normal(40, std=0.3).astype(np.float32), 10 * (i + 1)) for i in range(6)]
    drops = {1: "mask", 4: "unmask"}
    secure = aggregate_updates(updates, MaskingAggregator(neighbours=4), fx, round_id=2,
                               rng=SecureRNG.for_testing("q"), drop_at=drops)
    plain = aggregate_updates(updates, PlaintextAggregator(), fx, round_id=2, rng=SecureRNG.for_testing("q"),
                              drop_at={1: "input"})
    assert secure.contributors == plain.contributors == (0, 2, 3, 4, 5)
    assert secure.total_weight == plain.total_weight == 10 * (1 + 3 + 4 + 5 + 6)
    np.testing.assert_array_equal(secure.mean, plain.mean)


def test_masked_upload_is_within_ten_percent_of_the_plaintext_upload() -> None:
    spec = _round(5, length=20_000)
    inputs = _inputs(spec)
    server, clients = _build(MaskingAggregator(), spec, inputs)
    masked = InProcessTransport().run(server, clients).traffic
    agg = PlaintextAggregator()
    plain = InProcessTransport().run(agg.server(spec), {c: agg.client(spec, c, inputs[c]) for c in inputs}).traffic
    for c in spec.participants:
        assert masked.bytes_up(client=c, stage="mask") <= 1.1 * plain.bytes_up(client=c, stage="input")
        assert masked.bytes_up(client=c) - masked.bytes_up(client=c, stage="mask") < 2_000  # keys + shares


# -- tampering ----------------------------------------------------------------------------------------------------
def test_a_tampered_encrypted_share_is_refused_by_its_recipient() -> None:
    spec = _round(4)
    server, clients, outbox = _run_to(MaskingAggregator(), spec, _inputs(spec), "mask")
    msg = wire.decode(outbox[1])
    cts = msg.arrays["ciphertexts"].copy()
    cts[0, 30] ^= 0x01
    with pytest.raises(ShareDecryptionError, match="failed authentication"):
        clients[1].handle(_rewrite(outbox[1], ciphertexts=cts))
    # the ciphertext client 0 addressed to client 2, slipped to client 1 as if 0 had sent it to 1
    to_two = wire.decode(outbox[2]).arrays
    rerouted = msg.arrays["ciphertexts"].copy()
    rerouted[list(msg.arrays["senders"]).index(0)] = to_two["ciphertexts"][list(to_two["senders"]).index(0)]
    with pytest.raises(ShareDecryptionError, match="from client 0 to client 1"):
        clients[1].handle(_rewrite(outbox[1], ciphertexts=rerouted))
    assert clients[1].stage == "mask"
    assert isinstance(_step(server, clients, outbox), dict)


@pytest.mark.parametrize("kind", ["b", "s"])
def test_a_tampered_revealed_share_fails_its_commitment_and_aborts(kind: str) -> None:
    """With exactly t shares Shamir alone cannot notice a wrong one; the server checks a reconstructed self-mask
    seed against the owner's commitment and a reconstructed masking key against its public key."""
    spec = _round(3)  # t = 2: the server uses the shares of the two lowest holders
    owner = 1 if kind == "b" else 2

    def tamper(stage: str, cid: int, reply: bytes) -> bytes:
        if stage != "unmask" or cid != 0:
            return reply
        arrays = wire.decode(reply).arrays
        owners = [int(o) for o in arrays[f"{kind}_owners"]]
        shares = arrays[f"{kind}_shares"].copy()
        row = owners.index(owner)
        value = shamir.decode_value(shares[row].tobytes())
        shares[row] = np.frombuffer(shamir.encode_value((value + 1) % shamir.PRIME), dtype=np.uint8)
        return _rewrite(reply, **{f"{kind}_shares": shares})

    server, clients = _build(MaskingAggregator(), spec, _inputs(spec))
    drop = {2: "mask"} if kind == "s" else {}
    with pytest.raises(ShareCommitmentError, match=f"client {owner}"):
        InProcessTransport().run(server, clients, drop_at=drop, tamper=tamper)
    with pytest.raises(ProtocolAbort):
        server.close_stage()


def test_server_refuses_reveals_for_the_wrong_owners() -> None:
    spec = _round(4)
    server, clients, outbox = _run_to(MaskingAggregator(), spec, _inputs(spec), "unmask")
    reply = clients[0].handle(outbox[0])
    arrays = wire.decode(reply).arrays
    both = _rewrite(reply, s_owners=arrays["b_owners"][:1], s_shares=arrays["b_shares"][:1])
    with pytest.raises(MessageError, match="revealed s-shares of"):
        server.accept(0, both)
    assert server.received == frozenset()
    server.accept(0, reply)
