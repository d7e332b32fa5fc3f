"""The contract every :class:`~fedguard.federation.protocol.Aggregator` must pass.

Inherit it in a pytest class and implement :meth:`AggregatorContract.make_aggregator`::

    class TestMyAggregator(AggregatorContract):
        def make_aggregator(self, n_clients: int) -> Aggregator:
            return MyAggregator(threshold=max(1, n_clients // 2))

What it proves, on the same quantised inputs (uniform ring vectors: the hardest case for wrap-around):

* the ring sum equals the plaintext reference **exactly**, with no dropouts and under random dropout
  patterns at every stage (hypothesis), over exactly the clients that completed the input stage;
* a round in which too many clients drop raises :class:`ProtocolAbort`, and the server refuses to go on;
* fewer survivors than ``RoundSpec.min_contributors`` abort when the input stage closes, before anything
  is decoded, with a message stating both numbers;
* a foreign-round, out-of-order, replayed, misattributed or corrupted message raises
  :class:`ProtocolViolation` / :class:`MessageError`, changes nothing, and the round still completes
  with the exact sum;
* bytes on the wire are recorded for every stage;
* the aggregator accepts the round sizes it is tested with (:meth:`Aggregator.check_clients`), names itself
  (:attr:`Aggregator.label`), and :meth:`Aggregator.close` is idempotent and runs on leaving ``with``.

Set the class attribute ``fixed_point`` to run every round with that fixed-point encoding in its
:class:`RoundSpec` (and override :meth:`AggregatorContract.make_inputs` to draw inputs that obey it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedguard import wire
from fedguard.encoding import FixedPointSpec, ring_sum
from fedguard.errors import MessageError, ProtocolAbort, ProtocolViolation
from fedguard.federation.protocol import AggregateResult, Aggregator, ClientSide, RoundSpec, ServerSide
from fedguard.federation.transport import InProcessTransport
from fedguard.rng import SecureRNG


def _reencode(payload: bytes, **changes: object) -> bytes:
    msg = wire.decode(payload)
    fields = {f: getattr(msg, f) for f in ("kind", "round", "stage", "sender", "recipient", "meta", "arrays")}
    fields.update(changes)
    return wire.encode(wire.Message(**fields))


class AggregatorContract(ABC):
    """Abstract contract test; see the module docstring."""

    ring_bits: ClassVar[int] = 64
    vector_length: ClassVar[int] = 17
    min_clients: ClassVar[int] = 3
    max_clients: ClassVar[int] = 6
    fixed_point: ClassVar[FixedPointSpec | None] = None

    @abstractmethod
    def make_aggregator(self, n_clients: int) -> Aggregator:
        """The aggregator under test, configured for ``n_clients`` participants."""

    # -- helpers -------------------------------------------------------------------------------------
    def make_round(self, n_clients: int, round_id: int = 7, *, min_contributors: int = 1) -> RoundSpec:
        return RoundSpec(round_id, tuple(range(10, 10 + n_clients)), self.vector_length, self.ring_bits,
                         fixed_point=self.fixed_point, min_contributors=min_contributors)

    def run_by_hand(self, server: ServerSide, clients: dict[int, ClientSide], drop_at: dict[int, str],
                    closed: list[str]) -> AggregateResult:
        """Run a round stage by hand, appending each stage to ``closed`` just before closing it (so after a
        :class:`ProtocolAbort`, ``closed[-1]`` is the stage whose close refused to go on)."""
        stages = list(server.stages)
        outbox = server.open()
        while True:
            stage = server.stage
            for cid in sorted(outbox):
                if cid in drop_at and stages.index(drop_at[cid]) <= stages.index(stage):
                    continue
                try:
                    reply = clients[cid].handle(outbox[cid])
                except (ProtocolViolation, MessageError):
                    continue
                server.accept(cid, reply)
            closed.append(stage)
            step = server.close_stage()
            if isinstance(step, AggregateResult):
                return step
            outbox = step

    def make_inputs(self, spec: RoundSpec, seed: int) -> dict[int, np.ndarray]:
        rng = SecureRNG.for_testing(f"contract-inputs/{seed}")
        return {c: rng.ring_elements(spec.vector_length, spec.ring_bits) for c in spec.participants}

    def build(self, agg: Aggregator, spec: RoundSpec, inputs: dict[int, np.ndarray], seed: int = 0
              ) -> tuple[ServerSide, dict[int, ClientSide]]:
        rng = SecureRNG.for_testing(f"contract-protocol/{seed}")
        server = agg.server(spec, rng=rng.spawn("server"))
        clients = {c: agg.client(spec, c, inputs[c], rng=rng.spawn(f"client/{c}")) for c in spec.participants}
        return server, clients

    def expected_sum(self, spec: RoundSpec, inputs: dict[int, np.ndarray], contributors: set[int]) -> np.ndarray:
        return ring_sum([inputs[c] for c in sorted(contributors)], spec.ring_bits)

    def assert_exact(self, result: AggregateResult, spec: RoundSpec, inputs: dict[int, np.ndarray],
                     contributors: set[int]) -> None:
        assert result.contributors == tuple(sorted(contributors))
        expected = self.expected_sum(spec, inputs, contributors)
        assert result.ring_sum.dtype == np.uint64
        np.testing.assert_array_equal(result.ring_sum, expected)

    # -- configuration and lifecycle -------------------------------------------------------------------
    def test_check_clients_accepts_the_tested_round_sizes(self) -> None:
        for n in (self.min_clients, self.max_clients):
            self.make_aggregator(n).check_clients(n)

    def test_label_starts_with_the_name(self) -> None:
        agg = self.make_aggregator(self.min_clients)
        assert isinstance(agg.label, str) and agg.label.startswith(agg.name)

    def test_close_is_idempotent_and_runs_on_leaving_with(self) -> None:
        agg = self.make_aggregator(self.min_clients)
        with agg as entered:
            assert entered is agg
        agg.close()  # a second close does nothing

    # -- exact equality --------------------------------------------------------------------------------
    def test_sum_equals_plaintext_without_dropouts(self) -> None:
        for n in (self.min_clients, self.max_clients):
            spec = self.make_round(n)
            agg = self.make_aggregator(n)
            inputs = self.make_inputs(spec, seed=n)
            server, clients = self.build(agg, spec, inputs)
            outcome = InProcessTransport().run(server, clients)
            self.assert_exact(outcome.result, spec, inputs, set(spec.participants))
            assert not outcome.rejected

    def test_traffic_is_recorded_for_every_stage(self) -> None:
        n = self.min_clients
        spec = self.make_round(n)
        agg = self.make_aggregator(n)
        server, clients = self.build(agg, spec, self.make_inputs(spec, 1))
        outcome = InProcessTransport().run(server, clients)
        for stage in agg.stages:
            addressed = {r.client for r in outcome.traffic.records if r.stage == stage and r.direction == "down"}
            assert addressed, f"no client was addressed in stage {stage!r}"
            for c in addressed:  # every client the server wrote to in a stage answered with bytes
                assert outcome.traffic.bytes_down(client=c, stage=stage) > 0
                assert outcome.traffic.bytes_up(client=c, stage=stage) > 0
        # the input stage carries at least the ring vector itself
        assert outcome.traffic.bytes_up(stage=agg.input_stage) >= n * spec.vector_length * 8

    @settings(max_examples=25, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])
    @given(data=st.data())
    def test_sum_is_exact_under_random_dropouts(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(self.min_clients, self.max_clients), label="n_clients")
        agg = self.make_aggregator(n)
        spec = self.make_round(n)
        stages = list(agg.stages)
        # for each client: the stage index from which it is silent (len(stages) = never drops)
        silent_from = data.draw(
            st.lists(st.integers(0, len(stages)), min_size=n, max_size=n), label="silent_from"
        )
        seed = data.draw(st.integers(0, 2**16), label="seed")
        drop_at = {c: stages[i] for c, i in zip(spec.participants, silent_from) if i < len(stages)}
        alive = [
            {c for c, i in zip(spec.participants, silent_from) if i > s} for s in range(len(stages))
        ]
        inputs = self.make_inputs(spec, seed)
        server, clients = self.build(agg, spec, inputs, seed)
        # survives() is asked after the round: a protocol may draw what it depends on during the round
        # (the signed protocol's coin-flipped SecAgg+ graph); for the others the order does not matter
        try:
            outcome = InProcessTransport().run(server, clients, drop_at=drop_at)
        except ProtocolAbort:
            assert not agg.survives(spec, alive), "aborted although survives() says the round completes"
        else:
            assert agg.survives(spec, alive), "completed although survives() says the round aborts"
            self.assert_exact(outcome.result, spec, inputs, alive[stages.index(agg.input_stage)])

    # -- too many dropouts -----------------------------------------------------------------------------
    def test_too_many_dropouts_abort_cleanly(self) -> None:
        n = self.max_clients
        agg = self.make_aggregator(n)
        spec = self.make_round(n)
        t = agg.threshold(n)
        silent = set(spec.participants[: n - t + 1])  # only t - 1 remain
        checked = 0
        for s, stage in enumerate(agg.stages):
            alive = [set(spec.participants) - (silent if i >= s else set()) for i in range(len(agg.stages))]
            if agg.survives(spec, alive):
                continue  # this protocol does not need the silent clients from this stage on
            server, clients = self.build(agg, spec, self.make_inputs(spec, 3))
            with pytest.raises(ProtocolAbort) as info:
                InProcessTransport().run(server, clients, drop_at={c: stage for c in silent})
            assert info.value.round_id == spec.round_id
            # an aborted round refuses to continue: no partial result can be extracted afterwards
            with pytest.raises(ProtocolAbort):
                server.close_stage()
            checked += 1
        assert checked >= 1, "the protocol claims to survive every loss of n - t + 1 clients"

    # -- min_contributors ------------------------------------------------------------------------------
    def test_fewer_than_min_contributors_abort_before_anything_is_decoded(self) -> None:
        """``RoundSpec.min_contributors``: with one of n clients silent from the input stage on and
        ``min_contributors = n``, the round aborts when the input stage closes, before any stage that would
        decode (unmask, decrypt, open) is reached; the message states both numbers. With
        ``min_contributors = n - 1`` the same dropout still gives the exact sum (when the protocol's own
        threshold allows it)."""
        n = self.max_clients
        agg = self.make_aggregator(n)
        victim = self.make_round(n).participants[-1]
        drop_at = {victim: agg.input_stage}
        input_index = agg.stages.index(agg.input_stage)
        alive = [set(self.make_round(n).participants) - ({victim} if i >= input_index else set())
                 for i in range(len(agg.stages))]
        strict = self.make_round(n, min_contributors=n)
        assert not agg.survives(strict, alive)
        server, clients = self.build(agg, strict, self.make_inputs(strict, 11))
        closed: list[str] = []
        with pytest.raises(ProtocolAbort) as info:
            self.run_by_hand(server, clients, drop_at, closed)
        assert closed[-1] == agg.input_stage, f"aborted only when closing {closed[-1]!r}"
        text = str(info.value)
        assert f"only {n - 1} client" in text and f"min_contributors={n}" in text, text
        with pytest.raises(ProtocolAbort):  # and the server refuses to go on
            server.close_stage()
        loose = self.make_round(n, min_contributors=n - 1)
        inputs = self.make_inputs(loose, 12)
        server, clients = self.build(agg, loose, inputs)
        try:  # completes exactly when the protocol's own threshold allows it (asked after the round)
            result = self.run_by_hand(server, clients, drop_at, [])
        except ProtocolAbort:
            assert not agg.survives(loose, alive)
        else:
            assert agg.survives(loose, alive)
            self.assert_exact(result, loose, inputs, set(loose.participants) - {victim})

    # -- refused messages --------------------------------------------------------------------------------
    def _drive(self, n: int, attack_stage: int, attack: str) -> None:
        """Run a round by hand; at stage ``attack_stage`` inject a bad message, check it is refused with
        nothing changed, then finish the round and check the exact sum."""
        agg = self.make_aggregator(n)
        spec = self.make_round(n)
        inputs = self.make_inputs(spec, 5)
        server, clients = self.build(agg, spec, inputs)
        outbox = server.open()
        history: dict[int, list[bytes]] = {c: [] for c in spec.participants}
        index = 0
        while True:
            stage = server.stage
            victim = sorted(outbox)[0]
            for cid in sorted(outbox):
                if index == attack_stage and cid == victim and attack == "client-foreign-round":
                    bad = _reencode(outbox[cid], round=spec.round_id + 1)
                    with pytest.raises(ProtocolViolation):
                        clients[cid].handle(bad)
                if index == attack_stage and cid == victim and attack == "client-misaddressed":
                    other = sorted(outbox)[1]
                    with pytest.raises(ProtocolViolation):
                        clients[cid].handle(outbox[other])
                reply = clients[cid].handle(outbox[cid])
                history[cid].append(reply)
                if index == attack_stage and cid == victim:
                    before = server.received
                    if attack == "foreign-round":
                        with pytest.raises(ProtocolViolation):
                            server.accept(cid, _reencode(reply, round=spec.round_id + 1))
                    elif attack == "stage":
                        with pytest.raises(ProtocolViolation):
                            server.accept(cid, _reencode(reply, stage=stage + "-other"))
                    elif attack == "impersonation":
                        other = sorted(outbox)[1]
                        with pytest.raises(ProtocolViolation):
                            server.accept(other, reply)
                    elif attack == "bitflip":
                        flipped = bytearray(reply)
                        flipped[len(flipped) // 2] ^= 0x10
                        with pytest.raises(MessageError):
                            server.accept(cid, bytes(flipped))
                    elif attack == "earlier-stage" and index > 0:
                        with pytest.raises(ProtocolViolation):
                            server.accept(cid, history[cid][0])
                    assert server.received == before
                server.accept(cid, reply)
                if index == attack_stage and cid == victim and attack == "replay":
                    with pytest.raises(ProtocolViolation):
                        server.accept(cid, reply)
            step = server.close_stage()
            index += 1
            if isinstance(step, AggregateResult):
                self.assert_exact(step, spec, inputs, set(spec.participants))
                # after the round is over, even a valid-looking message is refused
                with pytest.raises(ProtocolViolation):
                    server.accept(victim, history[victim][-1])
                return
            outbox = step

    @pytest.mark.parametrize(
        "attack",
        ["foreign-round", "stage", "impersonation", "bitflip", "replay", "earlier-stage",
         "client-foreign-round", "client-misaddressed"],
    )
    def test_bad_messages_are_refused_and_change_nothing(self, attack: str) -> None:
        n = self.min_clients
        for stage_index in range(len(self.make_aggregator(n).stages)):
            self._drive(n, stage_index, attack)
