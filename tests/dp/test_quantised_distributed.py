"""Distributed DP through quantised uploads (8/16/32-bit rings, public shared scale, optional Hadamard rotation):
the noise lives in the upload's ring with room to spare, the aggregate through a secure aggregator is exactly the
quantised sum plus the clients' discrete-Gaussian noise, that noise has the distribution the accountant is told,
and the accountant counts the upload's sensitivity (its scale and the padded length)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedguard.dp import ClientDPConfig, ClientLevelDP, PrivacyAccountant
from fedguard.dp.distributed import DistributedDiscreteGaussian, integer_sensitivity, upload_spec_with_noise
from fedguard.dp.events import DistributedDiscreteGaussianEvent
from fedguard.encoding import (
    FixedPointSpec,
    decode_weighted_mean,
    encode_weighted,
    from_ring,
    ring_sum,
    to_ring,
)
from fedguard.errors import ConfigError, RingOverflowError
from fedguard.federation import aggregate_updates, make_aggregator
from fedguard.quantise import UploadPlan, padded_length, plan_upload
from fedguard.rng import SecureRNG
from fedguard.updates import ClientUpdate

N, C, Z, PUBLIC_CLIP = 3, 0.05, 0.5, 0.02
TEST_OPTIONS = {"paillier": {"key_bits": 512, "allow_insecure_test_keys": True}, "mpc": {"backend": "simulated"}}


def _setup(upload_bits: int, rotation: bool, d: int, *, accountant: bool = False
           ) -> tuple[UploadPlan, ClientLevelDP, FixedPointSpec]:
    plan = plan_upload(clip=PUBLIC_CLIP, value_bits=24, n_clients=N, max_weight=1, dimension=d,
                       upload_bits=upload_bits, rotation=rotation, seed="dp-upload")
    config = ClientDPConfig(clip_norm=C, noise_multiplier=Z, placement="distributed", min_survivors=N, population=N)
    acc = PrivacyAccountant(target_delta=1e-3, backend="rdp", population=N) if accountant else None
    dp = ClientLevelDP(config, accountant=acc)
    return plan, dp, dp.use_upload(plan.spec, dimension=d, n_clients=N, rotation=rotation)


def _updates(d: int, seed: str = "u") -> list[ClientUpdate]:
    rng = SecureRNG.for_testing(f"dp-upload/{seed}")
    # norms ~0.3 > C: clipping binds; a few spikes beyond the public clip after clipping too
    return [ClientUpdate(c, 0, (rng.normal(d) * 0.3 / math.sqrt(d)).astype(np.float32), 5 + c) for c in range(N)]


def test_the_noised_upload_keeps_the_ring_and_scale_and_leaves_the_noise_room() -> None:
    d = 3000
    plan, dp, spec = _setup(16, False, d)
    assert (spec.ring_bits, spec.clip, spec.max_weight) == (16, PUBLIC_CLIP, 1)
    assert spec.value_bits < plan.spec.value_bits  # bits given up for the noise

    def mechanism(bits: int) -> DistributedDiscreteGaussian:
        return DistributedDiscreteGaussian(
            noise_multiplier=Z, clip_norm=C, dimension=d, min_survivors=N,
            spec=FixedPointSpec(clip=PUBLIC_CLIP, value_bits=bits, ring_bits=16, max_weight=1))

    mechanism(spec.value_bits).check_headroom(N)  # fits ...
    with pytest.raises(RingOverflowError):  # ... and one more value bit would not: the most that fit
        mechanism(spec.value_bits + 1).check_headroom(N)
    # the noise std alone is >= z·√d/√N integer units: an 8-bit ring cannot carry it for 3,000 values
    with pytest.raises(RingOverflowError, match="does not fit a 8-bit upload of 3000 values.*upload_bits"):
        _setup(8, False, d)
    assert _setup(32, True, d)[2].ring_bits == 32


def test_upload_refusals_are_typed() -> None:
    plan = plan_upload(clip=PUBLIC_CLIP, value_bits=24, n_clients=N, max_weight=1, dimension=100, upload_bits=16)
    central = ClientLevelDP(ClientDPConfig(clip_norm=C, noise_multiplier=Z, population=N))
    with pytest.raises(ConfigError, match="use_upload is for placement='distributed'"):
        central.use_upload(plan.spec, dimension=100, n_clients=N)
    from fedguard.dp import AdaptiveClipping

    adaptive = ClientLevelDP(ClientDPConfig(clip_norm=C, noise_multiplier=Z, placement="distributed", min_survivors=N,
                                            population=N, adaptive=AdaptiveClipping()))
    with pytest.raises(ConfigError, match="adaptive clipping does not compose with quantised uploads"):
        adaptive.use_upload(plan.spec, dimension=100, n_clients=N)
    with pytest.raises(ConfigError, match="upload must be a FixedPointSpec"):
        upload_spec_with_noise("16", noise_multiplier=Z, clip_norm=C, dimension=10, min_survivors=N,  # type: ignore[arg-type]
                               n_clients=N)


def _round(name: str, plan: UploadPlan, dp: ClientLevelDP, spec: FixedPointSpec, updates: list[ClientUpdate],
           noise_seed: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """One round through aggregator ``name``: the decoded mean in update coordinates (before DP's finalize)
    and the clients' ring inputs as the encoder produced them."""
    dp.begin_round(0, dimension=plan.dimension)
    sent: list[np.ndarray] = []

    def encoder(update: ClientUpdate, quantise_rng: SecureRNG) -> np.ndarray:
        ring = dp.noise_for_client(update, rng=SecureRNG.for_testing(f"{noise_seed}/{update.client_id}"),
                                   quantise_rng=quantise_rng)
        sent.append(ring.copy())
        return ring

    forwarded = [plan.forward(dp.clip(u)) for u in updates]
    with make_aggregator(name, {**TEST_OPTIONS.get(name, {}), **({"threshold": N} if name == "masking" else {}),
                                **({"min_clients": N} if name in ("mpc", "paillier") else {})}) as agg:
        outcome = aggregate_updates(forwarded, agg, spec, round_id=0, rng=SecureRNG.for_testing("quantise"),
                                    encoder=encoder)
    dp.abandon_round()
    return plan.inverse(outcome.mean, 0), sent


@pytest.mark.parametrize("name", ["masking", "mpc", "paillier"])
@pytest.mark.parametrize(("upload_bits", "rotation"), [(16, False), (16, True), (32, True)])
def test_the_aggregate_is_exactly_the_quantised_sum_plus_the_clients_noise(name: str, upload_bits: int,
                                                                            rotation: bool) -> None:
    d = 1000
    plan, dp, spec = _setup(upload_bits, rotation, d)
    updates = _updates(d)
    mean, sent = _round(name, plan, dp, spec, updates, "noise")
    # by hand: the same quantisation draws without noise, plus each client's noise from its own stream
    dp.begin_round(0, dimension=d)
    rng = SecureRNG.for_testing("quantise")
    clean, noise = [], []
    for u in updates:
        y = plan.forward(dp.clip(u))
        clean.append(encode_weighted(y.vector, 1, spec, rng=rng.spawn(f"quantise/{u.client_id}")))
        xi = dp.distributed_mechanism(d).sample(SecureRNG.for_testing(f"noise/{u.client_id}"))
        assert xi.size == plan.travelling_length  # noise over the rotated (padded) coordinates
        noise.append(xi)
    total_noise = np.sum(noise, axis=0)
    expected_ring = ring_sum(clean, spec.ring_bits)
    # what the clients sent adds up, in the ring, to the clean sum plus the noise (weight slot: N)
    noise_ring = to_ring(np.concatenate([total_noise, [0]]), spec.ring_bits)
    np.testing.assert_array_equal(ring_sum(sent, spec.ring_bits), ring_sum([expected_ring, noise_ring], spec.ring_bits))
    signed = from_ring(expected_ring[:-1], spec.ring_bits) + total_noise  # never wraps: the headroom
    assert int(np.abs(signed).max()) < 1 << (spec.ring_bits - 1)
    expected = plan.inverse((signed / (N * spec.scale)).astype(np.float32), 0)
    np.testing.assert_allclose(mean, expected, rtol=0, atol=1e-6 * float(np.abs(expected).max()))
    # and without noise it would be the noiseless quantised mean
    clean_mean, _ = decode_weighted_mean(expected_ring, spec)
    assert not np.allclose(mean, plan.inverse(clean_mean, 0))


@pytest.mark.parametrize("rotation", [False, True])
def test_the_noise_in_the_aggregate_is_the_sum_of_the_planned_discrete_gaussians(rotation: bool) -> None:
    # the aggregate minus the noiseless quantised sum, in quantisation units, over many coordinates:
    # N i.i.d. N_Z(0, s^2) per coordinate -> mean 0, variance N·s^2, Gaussian shape (KS), light tails
    d = 20_000
    plan, dp, spec = _setup(16, rotation, d)
    updates = _updates(d, "stat")
    _, sent = _round("masking", plan, dp, spec, updates, "stat-noise")
    dp.begin_round(0, dimension=d)
    rng = SecureRNG.for_testing("quantise")
    clean = [encode_weighted(plan.forward(dp.clip(u)).vector, 1, spec, rng=rng.spawn(f"quantise/{u.client_id}"))
             for u in updates]
    noise = from_ring((ring_sum(sent, spec.ring_bits) - ring_sum(clean, spec.ring_bits))[:-1]
                      & np.uint64((1 << spec.ring_bits) - 1), spec.ring_bits).astype(np.float64)
    s = dp.distributed_mechanism(d).local_stddev
    sd = s * math.sqrt(N)
    n = noise.size
    assert abs(noise.mean()) < 5 * sd / math.sqrt(n)
    # variance within 5 standard errors (var of the sample variance ≈ 2σ⁴/n for a near-Gaussian)
    assert abs(noise.var() / sd**2 - 1) < 5 * math.sqrt(2 / n)
    assert stats.kstest(noise / sd, "norm").pvalue > 1e-3
    # the noise is large next to the signal at this z: the server cannot read a coordinate off the sum
    assert sd > 10 * spec.scale * C / math.sqrt(d)


@pytest.mark.parametrize("rotation", [False, True])
def test_the_accountant_counts_the_uploads_sensitivity(rotation: bool) -> None:
    d = 3000
    plan, dp, spec = _setup(16, rotation, d, accountant=True)
    dp.begin_round(0, dimension=d)
    _, label = dp.prepay()
    d_noised = padded_length(d) if rotation else d
    assert d_noised == plan.travelling_length
    l2, l1 = integer_sensitivity(spec, C, d_noised)
    assert l2 == pytest.approx(min(spec.scale * C, spec.max_int * math.sqrt(d_noised)) + math.sqrt(d_noised))
    local = Z * l2 / math.sqrt(N)
    expected = DistributedDiscreteGaussianEvent(local, N, l2, l1, d_noised)
    assert dp.round_event() == expected
    accountant = dp.accountant
    assert accountant is not None
    entry = accountant.ledger[-1]
    assert entry.sensitivity == pytest.approx(l2 / spec.scale)  # in update units: C + √d'/s at this scale
    assert "16-bit upload ring" in label and ("rotated" in label) == rotation
    reference = PrivacyAccountant(target_delta=1e-3, backend="rdp", population=N)
    reference.spend(expected, label="by hand")
    assert accountant.epsilon() == pytest.approx(reference.epsilon())
    # here s·C < M·√d', so in update units the sensitivity is C plus the rounding excess √d'/s at the upload's scale
    assert spec.scale * C < spec.max_int * math.sqrt(d_noised)
    assert entry.sensitivity == pytest.approx(C + math.sqrt(d_noised) / spec.scale)
