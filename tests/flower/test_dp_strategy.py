"""fedguard's accountant inside Flower's own DP strategy wrapper (flwr.serverapp.strategy).

Proved: the accountant Flower composes into reports the ε fedguard's PrivacyAccountant computes for the
same Gaussian releases (and a tighter one than Flower's RDP accountant); it refuses a release over budget
before it happens (Flower then stops with PrivacyBudgetExhausted); its write-ahead ledger survives a
restart; and the runnable example (examples/flower_dp_strategy) stops at the budget on the Deployment
Engine with the ε per round the accountant predicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedguard_train.flower import flower_available

pytestmark = pytest.mark.skipif(not flower_available(), reason="flwr is not installed (pip install 'fedguard[flower]')")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flower_dp_strategy"


def _event(z: float = 3.0, k: int = 3, n: int = 3):  # type: ignore[no-untyped-def]
    from flwr.serverapp import GaussianPrivacyEvent

    return GaussianPrivacyEvent(noise_multiplier=z, sample_size=k, population_size=n)


def test_epsilon_is_fedguards_and_tighter_than_flowers_rdp(tmp_path: Path) -> None:
    from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

    from fedguard.dp import GaussianEvent, PrivacyAccountant
    from fedguard_train.flower.dp_strategy import FedguardAccountant

    ours = FedguardAccountant(population_size=100, target_delta=1e-5)
    reference = PrivacyAccountant(target_delta=1e-5, population=100)
    flower = RdpAccountant(PrivacyConfig(target_delta=1e-5, population_size=100,
                                         neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                         sampling_method=SamplingMethod.NO_AMPLIFICATION))
    for _ in range(5):
        ours.compose(_event(2.0, 10, 100))
        flower.compose(_event(2.0, 10, 100))
        reference.record(GaussianEvent(2.0))
        assert ours.epsilon_per_round[-1] == pytest.approx(reference.epsilon(), rel=1e-12)
    assert ours.get_epsilon(1e-5) < flower.get_epsilon(1e-5)
    spent = ours.get_privacy_spent()
    assert spent.num_releases == 5 and spent.accounting_method == "fedguard-pld"
    assert ours.get_epsilon(ours.get_delta(3.0)) <= 3.0 + 1e-9


def test_budget_refuses_before_release_and_flower_accepts_the_accountant(tmp_path: Path) -> None:
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

    from fedguard_train.flower.dp_strategy import FedguardAccountant

    accountant = FedguardAccountant(population_size=3, target_delta=1e-5, max_epsilon=3.0)
    strategy = DifferentialPrivacyServerSideFixedClipping(FedAvg(), noise_multiplier=3.0, clipping_norm=1.0,
                                                          num_sampled_clients=3, accountant=accountant)
    assert strategy.accountant is accountant
    released = 0
    while not accountant.would_exceed(_event()):
        accountant.compose(_event())
        released += 1
    assert released == 4 and accountant.get_epsilon(1e-5) <= 3.0 and accountant.would_exceed(_event())


def test_ledger_survives_a_restart(tmp_path: Path) -> None:
    from fedguard.errors import ConfigError
    from fedguard_train.flower.dp_strategy import FedguardAccountant

    ledger = tmp_path / "ledger.json"
    first = FedguardAccountant(population_size=3, target_delta=1e-5, ledger=ledger)
    for _ in range(3):
        first.compose(_event())
    restarted = FedguardAccountant(population_size=3, target_delta=1e-5, ledger=ledger)
    assert restarted.num_releases == 3 and restarted.get_epsilon(1e-5) == first.get_epsilon(1e-5)
    with pytest.raises(ConfigError, match="sampling"):
        FedguardAccountant(population_size=3, target_delta=1e-5, sampling="without-replacement")
    with pytest.raises(ConfigError):
        FedguardAccountant(population_size=3, target_delta=0.5)  # delta >= 1/N protects nobody


@pytest.mark.slow  # ~60 s of Flower polling; the accountant's logic is tested in process above
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_example_stops_at_the_budget_on_the_deployment_engine(tmp_path: Path) -> None:
    from fedguard.dp import GaussianEvent, PrivacyAccountant
    from fedguard_train.flower.launcher import FlowerProcesses

    result = tmp_path / "result.json"
    with FlowerProcesses(tmp_path / "flower", insecure_test_mode=True) as flower:
        flower.start_superlink()
        for k in range(3):
            flower.start_supernode(f"supernode-{k}", f"partition-id={k}")
        flower.flwr_run(EXAMPLE, timeout=500, run_config={
            "num-rounds": 10, "max-epsilon": 3.0, "noise-multiplier": 3.0,
            "ledger": str(tmp_path / "ledger.json"), "result": str(result)})
    out = json.loads(result.read_text())
    reference = PrivacyAccountant(target_delta=1e-5, population=3)
    expected = []
    for _ in range(4):
        reference.record(GaussianEvent(3.0))
        expected.append(reference.epsilon())
    assert out["releases"] == 4 and out["stopped"] and "max_epsilon" in out["stopped"]
    assert out["epsilon_per_round"] == pytest.approx(expected, rel=1e-12)
    assert PrivacyAccountant.load(tmp_path / "ledger.json").steps == 4
