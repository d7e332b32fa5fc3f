"""Client sampling in the trainer (``federation.sample_rate`` / ``clients_per_round``) and what it does to
client-level DP: amplification for central Poisson sampling, the expected denominator, the noise-only round
of an empty sample, no amplification for a fixed-size sample or distributed noise, and the release guard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from fedguard.dp import PrivacyAccountant
from fedguard.errors import ConfigError
from fedguard_train.checkpoint import load_latest
from fedguard_train.privacy import LEDGER_FILE, ClientDPHook, hooks_from_config
from fedguard_train.trainers.homo import FedHomoLLM
from tests.train.conftest import tiny_config

pytestmark = pytest.mark.deepspeed

DP = {"clip_norm": 0.5, "noise_multiplier": 1.0, "target_delta": 1e-3}


def _fed(**kw: Any) -> dict[str, Any]:
    return {"clients": 4, "rounds": 2, **kw}


def _config(tmp_path: Path, task: Path, *, dp: dict[str, Any] | None = None, **fed: Any) -> Any:
    kw: dict[str, Any] = {"federation": _fed(**fed), "data__partition": "iid"}
    if dp is not None:
        kw["dp"] = dp
    return tiny_config(tmp_path, task, **kw)


# -- configuration --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("fed", "message"), [
    ({"sample_rate": 0.5, "clients_per_round": 2}, "not both"),
    ({"sample_rate": 0.0}, r"sample_rate must be a number in \(0, 1\], got 0.0"),
    ({"sample_rate": 1.5}, r"sample_rate must be a number in \(0, 1\], got 1.5"),
    ({"sample_rate": True}, r"sample_rate must be a number, got True"),
    ({"clients_per_round": 0}, r"clients_per_round must be an int in \[1, 4\], got 0 \(federation.clients=4\)"),
    ({"clients_per_round": 5}, r"clients_per_round must be an int in \[1, 4\], got 5"),
])
def test_bad_sampling_settings_are_config_errors(tmp_path: Path, task: Path, fed: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, task, **fed)


def test_dp_sampling_combinations_that_break_the_argument_are_refused(tmp_path: Path, task: Path) -> None:
    distributed = {**DP, "placement": "distributed", "clip_norm": 0.05}
    masking = {"aggregator": "masking", "aggregator_options": {"threshold": 2}}
    with pytest.raises(ConfigError, match="no amplification against it"):
        _config(tmp_path, task, dp=distributed, sample_rate=0.5, **masking)
    with pytest.raises(ConfigError, match="denominator 'participants' with federation.sample_rate"):
        _config(tmp_path, task, dp={**DP, "denominator": "participants"}, sample_rate=0.5)
    with pytest.raises(ConfigError, match=r"min_survivors must be <= federation.clients_per_round=2, got 3"):
        _config(tmp_path, task, dp={**distributed, "min_survivors": 3}, clients_per_round=2, **masking)
    with pytest.raises(ConfigError, match=r"dp.denominator must be one of \['expected', 'participants'\], got 'sampled'"):
        _config(tmp_path, task, dp={**DP, "denominator": "sampled"})


def test_poisson_sampling_needs_an_aggregator_that_runs_with_one_client(tmp_path: Path, task: Path) -> None:
    config = _config(tmp_path, task, sample_rate=0.5, aggregator="masking", aggregator_options={"threshold": 3})
    with pytest.raises(ConfigError, match=r"a Poisson sample may hold 1 client\(s\).*clients_per_round"):
        FedHomoLLM(config, quiet=True)
    assert not Path(config.run_dir, "checkpoints").exists()


def test_release_guard_uses_the_sampled_count(tmp_path: Path, task: Path) -> None:
    """Distributed DP with a fixed-size sample: the noise is planned for ``min_survivors`` (default: the
    sample size) and an aggregator that could reveal fewer is refused at construction."""
    dp = {**DP, "placement": "distributed", "clip_norm": 0.05, "noise_multiplier": 0.5}
    config = _config(tmp_path, task, dp=dp, clients_per_round=3, aggregator="masking",
                     aggregator_options={"threshold": 2})
    with pytest.raises(ConfigError, match=r"min_survivors=3.*reveals a sum from as few as 2 of 3 clients"):
        FedHomoLLM(config, hooks=hooks_from_config(config), quiet=True)
    hook = ClientDPHook(dp, n_clients=4, aggregator="masking", clients_per_round=3)
    assert hook.min_contributors == 3
    assert hook.dp.config.sampling == "fixed_size" and hook.dp.config.denominator == "participants"


# -- the sample ------------------------------------------------------------------------------------------
def test_samples_are_reproducible_sized_and_poisson(tmp_path: Path, task: Path) -> None:
    fixed = FedHomoLLM(_config(tmp_path / "f", task, clients_per_round=3, clients=6), quiet=True)
    again = FedHomoLLM(_config(tmp_path / "g", task, clients_per_round=3, clients=6), quiet=True)
    samples = [fixed.participants(r) for r in range(1, 301)]
    assert samples == [again.participants(r) for r in range(1, 301)]  # seed + round, not the trainer
    assert all(len(s) == 3 == len(set(s)) and s == sorted(s) and set(s) <= set(range(6)) for s in samples)
    # uniform without replacement: each client in 1/2 of the samples
    counts = np.bincount([c for s in samples for c in s], minlength=6)
    assert stats.chisquare(counts).pvalue > 1e-4
    assert len({tuple(s) for s in samples}) == math.comb(6, 3)  # every subset appears in 300 draws
    poisson = FedHomoLLM(_config(tmp_path / "p", task, sample_rate=0.3, clients=6), quiet=True)
    drawn = [poisson.participants(r) for r in range(1, 2001)]
    sizes = np.array([len(s) for s in drawn])
    # each client independently with probability q: size ~ Binomial(6, 0.3), incl. empty samples
    observed = np.bincount(sizes, minlength=7)
    pmf = stats.binom.pmf(np.arange(7), 6, 0.3)
    binned = np.r_[observed[:4], observed[4:].sum()]
    assert stats.chisquare(binned, np.r_[pmf[:4], pmf[4:].sum()] * len(drawn)).pvalue > 1e-4
    assert observed[0] > 0  # empty samples happen (P = 0.7^6 = 0.118)
    pairs = np.array([[c in s for c in range(6)] for s in drawn], dtype=float)
    assert abs(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1]) < 0.1  # independent clients
    assert FedHomoLLM(_config(tmp_path / "n", task), quiet=True).participants(7) == [0, 1, 2, 3]


def test_sampled_run_and_resume_are_bit_identical(tmp_path: Path, task: Path) -> None:
    full = _config(tmp_path / "a", task, sample_rate=0.5, rounds=3)
    a_rows = FedHomoLLM(full, quiet=True).run().history
    first = _config(tmp_path / "b", task, sample_rate=0.5, rounds=1)
    FedHomoLLM(first, quiet=True).run()
    resumed = _config(tmp_path / "b", task, sample_rate=0.5, rounds=3)
    b_rows = FedHomoLLM(resumed, quiet=True).run(resume=True).history
    assert [r["sampled"] for r in a_rows] == [r["sampled"] for r in b_rows]
    assert [r["clients"] for r in a_rows] == [r["sampled"] for r in a_rows]
    a, b = load_latest(Path(full.run_dir)), load_latest(Path(resumed.run_dir))
    assert a is not None and b is not None and a.round == b.round == 3
    np.testing.assert_array_equal(a.vector, b.vector)


# -- central DP with sampling ----------------------------------------------------------------------------
def _empty_round_config(tmp_path: Path, task: Path, **dp: Any) -> tuple[Any, int]:
    """A config with sample_rate 0.2 over 2 clients and the first round whose sample is empty."""
    config = _config(tmp_path, task, dp={**DP, **dp}, clients=2, sample_rate=0.2, rounds=3)
    probe = FedHomoLLM(tiny_config(tmp_path / "probe", task, federation=_fed(clients=2, sample_rate=0.2),
                                   data__partition="iid"), quiet=True)
    empty = [r for r in range(1, 4) if not probe.participants(r)]
    assert empty, "seed 3 gives an empty sample in rounds 1-3 (P = 0.64 each)"
    return config, empty[0]


def test_empty_poisson_sample_releases_noise_only_and_is_accounted(tmp_path: Path, task: Path) -> None:
    import dp_accounting

    config, empty = _empty_round_config(tmp_path, task)
    trainer = FedHomoLLM(config, hooks=hooks_from_config(config), quiet=True)
    before: dict[int, np.ndarray] = {}
    original = trainer._empty_round

    def spy(round_id: int) -> Any:
        before[round_id] = trainer.global_vector().copy()
        return original(round_id)

    trainer._empty_round = spy  # type: ignore[method-assign]
    rows = trainer.run().history
    row = rows[empty - 1]
    assert row["sampled"] == 0 and row["clients"] == 0 and math.isnan(row["train_loss"])
    # the noise-only update: N(0, (z·sens)²)/(q·N) per coordinate, sens = C + post-quantisation excess
    ledger = json.loads(Path(config.run_dir, LEDGER_FILE).read_text())["ledger"]
    assert len(ledger) == 3 and all(e["event"]["type"] == "poisson_sampled" for e in ledger)
    sens = ledger[empty - 1]["sensitivity"]
    assert 0.5 < sens < 0.5001
    expected_std = 1.0 * sens / (0.2 * 2)
    after = _vector_after(config, empty)
    delta = after - before[empty]
    assert delta.size > 1000
    assert np.std(delta) == pytest.approx(expected_std, rel=0.1)
    assert abs(np.mean(delta)) < 5 * expected_std / math.sqrt(delta.size)
    # epsilon in the table: three Poisson-sampled Gaussians, whatever the samples were
    reference = dp_accounting.pld.PLDAccountant()
    reference.compose(dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(1.0)), 3)
    assert rows[-1]["epsilon"] == pytest.approx(reference.get_epsilon(1e-3), rel=1e-9)
    assert [r["epsilon"] for r in rows] == sorted(r["epsilon"] for r in rows)


def _vector_after(config: Any, round_id: int) -> np.ndarray:
    """The global vector checkpointed after round ``round_id``."""
    return np.load(Path(config.run_dir, "checkpoints", f"round-{round_id:04d}", "global.npy"))


def test_epsilon_of_sampled_runs_equals_dp_accounting(tmp_path: Path, task: Path) -> None:
    import dp_accounting

    poisson = _config(tmp_path / "p", task, dp=DP, sample_rate=0.5, rounds=3)
    rows = FedHomoLLM(poisson, hooks=hooks_from_config(poisson), quiet=True).run().history
    for r, row in enumerate(rows, start=1):
        ref = dp_accounting.pld.PLDAccountant()
        ref.compose(dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.0)), r)
        assert row["epsilon"] == pytest.approx(ref.get_epsilon(1e-3), rel=1e-9)
    # the table's epsilon is the persisted ledger's
    on_disk = PrivacyAccountant.load(Path(poisson.run_dir, LEDGER_FILE))
    assert on_disk.epsilon() == rows[-1]["epsilon"]
    # a fixed-size sample is not amplified: each round is the full Gaussian mechanism
    fixed = _config(tmp_path / "f", task, dp=DP, clients_per_round=2, rounds=2)
    rows = FedHomoLLM(fixed, hooks=hooks_from_config(fixed), quiet=True).run().history
    ref = dp_accounting.pld.PLDAccountant()
    ref.compose(dp_accounting.GaussianDpEvent(1.0), 2)
    assert rows[-1]["epsilon"] == pytest.approx(ref.get_epsilon(1e-3), rel=1e-9)
    assert [r["sampled"] for r in rows] == [2, 2]


def test_expected_denominator_divides_by_q_times_n_not_the_sample(tmp_path: Path, task: Path) -> None:
    """With a noise-free (allow_non_private) central run, the released update is Σ clipped / (q·N): the
    same clients' updates give a step scaled by m/(q·N) against FedAvg's uniform mean."""
    dp = {"clip_norm": 1e-3, "noise_multiplier": 0.0, "target_delta": 1e-3, "allow_non_private": True}
    config = _config(tmp_path, task, dp=dp, sample_rate=0.5, rounds=1)
    hook = ClientDPHook(config.dp, n_clients=4, sample_rate=0.5)
    assert hook.dp.config.denominator == "expected" and hook.dp.config.sampling == "poisson"
    trainer = FedHomoLLM(config, hooks=[hook], quiet=True)
    start = trainer.global_vector().copy()
    chosen = trainer.participants(1)
    rows = trainer.run().history
    assert rows[0]["sampled"] == len(chosen)
    after = _vector_after(config, 1)
    step = float(np.linalg.norm((after - start).astype(np.float64)))
    # every update is clipped to 1e-3 (they are far larger); the sum's norm <= m·C, divided by q·N = 2
    assert 0 < step <= len(chosen) * 1e-3 / 2 * (1 + 1e-3)


def test_the_round_table_shows_the_sample_size_only_when_sampling(tmp_path: Path, task: Path) -> None:
    from fedguard_train.runner import _Table

    assert "sampled" not in [c.key for c in _Table(_config(tmp_path, task)).columns]
    table = _Table(_config(tmp_path, task, dp=DP, sample_rate=0.3))
    assert [c.key for c in table.columns][:3] == ["round", "train_loss", "sampled"]
    row = table.format_row(table.shown({"round": 2, "train_loss": float("nan"), "sampled": 0, "epsilon": 1.25}))
    assert row.split()[:3] == ["2", "nan", "0"] and "1.250" in row
