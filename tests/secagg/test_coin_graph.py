"""The signed SecAgg+ graph comes from a commit-then-reveal coin flip among the clients (issue 12).

The server plays the attacker: it would like to choose the communication graph (e.g. to put a victim's
neighbourhood among its colluders). It sees every commitment before any coin, every coin before the
graph, and relays every message. Each test lets it try one lever and checks that the lever is refused or
gives it nothing: equivocating on the commitment list, substituting or withholding a coin, dropping a
revealer after seeing the coins (an abort: a restart with fresh coins, never a graph of its choice).
"""

from __future__ import annotations

import numpy as np
import pytest

from fedguard import wire
from fedguard.encoding import ring_sum
from fedguard.errors import ConfigError, MessageError, ProtocolAbort, ProtocolViolation
from fedguard.federation.protocol import AggregateResult, ClientSide, RoundSpec, ServerSide
from fedguard.federation.transport import InProcessTransport
from fedguard.identity import Identity, Roster
from fedguard.rng import SecureRNG
from fedguard.secagg.masking import MaskingAggregator
from fedguard.secagg.masking.graph import CommunicationGraph
from fedguard.secagg.masking.signed import (
    COIN,
    SHARE,
    SignedMaskingAggregator,
    coin_commitment,
    graph_seed_from_coins,
)

IDS = tuple(range(10, 20))
IDENTITIES = {c: Identity.generate(c) for c in IDS}
ROSTER = Roster.of(IDENTITIES, "coin-test")


def _agg(**kw: object) -> SignedMaskingAggregator:
    return SignedMaskingAggregator(roster=ROSTER, identities=IDENTITIES, neighbours=4, **kw)


def _round(agg: SignedMaskingAggregator, *, round_id: int = 3, coins: str = "coins"
           ) -> tuple[RoundSpec, ServerSide, dict[int, ClientSide], dict[int, np.ndarray]]:
    spec = RoundSpec(round_id, IDS, 5, 64)
    rng = SecureRNG.for_testing(f"coin-inputs/{round_id}")
    xs = {c: rng.ring_elements(5, 64) for c in IDS}
    protocol = SecureRNG.for_testing(coins)
    clients = {c: agg.client(spec, c, xs[c], rng=protocol.spawn(str(c))) for c in IDS}
    return spec, agg.server(spec), clients, xs


def _advance(server: ServerSide, clients: dict[int, ClientSide], outbox: dict[int, bytes]
             ) -> dict[int, bytes] | AggregateResult:
    for c in sorted(outbox):
        server.accept(c, clients[c].handle(outbox[c]))
    return server.close_stage()


def _to(server: ServerSide, clients: dict[int, ClientSide], stage: str) -> dict[int, bytes]:
    outbox = server.open()
    while server.stage != stage:
        step = _advance(server, clients, outbox)
        assert isinstance(step, dict)
        outbox = step
    return outbox


def _rewrite(payload: bytes, **arrays: np.ndarray) -> bytes:
    msg = wire.decode(payload)
    return wire.encode(wire.Message(kind=msg.kind, round=msg.round, stage=msg.stage, sender=msg.sender,
                                    recipient=msg.recipient, meta=dict(msg.meta), arrays={**msg.arrays, **arrays}))


def test_every_client_derives_the_servers_graph_and_the_round_is_exact() -> None:
    agg = _agg()
    spec, server, clients, xs = _round(agg)
    out = InProcessTransport().run(server, clients, drop_at={17: "mask"})
    honest = [c for c in IDS if c != 17]
    np.testing.assert_array_equal(out.result.ring_sum, ring_sum([xs[c] for c in honest], 64))
    seed = server.graph_seed  # type: ignore[attr-defined]
    assert len(seed) == 32
    for c in IDS:  # every client, the dropped one included, drew the same graph from the same coins
        assert clients[c].graph_seed == seed  # type: ignore[attr-defined]
        assert clients[c].graph == server.graph  # type: ignore[attr-defined]
    assert agg.graph(spec) == server.graph == CommunicationGraph.harary(IDS, 4, seed)  # type: ignore[attr-defined]


def test_the_seed_is_a_function_of_the_coins_alone_and_every_coin_changes_it() -> None:
    """Same client coins -> same graph, whatever server; one client's coin changed -> another seed. The
    server contributes no randomness it could choose."""
    def seed_of(coins: str, **kw: object) -> bytes:
        _, server, clients, _ = _round(_agg(**kw), coins=coins)
        _to(server, clients, SHARE)
        return server.graph_seed  # type: ignore[attr-defined,no-any-return]

    base = seed_of("coins-a", rng=SecureRNG.for_testing("server-1"))
    assert seed_of("coins-a", rng=SecureRNG.for_testing("server-2")) == base  # the aggregator's key plays no part
    assert seed_of("coins-b") != base
    # the seed recomputed from the public transcript: the ids, commitments and coins, nothing else
    _, server, clients, _ = _round(_agg(), coins="coins-a")
    coin_out = _to(server, clients, COIN)
    req = wire.decode(coin_out[10])
    ids = [int(v) for v in req.arrays["clients"]]
    commitments = [row.tobytes() for row in req.arrays["commitments"]]
    coins = [wire.decode(clients[c].handle(coin_out[c])).blob("coin") for c in ids]
    assert graph_seed_from_coins(deployment=ROSTER.deployment, round_id=3, clients=ids, commitments=commitments,
                                 coins=coins) == base


def test_a_server_that_drops_a_revealer_gets_an_abort_not_a_graph() -> None:
    """Having seen nine coins, the server pretends the tenth revealer dropped (to pick between the graph
    with and without its coin): the round aborts before any input, nothing revealed; a restart draws
    fresh coins."""
    spec, server, clients, _ = _round(_agg())
    with pytest.raises(ProtocolAbort, match="did not reveal it.*restart the round with fresh coins") as info:
        InProcessTransport().run(server, clients, drop_at={13: COIN})
    assert info.value.nothing_revealed and info.value.stage == COIN
    with pytest.raises(ConfigError, match="drawn by the clients' coin flip"):
        _agg().graph(spec)  # no round of that aggregator drew a graph


@pytest.mark.parametrize("lever", ["substitute-coin", "withhold-coin", "swap-coins"])
def test_a_server_cannot_substitute_or_withhold_a_coin(lever: str) -> None:
    """In the share request the server replaces client 13's coin by one of its choosing, leaves it out, or
    swaps two clients' coins: every recipient refuses (the coin does not open the commitment it saw), and
    its state is unchanged (the honest request is accepted afterwards)."""
    _, server, clients, _ = _round(_agg())
    share_out = _to(server, clients, SHARE)
    coins = np.array(wire.decode(share_out[10]).arrays["coins"])
    i = IDS.index(13)
    if lever == "substitute-coin":
        coins[i] = np.frombuffer(bytes(range(32)), dtype=np.uint8)
    elif lever == "swap-coins":
        coins[[i, i + 1]] = coins[[i + 1, i]]
    else:
        coins = np.delete(coins, i, axis=0)
    for c in (10, 15):
        with pytest.raises((ProtocolViolation, MessageError), match="does not open its commitment|coins must have"):
            clients[c].handle(_rewrite(share_out[c], coins=coins))
        assert clients[c].stage == SHARE and clients[c].graph is None  # type: ignore[attr-defined]
        clients[c].handle(share_out[c])


@pytest.mark.parametrize("lever", ["alter-own-commitment", "drop-own-commitment", "sybil", "too-few"])
def test_a_doctored_commitment_list_is_refused_before_any_coin_is_revealed(lever: str) -> None:
    spec, server, clients, _ = _round(_agg())
    coin_out = _to(server, clients, COIN)
    msg = wire.decode(coin_out[10])
    ids, commitments = np.array(msg.arrays["clients"]), np.array(msg.arrays["commitments"])
    if lever == "alter-own-commitment":
        commitments[0] ^= 1
    elif lever == "drop-own-commitment":
        ids, commitments = ids[1:], commitments[1:]
    elif lever == "sybil":  # a made-up client 99 with a commitment of the server's choosing
        ids = np.append(ids, 99)
        commitments = np.vstack([commitments, np.zeros((1, 32), dtype=np.uint8)])
    else:  # only the server's accomplices and the victim: too few to ever pass the consistency round
        ids, commitments = ids[:3], commitments[:3]
    with pytest.raises(ProtocolViolation, match="commitment is missing|not participants|cannot complete"):
        clients[10].handle(_rewrite(coin_out[10], clients=ids, commitments=commitments))
    assert clients[10].stage == COIN  # nothing revealed, state unchanged


def test_equivocating_on_the_commitment_list_gets_the_server_a_dropout_not_a_second_graph() -> None:
    """The server shows client 15 a commitment list without client 14 and everyone else the full list.
    15 then derives a seed of its own, refuses the share request built for the common graph (its coin
    list differs), and counts as dropped; the round completes exactly over the others, under one graph."""
    spec, server, clients, xs = _round(_agg())
    coin_out = _to(server, clients, COIN)
    msg = wire.decode(coin_out[15])
    keep = np.array([int(v) != 14 for v in msg.arrays["clients"]])
    coin_out[15] = _rewrite(coin_out[15], clients=np.array(msg.arrays["clients"])[keep],
                            commitments=np.array(msg.arrays["commitments"])[keep])
    for c in sorted(coin_out):
        server.accept(c, clients[c].handle(coin_out[c]))
    outbox = server.close_stage()
    assert isinstance(outbox, dict)
    with pytest.raises(MessageError, match="coins must have shape"):
        clients[15].handle(outbox[15])
    drop = {15: SHARE}
    result = None
    while result is None:
        for c in sorted(outbox):
            if c in drop:
                continue
            server.accept(c, clients[c].handle(outbox[c]))
        step = server.close_stage()
        result = step if isinstance(step, AggregateResult) else None
        outbox = step if isinstance(step, dict) else outbox
    np.testing.assert_array_equal(result.ring_sum, ring_sum([xs[c] for c in IDS if c != 15], 64))
    assert all(clients[c].graph_seed == server.graph_seed for c in IDS if c != 15)  # type: ignore[attr-defined]


def test_a_commitment_binds_the_coin_to_deployment_round_and_client() -> None:
    coin = bytes(range(32))
    h = coin_commitment(coin, deployment="d", round_id=1, client=2)
    assert h == coin_commitment(coin, deployment="d", round_id=1, client=2)
    others = {coin_commitment(coin, deployment="e", round_id=1, client=2),
              coin_commitment(coin, deployment="d", round_id=2, client=2),
              coin_commitment(coin, deployment="d", round_id=1, client=3),
              coin_commitment(bytes(32), deployment="d", round_id=1, client=2)}
    assert h not in others and len(others) == 4


def test_a_server_choosing_the_list_from_the_commitments_gets_no_advantage() -> None:
    """The server wants clients 10 and 11 to be neighbours (e.g. 11 is its accomplice). Against the
    unsigned protocol it just tries graph keys until they are: every try succeeds. Against the coin flip its
    only choice before the coins is the commitment list: it drops client 19 at advertise whenever 19's
    commitment "looks bad" (first byte odd). Over 200 rounds the event still occurs at the uniform rate
    4/9 (each client has 4 of 9 possible neighbours in H_{4,10}), within 4 standard deviations."""
    spec = RoundSpec(3, IDS, 5, 64)
    unsigned_hits = 0
    for i in range(20):  # the server-keyed graph: grind the key until the wish holds
        for attempt in range(200):
            graph = MaskingAggregator(neighbours=4, rng=SecureRNG.for_testing(f"key/{i}/{attempt}")).graph(spec)
            if 10 in graph.neighbours(11):
                unsigned_hits += 1
                break
    assert unsigned_hits == 20
    trials, hits = 200, 0
    agg = _agg()
    for i in range(trials):
        spec_i = RoundSpec(1000 + i, IDS, 5, 64)
        protocol = SecureRNG.for_testing(f"grind/{i}")
        clients = {c: agg.client(spec_i, c, np.zeros(5, dtype=np.uint64), rng=protocol.spawn(str(c))) for c in IDS}
        server = agg.server(spec_i)
        outbox = server.open()
        replies = {c: clients[c].handle(outbox[c]) for c in IDS}
        if wire.decode(replies[19]).blob("coin_commitment")[0] % 2:
            del replies[19]  # "19 dropped": the commitment list is the server's to choose
        for c, reply in replies.items():
            server.accept(c, reply)
        coin_out = server.close_stage()
        assert isinstance(coin_out, dict)
        _advance(server, clients, coin_out)  # the coins: the graph is drawn
        hits += 10 in server.graph.neighbours(11)  # type: ignore[attr-defined]
    p = 4 / 9
    sigma = (trials * p * (1 - p)) ** 0.5
    assert abs(hits - trials * p) <= 4 * sigma, (hits, trials * p)
