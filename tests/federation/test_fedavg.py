"""FedAvg through the runtime: weighted means, dropouts, traffic accounting and typed refusals."""

from __future__ import annotations

import numpy as np
import pytest

from fedguard.encoding import FixedPointSpec
from fedguard.errors import ConfigError, InvalidUpdateError, ProtocolAbort, RingOverflowError
from fedguard.federation import InProcessTransport, PlaintextAggregator, RoundSpec, aggregate_updates
from fedguard.rng import SecureRNG
from fedguard.updates import ClientUpdate
from fedguard.wire import decode

SPEC = FixedPointSpec(clip=1.0, value_bits=24, ring_bits=64, max_weight=1000)


def _updates(n: int, d: int = 50, round_id: int = 1) -> list[ClientUpdate]:
    rng = SecureRNG.for_testing("fedavg-updates")
    return [ClientUpdate(i, round_id, rng.normal(d, std=0.1).astype(np.float32), 10 * (i + 1)) for i in range(n)]


def test_weighted_mean_over_survivors_matches_float_fedavg() -> None:
    updates = _updates(5)
    out = aggregate_updates(updates, PlaintextAggregator(), SPEC, round_id=1,
                            rng=SecureRNG.for_testing(0), drop_at={1: "input", 3: "input"})
    alive = [u for u in updates if u.client_id not in (1, 3)]
    expected = sum(u.weight * u.vector.astype(np.float64) for u in alive) / sum(u.weight for u in alive)
    assert out.contributors == (0, 2, 4)
    assert out.dropped == {"input": (1, 3)}
    assert out.total_weight == sum(u.weight for u in alive)
    assert np.abs(out.mean - expected).max() <= SPEC.error_bound() + 1e-7


def test_zero_quantisation_error_when_values_sit_on_the_grid() -> None:
    grid = np.arange(-5, 6, dtype=np.float64) / SPEC.scale
    updates = [ClientUpdate(i, 0, grid.astype(np.float32), 1) for i in range(3)]
    out = aggregate_updates(updates, PlaintextAggregator(), SPEC, round_id=0, rounding="nearest")
    np.testing.assert_allclose(out.mean, grid.astype(np.float32), rtol=0, atol=1e-12)


def test_traffic_counts_the_real_serialised_messages() -> None:
    updates = _updates(3, d=1000)
    out = aggregate_updates(updates, PlaintextAggregator(), SPEC, round_id=1)
    per_client_up = out.traffic.bytes_up(client=0)
    # the ring vector (d + 1 weight slot) of uint64 plus a fixed header and a 16-byte digest
    assert 8 * 1001 < per_client_up < 8 * 1001 + 400
    assert out.traffic.per_stage() == {"input": {"up": out.traffic.bytes_up(), "down": out.traffic.bytes_down()}}


def test_all_clients_dropping_aborts() -> None:
    updates = _updates(3)
    with pytest.raises(ProtocolAbort, match="0 of 3 clients replied"):
        aggregate_updates(updates, PlaintextAggregator(), SPEC, round_id=1,
                          drop_at={0: "input", 1: "input", 2: "input"})


def test_refusals_happen_before_anything_is_encoded() -> None:
    updates = _updates(3)
    with pytest.raises(InvalidUpdateError, match="for round 1, expected 2"):
        aggregate_updates(updates, PlaintextAggregator(), SPEC, round_id=2)
    with pytest.raises(ConfigError, match="distinct"):
        aggregate_updates(updates + updates[:1], PlaintextAggregator(), SPEC, round_id=1)
    heavy = ClientUpdate(9, 1, updates[0].vector, 5000)
    with pytest.raises(InvalidUpdateError, match="weight 5000 exceeds max_weight=1000"):
        aggregate_updates(updates + [heavy], PlaintextAggregator(), SPEC, round_id=1)
    tight = FixedPointSpec(value_bits=24, ring_bits=30, max_weight=1)  # 64 clients fit
    with pytest.raises(RingOverflowError, match=r"300 clients .* \(at most 64 clients fit\)"):
        aggregate_updates([ClientUpdate(i, 1, updates[0].vector, 1) for i in range(300)],
                          PlaintextAggregator(), tight, round_id=1)


def test_client_update_refuses_nan_and_bad_fields() -> None:
    v = np.zeros(4, np.float32)
    v[2] = np.nan
    with pytest.raises(InvalidUpdateError, match="1 non-finite value.*index 2"):
        ClientUpdate(0, 0, v, 1)
    with pytest.raises(InvalidUpdateError, match="1-D float32"):
        ClientUpdate(0, 0, np.zeros(4), 1)
    with pytest.raises(ConfigError) as info:
        ClientUpdate(-1, -1, np.zeros(4, np.float32), 0)
    assert len(info.value.problems) == 3


def test_transport_refuses_a_bad_drop_schedule() -> None:
    spec = RoundSpec(0, (0, 1), 3, 64)
    agg = PlaintextAggregator()
    clients = {c: agg.client(spec, c, np.zeros(3, np.uint64)) for c in (0, 1)}
    with pytest.raises(ConfigError, match="must be one of \\['input'\\], got 'unmask'"):
        InProcessTransport().run(agg.server(spec), clients, drop_at={0: "unmask"})
    with pytest.raises(ConfigError, match="no client side for participant"):
        InProcessTransport().run(agg.server(spec), {0: clients[0]})


def test_a_tampered_reply_is_rejected_and_counted_as_dropped() -> None:
    spec = RoundSpec(0, (0, 1, 2), 3, 64)
    agg = PlaintextAggregator()
    inputs = {c: np.full(3, c + 1, np.uint64) for c in spec.participants}
    clients = {c: agg.client(spec, c, inputs[c]) for c in spec.participants}

    def corrupt(stage: str, cid: int, reply: bytes) -> bytes:
        return reply[:-1] + bytes([reply[-1] ^ 1]) if cid == 1 else reply

    out = InProcessTransport().run(agg.server(spec), clients, tamper=corrupt)
    assert [(cid, stage) for cid, stage, _ in out.rejected] == [(1, "input")]
    assert out.result.contributors == (0, 2)
    assert out.result.ring_sum.tolist() == [4, 4, 4]
    assert decode(agg.client(spec, 0, inputs[0]).handle(agg.server(spec).open()[0])).arrays["x"].tolist() == [1, 1, 1]


def test_round_spec_collects_problems() -> None:
    with pytest.raises(ConfigError) as info:
        RoundSpec(-1, (1, 1), 0, 65)
    assert len(info.value.problems) == 4


def test_client_input_is_validated_at_construction() -> None:
    spec = RoundSpec(0, (0,), 3, 16)
    with pytest.raises(InvalidUpdateError, match="outside Z_2\\^16"):
        PlaintextAggregator().client(spec, 0, np.array([1, 2, 1 << 20], np.uint64))
    with pytest.raises(InvalidUpdateError, match="uint64"):
        PlaintextAggregator().client(spec, 0, np.array([1, 2, 3], np.int64))
    with pytest.raises(ConfigError, match="not a participant"):
        PlaintextAggregator().client(spec, 5, np.zeros(3, np.uint64))


def test_a_client_refusing_the_servers_message_counts_as_dropped() -> None:
    spec = RoundSpec(0, (0, 1, 2), 2, 64)
    agg = PlaintextAggregator()
    clients = {c: agg.client(spec, c, np.full(2, c + 1, np.uint64)) for c in spec.participants}
    server = agg.server(spec)
    clients[1].handle(agg.server(spec).open()[1])  # client 1 has already answered: it is finished
    out = InProcessTransport().run(server, clients)
    assert [(cid, stage, type(err).__name__) for cid, stage, err in out.rejected] == [(1, "input", "ProtocolViolation")]
    assert out.result.contributors == (0, 2) and out.result.ring_sum.tolist() == [4, 4]


def test_the_protocol_randomness_is_separate_from_the_quantisation_stream() -> None:
    """A seeded quantisation stream with fresh protocol randomness (keys, masks) gives the same mean."""
    from fedguard.secagg.masking import MaskingAggregator

    updates = _updates(3)
    means = [
        aggregate_updates(updates, MaskingAggregator(), SPEC, round_id=1, rng=SecureRNG.for_testing("quantise"),
                          protocol_rng=SecureRNG()).mean
        for _ in range(2)
    ]
    np.testing.assert_array_equal(means[0], means[1])


def test_a_ring_encoder_replaces_the_encoding_and_is_checked() -> None:
    updates = _updates(3, d=8)
    offset = 5  # each client adds 5 integer units to every coordinate: the mean moves by 5/s
    spec = FixedPointSpec(clip=1.0, value_bits=24, ring_bits=64, max_weight=1)

    def shifted(u: ClientUpdate, rng: SecureRNG) -> np.ndarray:
        from fedguard.encoding import encode_weighted

        ring = encode_weighted(u.vector, 1, spec, rng=rng, rounding="nearest")
        ring[:-1] += np.uint64(offset)
        return ring

    ones = [ClientUpdate(u.client_id, u.round, u.vector, 1) for u in updates]
    plain = aggregate_updates(ones, PlaintextAggregator(), spec, round_id=1, rounding="nearest")
    moved = aggregate_updates(ones, PlaintextAggregator(), spec, round_id=1, encoder=shifted)
    np.testing.assert_allclose(moved.mean - plain.mean, offset / spec.scale, rtol=1e-6)

    with pytest.raises(InvalidUpdateError, match=r"ring encoder must return uint64 of shape \(9,\)"):
        aggregate_updates(ones, PlaintextAggregator(), spec, round_id=1,
                          encoder=lambda u, rng: np.zeros(8, dtype=np.uint64))
    with pytest.raises(InvalidUpdateError, match="ring encoder must return uint64"):
        aggregate_updates(ones, PlaintextAggregator(), spec, round_id=1,
                          encoder=lambda u, rng: np.zeros(9, dtype=np.int64))
