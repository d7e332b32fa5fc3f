"""The MPC aggregator passes the foundation's aggregator contract (exact equality with plaintext).

These tests run the real sharing, encryption and stage-machine code with *simulated* compute parties
(:class:`SimulatedParties`: the party objects live in the test process and add their shares with numpy).
The CrypTen processes are exercised in ``test_mpc_parties.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedguard.encoding import FixedPointSpec, decode_weighted_mean, encode_weighted, ring_sum
from fedguard.errors import ConfigError, InvalidUpdateError, ProtocolAbort, ProtocolViolation
from fedguard.federation import aggregate_updates, make_aggregator
from fedguard.federation.protocol import Aggregator, RoundSpec
from fedguard.federation.transport import InProcessTransport
from fedguard.rng import SecureRNG
from fedguard.secagg.mpc import INVALID_DROPPED, MpcAggregator, unweighted_input
from fedguard.secagg.mpc import sharing as mpc_sharing
from fedguard.secagg.mpc.parties import AggregationJob, SimulatedParties
from fedguard.secagg.mpc.sharing import SealedShares, open_share, seal
from fedguard.testing.aggregator_contract import AggregatorContract
from fedguard.updates import ClientUpdate
from fedguard.wire import Message, decode, encode


class TestMpcContractThreeParties(AggregatorContract):
    def make_aggregator(self, n_clients: int) -> Aggregator:
        return MpcAggregator(parties=SimulatedParties(3), min_clients=2)


class TestMpcContractTwoPartiesSmallRing(AggregatorContract):
    ring_bits = 20
    vector_length = 5

    def make_aggregator(self, n_clients: int) -> Aggregator:
        return MpcAggregator(parties=SimulatedParties(2), min_clients=n_clients - 1)


def _round(n: int = 3, length: int = 6) -> tuple[RoundSpec, dict[int, np.ndarray]]:
    spec = RoundSpec(4, tuple(range(n)), length)
    rng = SecureRNG.for_testing("mpc-unit")
    return spec, {c: rng.ring_elements(length, 64) for c in spec.participants}


def test_registry_builds_mpc() -> None:
    agg = make_aggregator("mpc", backend="simulated", n_parties=2, min_clients=2)
    assert isinstance(agg, MpcAggregator) and agg.parties.n_parties == 2


def _reachable(obj: object, stop: tuple[type, ...], seen: set[int] | None = None, depth: int = 0) -> list[object]:
    """Every object reachable from ``obj`` through attributes and containers (not entering ``stop`` types)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 8 or isinstance(obj, stop):
        return []
    seen.add(id(obj))
    out = [obj]
    attrs = list(getattr(obj, "__dict__", {}).values())
    for cls in type(obj).__mro__:
        attrs += [getattr(obj, a, None) for a in getattr(cls, "__slots__", ())]
    if isinstance(obj, (list, tuple, set, frozenset)):
        attrs += list(obj)
    if isinstance(obj, dict):
        attrs += list(obj.keys()) + list(obj.values())
    for a in attrs:
        out += _reachable(a, stop, seen, depth + 1)
    return out


def test_server_holds_no_party_key_and_each_relayed_share_opens_only_at_its_party() -> None:
    spec, xs = _round()
    parties = SimulatedParties(3, rng=SecureRNG.for_testing("party-keys"))
    agg = MpcAggregator(parties=parties)
    server = agg.server(spec)
    relayed: dict[int, bytes] = {}
    out = InProcessTransport().run(server, {c: agg.client(spec, c, xs[c]) for c in xs},
                                   tamper=lambda stage, c, reply: relayed.setdefault(c, reply))
    np.testing.assert_array_equal(out.result.ring_sum, ring_sum(list(xs.values()), 64))
    # 1. the server's side (everything but the parties, which stand for separate machines) holds no private
    #    key; in-process, the party objects are the only holders, one key each
    found = _reachable(server, stop=(SimulatedParties,))
    assert server in found and server.spec in found
    assert not any(isinstance(o, X25519PrivateKey) for o in found)
    # control: the same walk entering the simulated parties does find their keys (the walk can see keys)
    assert sum(isinstance(o, X25519PrivateKey) for o in _reachable(server, stop=())) == 3
    party_keys = parties._keys
    assert len(party_keys) == 3 and all(isinstance(k, X25519PrivateKey) for k in party_keys)
    # 2. what the server relays: share k of client c opens with party k's key, under no other party's key,
    #    and the K shares add up to the input
    for c, reply in relayed.items():
        msg = decode(reply)
        sealed = SealedShares(msg.blob("epk"), tuple(msg.blob(f"ct{k}") for k in range(3)))
        shares = []
        for k in range(3):
            share = open_share(sealed, k, party_keys[k], round_id=spec.round_id, client_id=c, length=6)
            assert share is not None
            shares.append(share)
            for j in range(3):
                if j != k:
                    assert open_share(sealed, k, party_keys[j], round_id=spec.round_id, client_id=c, length=6) is None
        np.testing.assert_array_equal(shares[0] + shares[1] + shares[2], xs[c])
        assert not any(np.array_equal(s, xs[c]) for s in shares)  # no single share is the input
    # 3. below open_share: AES-GCM under a key derived with the wrong party key raises, the right one opens
    c = 1
    msg = decode(relayed[c])
    ct, epk = msg.blob("ct2"), msg.blob("epk")
    ctx = mpc_sharing._context(spec.round_id, c, 2, 3, 6)

    def channel_key(private: X25519PrivateKey) -> bytes:
        shared = private.exchange(X25519PublicKey.from_public_bytes(epk))
        return mpc_sharing._channel_key(shared, epk, parties.public_keys[2], ctx)

    AESGCM(channel_key(party_keys[2])).decrypt(ct[:12], ct[12:], ctx)
    with pytest.raises(InvalidTag):
        AESGCM(channel_key(party_keys[0])).decrypt(ct[:12], ct[12:], ctx)


def test_a_ciphertext_that_fails_at_one_party_excludes_its_client() -> None:
    spec, xs = _round(4)
    agg = MpcAggregator(backend="simulated", n_parties=3, min_clients=2)

    def corrupt(stage: str, c: int, reply: bytes) -> bytes:
        if c != 2:
            return reply
        msg = decode(reply)
        arrays = dict(msg.arrays)
        ct = arrays["ct1"].copy()
        ct[-1] ^= 1  # breaks the AES-GCM tag; the wire digest is recomputed, so only party 1 can tell
        arrays["ct1"] = ct
        return encode(Message(msg.kind, msg.round, msg.stage, msg.sender, msg.recipient, msg.meta, arrays))

    out = InProcessTransport().run(agg.server(spec), {c: agg.client(spec, c, xs[c]) for c in xs}, tamper=corrupt)
    assert out.result.contributors == (0, 1, 3)
    assert out.result.dropped[INVALID_DROPPED] == (2,)
    np.testing.assert_array_equal(out.result.ring_sum, ring_sum([xs[0], xs[1], xs[3]], 64))


def test_ciphertexts_replayed_from_another_client_do_not_authenticate() -> None:
    spec, xs = _round(3)
    agg = MpcAggregator(backend="simulated", n_parties=2, min_clients=2)
    replies: dict[int, bytes] = {}

    def swap(stage: str, c: int, reply: bytes) -> bytes:
        replies[c] = reply
        if c == 1:  # client 1 replays client 0's ciphertexts under its own name
            m0, m1 = decode(replies[0]), decode(reply)
            return encode(Message(m1.kind, m1.round, m1.stage, m1.sender, m1.recipient, m1.meta, dict(m0.arrays)))
        return reply

    out = InProcessTransport().run(agg.server(spec), {c: agg.client(spec, c, xs[c]) for c in xs}, tamper=swap)
    assert out.result.dropped[INVALID_DROPPED] == (1,)
    assert out.result.contributors == (0, 2)


def test_too_few_valid_clients_reveal_nothing() -> None:
    spec, xs = _round(3)
    agg = MpcAggregator(backend="simulated", n_parties=3, min_clients=3)

    def corrupt(stage: str, c: int, reply: bytes) -> bytes:
        if c != 0:
            return reply
        msg = decode(reply)
        arrays = dict(msg.arrays)
        arrays["ct0"] = arrays["ct0"][:-1]
        return encode(Message(msg.kind, msg.round, msg.stage, msg.sender, msg.recipient, msg.meta, arrays))

    server = agg.server(spec)
    with pytest.raises(ProtocolAbort, match="nothing revealed"):
        InProcessTransport().run(server, {c: agg.client(spec, c, xs[c]) for c in xs}, tamper=corrupt)
    with pytest.raises(ProtocolAbort):
        server.close_stage()


def test_client_refuses_a_server_that_names_other_parties() -> None:
    spec, xs = _round()
    trusted, other = MpcAggregator(backend="simulated", n_parties=3), MpcAggregator(backend="simulated", n_parties=3)
    outbox = other.server(spec).open()
    client = trusted.client(spec, 0, xs[0])
    with pytest.raises(ProtocolViolation, match="other compute parties"):
        client.handle(outbox[0])
    assert client.stage == "input"  # unchanged: the right server's request is still answered
    client.handle(trusted.server(spec).open()[0])


def test_weighted_fedavg_through_mpc_equals_plaintext_fedavg() -> None:
    enc = FixedPointSpec(clip=1.0, value_bits=20, ring_bits=64, max_weight=1000)
    gen = SecureRNG.for_testing("fedavg").numpy_generator()
    updates = [ClientUpdate(c, 2, gen.normal(0, 0.2, 50).astype(np.float32), int(w))
               for c, w in zip(range(5), (3, 10, 7, 1, 250))]
    rng = SecureRNG.for_testing("fedavg-protocol")
    mpc = aggregate_updates(updates, MpcAggregator(backend="simulated", n_parties=3), enc, round_id=2, rng=rng, drop_at={4: "input"})
    plain = aggregate_updates(updates, make_aggregator("plaintext"), enc, round_id=2,
                              rng=SecureRNG.for_testing("fedavg-protocol"), drop_at={4: "input"})
    np.testing.assert_array_equal(mpc.mean, plain.mean)  # same quantisation stream, exact ring sum
    assert mpc.total_weight == 21 and mpc.contributors == (0, 1, 2, 3)


def test_unweighted_input_recovers_q_and_refuses_non_encodings() -> None:
    enc = FixedPointSpec(clip=1.0, value_bits=16, ring_bits=64, max_weight=100)
    x = encode_weighted(np.array([0.5, -0.25, 1.0], dtype=np.float32), 7, enc, rounding="nearest")
    z = unweighted_input(x, enc, 64)
    assert z[-1] == 7 and (z[:-1].view(np.int64) * 7 == x[:-1].view(np.int64)).all()
    mean, w = decode_weighted_mean(x, enc)
    assert w == 7 and mean.tolist() == pytest.approx([0.5, -0.25, 1.0], abs=1e-4)
    bad = x.copy()
    bad[0] += np.uint64(1)
    with pytest.raises(InvalidUpdateError, match="not a multiple of the weight 7"):
        unweighted_input(bad, enc, 64)
    heavy = x.copy()
    heavy[-1] = np.uint64(101)
    with pytest.raises(InvalidUpdateError, match="max_weight=100"):
        unweighted_input(heavy, enc, 64)
    big = np.array([7 * (enc.max_int + 1), 7], dtype=np.uint64)
    with pytest.raises(InvalidUpdateError, match="exceeds M"):
        unweighted_input(big, enc, 64)


def test_configuration_errors_name_the_value() -> None:
    with pytest.raises(ConfigError, match="min_clients must be an int >= 1, got 0"):
        MpcAggregator(min_clients=0)  # refused before any party process starts
    with pytest.raises(ConfigError, match="norm_bound needs compute parties that run the norm check"):
        MpcAggregator(norm_bound=1.0, parties=SimulatedParties(2))
    with pytest.raises(ConfigError, match="backend must be"):
        MpcAggregator(backend="gpu")
    with pytest.raises(ConfigError, match="n_parties must be"):
        SimulatedParties(1)
    with pytest.raises(ConfigError, match="norm_bound must be None or a finite number > 0.0, got -1"):
        MpcAggregator(norm_bound=-1.0)


def test_the_encoding_is_the_rounds_not_an_option() -> None:
    with pytest.raises(ConfigError) as info:
        MpcAggregator(norm_bound=-1.0, encoding={"clip": 1.0}, min_clients=0)
    text = str(info.value)
    for part in ("encoding was removed: the fixed-point encoding now travels with each round", "norm_bound must be None or a finite number > 0.0, got -1",
                 "min_clients must be an int >= 1, got 0"):
        assert part in text


class _NormCheckingParties(SimulatedParties):
    """Claims the norm check (never reached here): lets a test build a norm-bound aggregator without processes."""

    @property
    def supports_norm_check(self) -> bool:
        return True


def test_a_norm_bound_needs_the_rounds_fixed_point_spec() -> None:
    agg = MpcAggregator(parties=_NormCheckingParties(2), norm_bound=1.0)
    spec, xs = _round(3)
    with pytest.raises(ConfigError, match=r"norm_bound needs the round's fixed-point encoding \(RoundSpec.fixed_point"):
        agg.server(spec)
    with pytest.raises(ConfigError, match="norm_bound needs the round's fixed-point encoding"):
        agg.client(spec, 0, xs[0])


def test_the_norm_check_runs_under_mpc_only() -> None:
    with pytest.raises(ConfigError) as info:  # simulated parties only add shares
        MpcAggregator(backend="simulated", norm_bound=1.0)
    assert "use backend='crypten'" in str(info.value)
    with pytest.raises(ConfigError, match="norm_action must be 'exclude' or 'clip', got 'shrink'"):
        MpcAggregator(norm_bound=1.0, backend="crypten", norm_action="shrink")
    with pytest.raises(ConfigError, match="norm_action='clip' needs norm_bound"):
        MpcAggregator(norm_action="clip")
    with pytest.raises(ConfigError, match=r"needs clip_halvings >= 1 \(at most 16\), got 0"):
        MpcAggregator(norm_bound=1.0, backend="crypten", norm_action="clip", clip_halvings=0)


# -- a lone client's update is never revealed by default ----------------------------------------------
def test_min_clients_defaults_to_two_and_one_needs_the_explicit_opt_in() -> None:
    assert MpcAggregator(backend="simulated", n_parties=2).min_clients == 2
    with pytest.raises(ConfigError, match="min_clients=1 lets the parties reveal a lone client's update"):
        MpcAggregator(backend="simulated", n_parties=2, min_clients=1)
    with pytest.raises(ConfigError, match="allow_single_client must be a bool, got 'yes'"):
        MpcAggregator(backend="simulated", n_parties=2, min_clients=1, allow_single_client="yes")
    assert MpcAggregator(backend="simulated", n_parties=2, min_clients=1, allow_single_client=True).min_clients == 1


def test_by_default_a_round_with_one_surviving_client_reveals_nothing() -> None:
    spec, xs = _round(3)
    agg = MpcAggregator(backend="simulated", n_parties=3)
    server = agg.server(spec)
    with pytest.raises(ProtocolAbort, match="before the server decoded anything"):
        InProcessTransport().run(server, {c: agg.client(spec, c, xs[c]) for c in xs}, drop_at={0: "input", 1: "input"})
    with pytest.raises(ConfigError, match="min_clients=2 exceeds the 1 participants"):
        agg.server(RoundSpec(4, (0,), 6))
    # with the opt-in, the same round reveals the lone client's input: exactly what the default prevents
    lone = MpcAggregator(backend="simulated", n_parties=3, min_clients=1, allow_single_client=True)
    out = InProcessTransport().run(lone.server(spec), {c: lone.client(spec, c, xs[c]) for c in xs},
                                   drop_at={0: "input", 1: "input"})
    np.testing.assert_array_equal(out.result.ring_sum, xs[2])


def test_parties_refuse_by_default_to_reveal_one_valid_client() -> None:
    parties = SimulatedParties(2, rng=SecureRNG.for_testing("lone"))
    rng = SecureRNG.for_testing("lone-inputs")
    x = rng.ring_elements(4, 64)
    sealed = seal(x, parties.public_keys, round_id=1, client_id=7, rng=rng)
    job = AggregationJob(1, 4, 64, {7: sealed})
    assert job.min_contributors == 2
    with pytest.raises(ProtocolAbort, match="only 1 client"):
        parties.aggregate(job)
    np.testing.assert_array_equal(parties.aggregate(AggregationJob(1, 4, 64, {7: sealed}, min_contributors=1)).ring_sum, x)
    with pytest.raises(ConfigError, match="min_contributors must be an int >= 1, got 0"):
        AggregationJob(1, 4, 64, {7: sealed}, min_contributors=0)
