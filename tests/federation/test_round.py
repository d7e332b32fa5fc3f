"""run_round: the one federated round every trainer, the demo and the simulations run."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from fedguard.encoding import FixedPointSpec
from fedguard.errors import BudgetExceededError, InvalidUpdateError, ProtocolAbort
from fedguard.federation import aggregate_updates
from fedguard.federation.plaintext import PlaintextAggregator
from fedguard.federation.round import ClientResult, RoundHooks, run_round
from fedguard.rng import SecureRNG
from fedguard.updates import ClientUpdate

SPEC = FixedPointSpec(clip=1.0, value_bits=20, ring_bits=64, max_weight=1 << 10)
LOCAL = {c: np.linspace(-0.1, 0.1, 6).astype(np.float32) * (c + 1) for c in range(3)}


class Model:
    """A stand-in for a model: holds one vector, as a trainer's model holds its adapter."""

    def __init__(self, vector: np.ndarray) -> None:
        self.vector = vector.copy()
        self.loads: list[np.ndarray] = []

    def load(self, vector: np.ndarray) -> None:
        self.vector = vector.copy()
        self.loads.append(vector.copy())

    def step(self, client: int, start: np.ndarray) -> ClientResult:
        self.vector = start + LOCAL[client]  # the model now holds this client's local state
        return ClientResult(self.vector - start, 10 * (client + 1), float(client))


def test_the_round_is_weighted_fedavg_through_the_aggregator() -> None:
    start = np.zeros(6, dtype=np.float32)
    model = Model(start)
    result = run_round(1, start, [0, 1, 2], model.step, PlaintextAggregator(), SPEC, load=model.load,
                       rng=SecureRNG.for_testing("q"))
    updates = [ClientUpdate(c, 1, LOCAL[c], 10 * (c + 1)) for c in range(3)]
    reference = aggregate_updates(updates, PlaintextAggregator(), SPEC, round_id=1, rng=SecureRNG.for_testing("q"))
    np.testing.assert_array_equal(result.mean, reference.mean)  # same quantisation stream, same sum
    np.testing.assert_array_equal(result.global_vector, start + reference.mean)
    np.testing.assert_array_equal(model.vector, result.global_vector)  # the model holds the new global vector
    assert result.contributors == (0, 1, 2) and result.losses == {0: 0.0, 1: 1.0, 2: 2.0}
    assert result.bytes_up > 0 and result.bytes_down > result.aggregation.traffic.bytes_down()


def test_the_round_counts_each_clients_values_beyond_the_clip() -> None:
    """LOCAL[c] spans ±0.1·(c+1): at clip 0.15, client 0 keeps every value, clients 1 and 2 lose their ends
    (|x| > 0.15: 2 and 4 of 6 values); the counts are what quantisation clipped, not the protocol's business."""
    start = np.zeros(6, dtype=np.float32)
    tight = FixedPointSpec(clip=0.15, value_bits=20, ring_bits=64, max_weight=1 << 10)
    result = run_round(1, start, [0, 1, 2], Model(start).step, PlaintextAggregator(), tight,
                       rng=SecureRNG.for_testing("q"))
    assert dict(result.clipped) == {c: tight.clipped(LOCAL[c]) for c in range(3)} == {0: 0, 1: 2, 2: 4}
    assert FixedPointSpec(clip=1.0).clipped(np.array([0.5, -2.0, 1.0, -1.0, 1.5])) == 2  # ±clip itself is kept
    assert max(abs(float(result.mean.max())), abs(float(result.mean.min()))) <= 0.15 + 1 / tight.scale


class _Hooks(RoundHooks):
    def __init__(self, *, refuse: bool = False, poison: bool = False, abort: bool = False) -> None:
        self.calls: list[str] = []
        self.refuse, self.poison, self.abort = refuse, poison, abort

    def on_round_start(self, round_id: int, participants: Sequence[int]) -> None:
        self.calls.append(f"start{list(participants)}")
        if self.refuse:
            raise BudgetExceededError("no budget left")

    def client_update(self, update: ClientUpdate) -> ClientUpdate:
        self.calls.append(f"update{update.client_id}")
        return ClientUpdate(update.client_id, update.round, update.vector * 0.5, update.weight)

    def aggregate(self, round_id: int, mean: np.ndarray, contributors: Sequence[int]) -> np.ndarray:
        self.calls.append(f"aggregate{list(contributors)}")
        if self.abort:
            raise ProtocolAbort("the protocol gave up")
        return mean * np.float32(np.nan) if self.poison else mean


def test_hooks_run_at_their_seams_in_order() -> None:
    hooks = _Hooks()
    start = np.zeros(6, dtype=np.float32)
    plain = run_round(1, start, [0, 1], Model(start).step, PlaintextAggregator(), SPEC, rng=SecureRNG.for_testing("q"))
    halved = run_round(1, start, [0, 1], Model(start).step, PlaintextAggregator(), SPEC, hooks=hooks,
                       rng=SecureRNG.for_testing("q"))
    assert hooks.calls == ["start[0, 1]", "update0", "update1", "aggregate[0, 1]"]
    np.testing.assert_allclose(halved.mean, plain.mean / 2, atol=2 / SPEC.scale)


@pytest.mark.parametrize("failure", ["abort", "poison", "client"])
def test_a_failed_round_leaves_the_model_at_the_global_vector_not_a_clients_local_one(failure: str) -> None:
    start = np.full(6, 0.25, dtype=np.float32)
    model = Model(start)
    hooks = _Hooks(abort=failure == "abort", poison=failure == "poison")

    def step(client: int, vec: np.ndarray) -> ClientResult:
        if failure == "client" and client == 2:
            model.vector = vec + 1.0  # half-trained
            raise RuntimeError("client 2 crashed")
        return model.step(client, vec)

    expected = {"abort": ProtocolAbort, "poison": InvalidUpdateError, "client": RuntimeError}[failure]
    with pytest.raises(expected):
        run_round(3, start, [0, 1, 2], step, PlaintextAggregator(), SPEC, hooks=hooks, load=model.load)
    np.testing.assert_array_equal(model.vector, start)


def test_a_refused_round_trains_nobody_and_loads_nothing() -> None:
    start = np.zeros(6, dtype=np.float32)
    model = Model(start)
    trained: list[int] = []

    def step(client: int, vec: np.ndarray) -> ClientResult:
        trained.append(client)
        return model.step(client, vec)

    with pytest.raises(BudgetExceededError):
        run_round(1, start, [0, 1], step, PlaintextAggregator(), SPEC, hooks=_Hooks(refuse=True), load=model.load)
    assert trained == [] and model.loads == []


def test_too_few_survivors_abort_and_restore_the_global_vector() -> None:
    start = np.zeros(6, dtype=np.float32)
    model = Model(start)
    with pytest.raises(ProtocolAbort):
        run_round(1, start, [0, 1, 2], model.step, PlaintextAggregator(min_clients=3), SPEC, load=model.load,
                  drop_at={1: PlaintextAggregator.input_stage})
    np.testing.assert_array_equal(model.vector, start)
