"""The ring sized to need, quantised uploads and the Hadamard rotation (fedguard/quantise.py, fedguard/rotation.py):
exact bytes from real messages, exact aggregates for every aggregator, unbiased stochastic rounding, the
L2 error bound central DP accounts, and the error the rotation saves on a spiky update."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg

from fedguard import wire
from fedguard.encoding import (
    choose_ring_bits,
    decode_weighted_mean,
    encode_weighted,
    required_ring_bits,
    ring_sum,
    ring_wire_dtype,
    to_wire,
)
from fedguard.errors import ConfigError, InvalidUpdateError, MessageError, RingOverflowError
from fedguard.federation import InProcessTransport, aggregate_updates, make_aggregator
from fedguard.federation.protocol import RoundSpec, check_ring_vector
from fedguard.quantise import UploadPlan, padded_length, plan_upload, upload_value_bits
from fedguard.rng import SecureRNG
from fedguard.rotation import BlockHadamard, choose_block, fwht
from fedguard.updates import ClientUpdate

TEST_OPTIONS = {"paillier": {"key_bits": 512, "allow_insecure_test_keys": True}, "mpc": {"backend": "simulated"}}
AGGREGATORS = ("plaintext", "masking", "paillier", "mpc")


def _updates(n: int, d: int, *, scale: float = 0.3, weights: bool = True, seed: str = "u") -> list[ClientUpdate]:
    rng = SecureRNG.for_testing(f"quantise-test/{seed}")
    return [ClientUpdate(c, 1, (rng.normal(d) * scale).astype(np.float32), (7 * c + 3) if weights else 1)
            for c in range(n)]


# -- ring sized to need ------------------------------------------------------------------------------------
def test_auto_ring_is_the_smallest_choice_that_holds_the_worst_case_sum() -> None:
    # 3 clients x 300 examples: 16-bit values need 26 bits -> 32; 24-bit values need 34 -> 64
    assert required_ring_bits(16, 900) == 26 and choose_ring_bits(16, 900) == 32
    assert required_ring_bits(24, 900) == 34 and choose_ring_bits(24, 900) == 64
    # the boundary: n·W·M = 2^31 - 1 exactly fits 32 bits, one more weight unit does not
    m = (1 << 15) - 1
    fits = ((1 << 31) - 1) // m
    assert choose_ring_bits(16, fits) == 32 and choose_ring_bits(16, fits + 1) == 64
    with pytest.raises(RingOverflowError, match="needs a ring of 66 bits"):
        choose_ring_bits(53, 1 << 13)


def test_a_fixed_ring_that_would_overflow_is_refused_naming_the_bits_needed() -> None:
    with pytest.raises(RingOverflowError, match=r"ring_bits=32 would overflow: 3 clients x max_weight 300 .* 34-bit"):
        plan_upload(clip=1.0, value_bits=24, n_clients=3, max_weight=300, dimension=10, ring_bits=32)
    assert plan_upload(clip=1.0, value_bits=24, n_clients=3, max_weight=300, dimension=10, ring_bits=64).spec.ring_bits == 64
    with pytest.raises(ConfigError, match="upload_bits=8 fixes the ring"):
        plan_upload(clip=1.0, value_bits=24, n_clients=3, max_weight=1, dimension=10, upload_bits=8, ring_bits=64)
    with pytest.raises(ConfigError, match="upload_bits must be one of"):
        plan_upload(clip=1.0, value_bits=24, n_clients=3, max_weight=1, dimension=10, upload_bits=12)
    with pytest.raises(RingOverflowError, match="do not fit a 8-bit upload"):
        upload_value_bits(8, 200)


def test_upload_value_bits_are_the_most_that_fit_n_clients() -> None:
    for k in (8, 16, 32):
        for n in (1, 2, 3, 10, 50):
            b = upload_value_bits(k, n)
            assert n * ((1 << (b - 1)) - 1) <= (1 << (k - 1)) - 1 < n * ((1 << b) - 1)


def test_wire_type_is_the_smallest_word_of_the_ring() -> None:
    assert [ring_wire_dtype(k).str for k in (8, 9, 16, 17, 32, 33, 64)] == ["|u1", "<u2", "<u2", "<u4", "<u4", "<u8", "<u8"]
    with pytest.raises(InvalidUpdateError, match="outside Z_2\\^8"):
        to_wire(np.array([256], dtype=np.uint64), 8)
    spec = RoundSpec(1, (0, 1), 3, 32)
    assert check_ring_vector(np.array([1, 2, 3], dtype="<u4"), spec, "x").dtype == np.uint64
    with pytest.raises(MessageError, match="uint32 for the round's 32-bit ring"):
        check_ring_vector(np.array([1, 2, 3], dtype="<u2"), spec, "x")


def _captured_inputs(name: str, plan: UploadPlan, updates: list[ClientUpdate]) -> tuple[dict[int, bytes], object]:
    """Run one real round; return each client's input-stage payload and the outcome."""
    seen: dict[int, bytes] = {}
    with make_aggregator(name, TEST_OPTIONS.get(name, {})) as agg:

        def tamper(stage: str, client: int, payload: bytes) -> bytes:
            if stage == agg.input_stage:
                seen[client] = payload
            return payload

        class Capture(InProcessTransport):
            def run(self, server, clients, **kw):  # type: ignore[no-untyped-def]
                return super().run(server, clients, tamper=tamper, **kw)

        outcome = aggregate_updates([plan.forward(u) for u in updates], agg, plan.spec, round_id=1,
                                    rng=SecureRNG.for_testing("q"), transport=Capture())
    return seen, outcome


@pytest.mark.parametrize("name", ["plaintext", "masking"])
@pytest.mark.parametrize(("fields", "width"), [({"value_bits": 24}, 8), ({"value_bits": 16}, 4),
                                               ({"upload_bits": 16}, 2), ({"upload_bits": 8}, 1)])
def test_the_upload_carries_exactly_ring_width_bytes_per_value(name: str, fields: dict, width: int) -> None:
    d, n = 1000, 3
    plan = plan_upload(clip=1.0, n_clients=n, max_weight=300, dimension=d, **{"value_bits": 24, **fields})
    seen, _ = _captured_inputs(name, plan, _updates(n, d))
    for payload in seen.values():
        msg = wire.decode(payload)
        assert msg.arrays["x"].dtype == ring_wire_dtype(plan.spec.ring_bits) and msg.arrays["x"].itemsize == width
        # the exact size: the same message with the values as uint64 is (8 - width)·(d + 1) bytes longer
        as64 = wire.Message(kind=msg.kind, round=msg.round, stage=msg.stage, sender=msg.sender, recipient=msg.recipient,
                            meta=msg.meta, arrays={"x": msg.arrays["x"].astype("<u8")})
        header_delta = len(ring_wire_dtype(64).str) - len(msg.arrays["x"].dtype.str)
        assert wire.encoded_size(as64) - len(payload) == (8 - width) * (d + 1) + header_delta


@pytest.mark.parametrize(("fields", "width"), [({"value_bits": 24}, 8), ({"value_bits": 16}, 4),
                                               ({"upload_bits": 16}, 2), ({"upload_bits": 8}, 1)])
def test_an_mpc_upload_carries_one_ring_word_per_value_like_plaintext(fields: dict, width: int) -> None:
    n = 3
    sizes = {}
    for d in (1000, 2000):
        plan = plan_upload(clip=1.0, n_clients=n, max_weight=300, dimension=d, **{"value_bits": 24, **fields})
        mpc, _ = _captured_inputs("mpc", plan, _updates(n, d))
        plain, _ = _captured_inputs("plaintext", plan, _updates(n, d))
        for payload in mpc.values():
            msg = wire.decode(payload)
            # party 0's sealed share: nonce + one ring word per value (d + the weight slot) + GCM tag
            assert msg.arrays["ct0"].size == 12 + width * (d + 1) + 16
            assert all(msg.arrays[f"ct{k}"].size == 12 + 32 + 16 for k in (1, 2))  # one seed each
        sizes[d] = (len(mpc[0]), len(plain[0]))
    # 1,000 more values cost MPC what they cost plaintext: width bytes each (± a digit of a length in the header)
    mpc_bytes, plain_bytes = sizes[2000][0] - sizes[1000][0], sizes[2000][1] - sizes[1000][1]
    assert abs(mpc_bytes - 1000 * width) <= 2 and abs(plain_bytes - 1000 * width) <= 2


@pytest.mark.parametrize("name", AGGREGATORS)
@pytest.mark.parametrize("fields", [{"value_bits": 16}, {"upload_bits": 16}, {"upload_bits": 8},
                                    {"upload_bits": 8, "rotation": True}, {"value_bits": 24}])
def test_every_aggregator_sums_exactly_what_plaintext_sums_in_the_sized_ring(name: str, fields: dict) -> None:
    d, n = 300, 3
    plan = plan_upload(clip=1.0, n_clients=n, max_weight=300, dimension=d, seed="exact",
                       **{"value_bits": 24, **fields})
    updates = _updates(n, d, scale=0.4)  # some values beyond the clip: the extremes ±M are summed too
    _, outcome = _captured_inputs(name, plan, updates)
    # the integer sum by hand from the same quantisation draws
    rng = SecureRNG.for_testing("q")
    ring = [encode_weighted(plan.forward(u).vector, plan.forward(u).weight, plan.spec, rng=rng.spawn(f"quantise/{c}"))
            for c, u in enumerate(updates)]
    expected, total = decode_weighted_mean(ring_sum(ring, plan.spec.ring_bits), plan.spec)
    assert np.array_equal(outcome.mean, expected) and outcome.total_weight == total  # type: ignore[attr-defined]
    # and it is the mean the encoding promises: within the quantisation bound of the clipped mean
    weights = np.array([plan.forward(u).weight for u in updates], dtype=np.float64)
    clipped = [np.clip(plan.forward(u).vector.astype(np.float64), -plan.spec.clip, plan.spec.clip) for u in updates]
    exact = sum(w * x for w, x in zip(weights, clipped, strict=True)) / weights.sum()
    assert np.max(np.abs(expected - exact)) <= plan.spec.error_bound("stochastic") + 1e-6


def test_masking_wraps_nothing_at_the_capacity_edge_of_an_8_bit_ring() -> None:
    """Every client at +M (and at -M) in every coordinate: the 8-bit ring holds n·M exactly."""
    n, d = 3, 64
    plan = plan_upload(clip=1.0, value_bits=24, n_clients=n, max_weight=1, dimension=d, upload_bits=8)
    for sign in (1.0, -1.0):
        updates = [ClientUpdate(c, 1, np.full(d, 5.0 * sign, dtype=np.float32), 1) for c in range(n)]
        _, outcome = _captured_inputs("masking", plan, updates)
        assert np.allclose(outcome.mean, sign * plan.spec.clip)  # type: ignore[attr-defined]


# -- stochastic rounding: unbiased --------------------------------------------------------------------------
@pytest.mark.parametrize("rotation", [False, True])
def test_quantised_upload_is_unbiased(rotation: bool) -> None:
    """E[decoded] = x: over N independent draws the mean error per coordinate is within 5 standard errors
    (a stochastic-rounding step has variance <= 1/(4 s²)); a biased rounding (nearest) is caught."""
    d, n_draws = 48, 3000
    rng = SecureRNG.for_testing("unbiased")
    x = (rng.normal(d) * 0.01).astype(np.float32)
    plan = plan_upload(clip=0.05, value_bits=24, n_clients=1, max_weight=1, dimension=d, upload_bits=8,
                       rotation=rotation, seed="unbiased")
    s = plan.spec.scale
    draws = np.empty((n_draws, d))
    nearest = np.empty(d)
    for i in range(n_draws):
        sent = plan.forward(ClientUpdate(0, 1, x, 1))
        ring = encode_weighted(sent.vector, 1, plan.spec, rng=rng.spawn(f"draw/{i}"))
        mean, _ = decode_weighted_mean(ring, plan.spec)
        draws[i] = plan.inverse(mean, 1)
        if i == 0:
            ring = encode_weighted(sent.vector, 1, plan.spec, rounding="nearest")
            nearest = plan.inverse(decode_weighted_mean(ring, plan.spec)[0], 1)
    bias = draws.mean(axis=0) - x
    stderr = (1 / (2 * s)) / math.sqrt(n_draws)  # per coordinate (rotation keeps the total variance)
    z = np.abs(bias) / stderr
    assert z.max() < 5.0, z.max()
    # the test has power: nearest rounding's deterministic error is far outside that band
    assert (np.abs(nearest - x) / stderr).max() > 5.0


@pytest.mark.parametrize("rotation", [False, True])
def test_decoded_error_stays_within_the_bound_central_dp_accounts(rotation: bool) -> None:
    """‖decoded − x‖₂ <= √d'/s for x inside the range: what DP's C + √d'/s counts (d' = dp_dimension)."""
    d = 1000
    rng = SecureRNG.for_testing("dp-bound")
    plan = plan_upload(clip=0.1, value_bits=24, n_clients=3, max_weight=1, dimension=d, upload_bits=8,
                       rotation=rotation, seed="dp")
    bound = math.sqrt(plan.dp_dimension) / plan.spec.scale
    for i in range(20):
        x = (rng.normal(d) * 0.02).astype(np.float32)
        sent = plan.forward(ClientUpdate(0, 1, x, 1))
        assert np.abs(sent.vector).max() <= plan.spec.clip  # inside the range: no clipping in this check
        mean, _ = decode_weighted_mean(encode_weighted(sent.vector, 1, plan.spec, rng=rng.spawn(str(i))), plan.spec)
        assert np.linalg.norm(plan.inverse(mean, 1).astype(np.float64) - x) <= bound
    assert plan.dp_dimension == (padded_length(d + 1) if rotation else d)


# -- the rotation -------------------------------------------------------------------------------------------
def test_block_hadamard_is_the_orthonormal_h_d_over_root_b() -> None:
    rot = BlockHadamard(16, seed="m", block=16)
    basis = np.eye(16)
    matrix = np.stack([rot.forward(basis[i]) for i in range(16)], axis=1)
    signs = np.diag(rot._signs[0])
    assert np.allclose(matrix, scipy.linalg.hadamard(16) @ signs / 4.0)
    assert np.allclose(matrix.T @ matrix, np.eye(16))
    a = np.arange(8, dtype=np.float64)
    assert np.allclose(fwht(fwht(a.copy())), 8 * a)
    with pytest.raises(ConfigError, match="power-of-two"):
        fwht(np.zeros(6))


def test_rotation_signs_come_from_the_public_round_label() -> None:
    d = 5000
    x = SecureRNG.for_testing("sig").normal(d).astype(np.float32)
    plan = plan_upload(clip=1.0, value_bits=24, n_clients=3, max_weight=1, dimension=d, upload_bits=16, rotation=True,
                       seed="run-7")
    again = plan_upload(clip=1.0, value_bits=24, n_clients=3, max_weight=1, dimension=d, upload_bits=16, rotation=True,
                        seed="run-7")
    y1 = plan.forward(ClientUpdate(0, 1, x, 1)).vector
    assert np.array_equal(y1, again.forward(ClientUpdate(2, 1, x, 5)).vector)  # every party: the same R_r
    assert not np.allclose(y1, plan.forward(ClientUpdate(0, 2, x, 1)).vector)  # a new rotation each round
    assert y1.size == plan.travelling_length == padded_length(d) and padded_length(d) - d <= d / 64
    assert np.allclose(plan.inverse(y1.astype(np.float32), 1), x, atol=1e-5)
    assert choose_block(460_800) == 8192 and padded_length(460_800) == 466_944
    with pytest.raises(InvalidUpdateError, match="no rotation of this round"):
        plan.inverse(np.zeros(3, np.float32), 1)


def test_rotation_cuts_the_error_of_a_spiky_update_at_8_bits() -> None:
    """A few large coordinates force a wide range without rotation; rotated, each coordinate is ~‖x‖/√B and a
    range fitted to the rotated vector quantises far finer (each with the range fitted to what it encodes)."""
    d, n = 4096, 3
    rng = SecureRNG.for_testing("spiky")
    updates = []
    for c in range(n):
        x = rng.normal(d) * 1e-3
        x[rng.integers_below(8, d)] = 0.5  # a few spikes, as in a LoRA update with outlier coordinates
        updates.append(ClientUpdate(c, 1, x.astype(np.float32), 1))
    exact = np.mean([u.vector.astype(np.float64) for u in updates], axis=0)

    def nmse(rotation: bool) -> float:
        probe = plan_upload(clip=1.0, value_bits=24, n_clients=n, max_weight=1, dimension=d, upload_bits=8,
                            rotation=rotation, seed="spiky")
        clip = float(max(np.abs(probe.forward(u).vector).max() for u in updates))
        plan = plan_upload(clip=clip, value_bits=24, n_clients=n, max_weight=1, dimension=d, upload_bits=8,
                           rotation=rotation, seed="spiky")
        ring = [encode_weighted(plan.forward(u).vector, 1, plan.spec, rng=rng.spawn(f"{rotation}/{u.client_id}"))
                for u in updates]
        got = plan.inverse(decode_weighted_mean(ring_sum(ring, 8), plan.spec)[0], 1)
        return float(np.sum((got - exact) ** 2) / np.sum(exact ** 2))

    plain, rotated = nmse(False), nmse(True)
    assert rotated < plain / 5, (plain, rotated)


def test_bad_plans_are_refused() -> None:
    with pytest.raises(ConfigError, match="block must be a power of two"):
        BlockHadamard(10, seed="x", block=6)
    with pytest.raises(ConfigError, match="seed must be a non-empty string"):
        BlockHadamard(10, seed="")
    with pytest.raises(InvalidUpdateError, match="vectors of length 10"):
        BlockHadamard(10, seed="x").forward(np.zeros(11))
    with pytest.raises(ConfigError, match="dimension"):
        plan_upload(clip=1.0, value_bits=24, n_clients=3, max_weight=1, dimension=0)
