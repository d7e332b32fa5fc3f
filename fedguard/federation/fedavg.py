"""Weighted FedAvg through any :class:`~fedguard.federation.protocol.Aggregator`.

The glue between float updates and the integer protocols: each client's update is clipped, quantised
with stochastic rounding and scaled by its weight into the ring (:func:`fedguard.encoding.encode_weighted`),
the aggregator computes the ring sum over the clients that survive, and the server decodes the weighted
mean ``Σ w_i Δ_i / Σ w_i`` of exactly those clients. The server never needs the individual weights.

A :data:`RingEncoder` replaces that encoding step where a client must do more than quantise, e.g.
distributed DP, where each client adds its share of discrete-Gaussian noise inside the ring
(:meth:`fedguard.dp.ClientLevelDP.noise_for_client`) so that the server only ever decodes a noised sum.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedguard.encoding import FixedPointSpec, Rounding, decode_weighted_mean, encode_weighted
from fedguard.errors import ConfigError, InvalidUpdateError
from fedguard.federation.protocol import Aggregator, RoundSpec
from fedguard.federation.transport import InProcessTransport, TrafficLog
from fedguard.rng import SecureRNG
from fedguard.updates import ClientUpdate

RingEncoder = Callable[[ClientUpdate, SecureRNG], np.ndarray]
"""``(update, quantisation rng) -> [v_1 .. v_d, w]`` in ``Z_{2^k}`` (uint64, length ``d + 1``): how one
client turns its update into the ring input of the protocol (default: :func:`encode_weighted`)."""


@dataclass(frozen=True, slots=True)
class FedAvgOutcome:
    """The aggregated update and what the round cost."""

    round_id: int
    mean: np.ndarray
    total_weight: int
    contributors: tuple[int, ...]
    dropped: Mapping[str, tuple[int, ...]]
    traffic: TrafficLog
    seconds: float


def aggregate_updates(
    updates: Sequence[ClientUpdate],
    aggregator: Aggregator,
    spec: FixedPointSpec,
    *,
    round_id: int,
    rng: SecureRNG | None = None,
    drop_at: Mapping[int, str] | None = None,
    rounding: Rounding = "stochastic",
    transport: InProcessTransport | None = None,
    encoder: RingEncoder | None = None,
    protocol_rng: SecureRNG | None = None,
    min_contributors: int = 1,
) -> FedAvgOutcome:
    """Run one round of weighted FedAvg over ``aggregator``.

    ``rng`` drives the quantisation (stochastic rounding); ``protocol_rng`` the aggregator's own randomness:
    key pairs, masks, obfuscators, shares. It defaults to OS entropy (:class:`SecureRNG`), *never* to ``rng``:
    a reproducible simulation seeds ``rng`` and the protocol stays unpredictable (the exact secure aggregators
    return the same sum whatever their randomness, and masks derived from a seed the server knows would
    protect nothing). Seed the protocol only in tests, with ``protocol_rng=SecureRNG.for_testing(...)``.
    ``min_contributors`` becomes the round's :attr:`RoundSpec.min_contributors`: a round in which fewer
    clients survive to the reveal aborts before anything is decoded.
    ``encoder`` replaces :func:`encode_weighted` (its output is checked: uint64 of length ``d + 1``).

    The round's :class:`RoundSpec` carries ``spec`` as its ``fixed_point`` when the updates are encoded here
    (the inputs then obey its bounds), and ``None`` with a custom ``encoder``, whose outputs may exceed them.

    All checks (rounds, lengths, ids, ring capacity, weights, finiteness) run before anything is encoded.
    Raises :class:`~fedguard.errors.ProtocolAbort` when too many clients drop.
    """
    if not updates:
        raise ConfigError("aggregate_updates needs at least one update")
    ids = [u.client_id for u in updates]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"client ids must be distinct, got {ids}")
    for u in updates:
        if u.round != round_id:
            raise InvalidUpdateError(f"client {u.client_id} sent an update for round {u.round}, expected {round_id}")
        if u.vector.shape != updates[0].vector.shape:
            raise InvalidUpdateError(
                f"client {u.client_id} update has length {u.vector.size}, client {ids[0]} has {updates[0].vector.size}"
            )
        if u.weight > spec.max_weight:
            raise InvalidUpdateError(f"client {u.client_id} weight {u.weight} exceeds max_weight={spec.max_weight}")
    spec.check_capacity(len(updates))
    rng = rng if rng is not None else SecureRNG()
    protocol_rng = protocol_rng if protocol_rng is not None else SecureRNG()
    width = updates[0].vector.size + 1
    # the round carries the encoding when every input is known to obey it (Paillier sizes its slots from it,
    # MPC's norm check reads q and s from it); a custom encoder (e.g. noise added in the ring) may exceed it
    round_spec = RoundSpec(round_id, tuple(ids), width, spec.ring_bits, fixed_point=spec if encoder is None else None,
                           min_contributors=min_contributors)

    def encode(u: ClientUpdate) -> np.ndarray:
        quantise_rng = rng.spawn(f"quantise/{u.client_id}")
        if encoder is None:
            return encode_weighted(u.vector, int(u.weight), spec, rng=quantise_rng, rounding=rounding)
        ring = encoder(u, quantise_rng)
        if not isinstance(ring, np.ndarray) or ring.dtype != np.uint64 or ring.shape != (width,):
            raise InvalidUpdateError(
                f"client {u.client_id}: the ring encoder must return uint64 of shape ({width},), got "
                f"{getattr(ring, 'dtype', type(ring).__name__)} of shape {getattr(ring, 'shape', None)}"
            )
        return ring

    clients = {
        u.client_id: aggregator.client(
            round_spec, u.client_id, encode(u), rng=protocol_rng.spawn(f"protocol/{u.client_id}")
        )
        for u in updates
    }
    server = aggregator.server(round_spec, rng=protocol_rng.spawn("protocol/server"))
    outcome = (transport or InProcessTransport()).run(server, clients, drop_at=drop_at)
    mean, total = decode_weighted_mean(outcome.result.ring_sum, spec)
    return FedAvgOutcome(
        round_id, mean, total, outcome.result.contributors, outcome.result.dropped, outcome.traffic, outcome.seconds
    )
