"""Paillier's offline half in the round loop (``precompute=True``): one long-lived key, each client's obfuscator
pool filled before its update exists, used once, and the sum still exact."""

from __future__ import annotations

import numpy as np
import pytest

from fedguard import wire
from fedguard.encoding import FixedPointSpec
from fedguard.errors import ConfigError
from fedguard.federation import InProcessTransport, aggregate_updates, make_aggregator
from fedguard.federation.protocol import RoundSpec
from fedguard.rng import SecureRNG
from fedguard.updates import ClientUpdate

OPTIONS = {"key_bits": 512, "allow_insecure_test_keys": True}


def _round(agg, round_id: int, d: int = 200) -> tuple[np.ndarray, list[str]]:  # type: ignore[no-untyped-def]
    """One round through ``agg``; returns the mean and the key fingerprints the key holder announced."""
    spec = FixedPointSpec(clip=1.0, value_bits=16, ring_bits=32, max_weight=10)
    rng = SecureRNG.for_testing(f"precompute/{round_id}")
    updates = [ClientUpdate(c, round_id, (rng.normal(d) * 0.2).astype(np.float32), 1 + c) for c in range(3)]
    fingerprints: list[str] = []

    def tamper(stage: str, client: int, payload: bytes) -> bytes:
        if stage == "key" and wire.decode(payload).meta["fingerprint"]:
            fingerprints.append(wire.decode(payload).meta["fingerprint"])
        return payload

    class Watch(InProcessTransport):
        def run(self, server, clients, **kw):  # type: ignore[no-untyped-def]
            return super().run(server, clients, tamper=tamper, **kw)

    plain = aggregate_updates(updates, make_aggregator("plaintext"), spec, round_id=round_id, rng=rng.spawn("q"))
    out = aggregate_updates(updates, agg, spec, round_id=round_id, rng=rng.spawn("q"), transport=Watch())
    np.testing.assert_array_equal(out.mean, plain.mean)  # exact, pooled or not
    return out.mean, fingerprints


def test_pools_are_filled_offline_used_once_and_the_key_lives_across_rounds() -> None:
    with make_aggregator("paillier", {**OPTIONS, "precompute": True}) as agg:
        spec = RoundSpec(1, (0, 1, 2), 201, 32, fixed_point=FixedPointSpec(clip=1.0, value_bits=16, ring_bits=32,
                                                                             max_weight=10))
        need = agg.layout(spec).n_ciphertexts
        assert agg.precompute(spec) == 3 * need  # every participant's pool, up to the round's ciphertexts
        assert [agg.pooled(c) for c in range(3)] == [need] * 3
        assert agg.precompute(spec) == 0  # already full: nothing more
        _, first = _round(agg, 1)
        assert [agg.pooled(c) for c in range(3)] == [0] * 3  # each obfuscator handed out once
        agg.precompute(RoundSpec(2, (0, 1, 2), 201, 32, fixed_point=spec.fixed_point))
        _, second = _round(agg, 2)
        _, third = _round(agg, 3)  # an empty pool: fresh obfuscators, still exact
        assert first == second == third and len(first) == 1  # one long-lived key for the run


def test_without_precompute_nothing_is_made_and_each_round_has_a_fresh_key() -> None:
    with make_aggregator("paillier", OPTIONS) as agg:
        spec = RoundSpec(1, (0, 1, 2), 201, 32)
        assert agg.precompute(spec) == 0 and agg.pooled(0) == 0
        _, first = _round(agg, 1)
        _, second = _round(agg, 2)
        assert first != second


def test_precompute_must_be_a_bool() -> None:
    with pytest.raises(ConfigError, match="precompute must be a bool"):
        make_aggregator("paillier", {**OPTIONS, "precompute": "yes"})
