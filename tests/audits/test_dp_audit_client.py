"""Client-level DP audit through the real trainer round (tiny models): the bound stays below the accountant's
ε for the correct mechanism and exceeds it when the mechanism is silently broken — central and distributed
placement, noise ÷ 10 and clipping skipped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from audits.dp.client import ClientAuditSettings, DPAuditResult, audit_client_level
from audits.dp.report import write_dp_report
from fedguard.errors import ConfigError
from fedguard.rng import SecureRNG
from tests.train.conftest import tiny_config, write_task

pytestmark = pytest.mark.deepspeed

# z = 3 over 2 rounds: epsilon(1e-5) = 1.87 (central, PLD), below the 3.48 ceiling of 200 canaries, so a
# broken mechanism can be caught; noise / 10 gives each canary a signal-to-noise ratio of ~4.7.
DP: dict[str, Any] = {"clip_norm": 0.5, "noise_multiplier": 3.0, "target_delta": 1e-5}
FED: dict[str, Any] = {"clients": 2, "rounds": 2}
EVAL = {"max_new_tokens": 2, "examples": 2, "every": 100}


@pytest.fixture
def task(tmp_path: Path) -> Path:
    return write_task(tmp_path / "task.jsonl")


def _audit(tmp_path: Path, task: Path, *, placement: str = "central", breaks: str | None = None,
           canaries: int = 200, **settings: Any) -> DPAuditResult:
    dp, fed = dict(DP), dict(FED)
    if placement == "distributed":
        dp["placement"] = "distributed"
        fed.update(aggregator="mpc", aggregator_options={"backend": "simulated"})
    config = tiny_config(tmp_path, task, dp=dp, federation=fed, eval=EVAL)
    return audit_client_level(config, ClientAuditSettings(canaries=canaries, breaks=breaks, **settings),  # type: ignore[arg-type]
                              run_dir=tmp_path / "audit-run", rng=SecureRNG.for_testing(f"canaries/{placement}"))


def test_central_dp_fedavg_correct_and_noise_broken(tmp_path: Path, task: Path) -> None:
    import dp_accounting

    correct = _audit(tmp_path / "ok", task)
    broken = _audit(tmp_path / "broken", task, breaks="noise")
    # the accountant's epsilon is that of 2 Gaussian rounds with z = 3 (the canaries are clients of the run)
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(3.0), 2)
    for r in (correct, broken):
        assert r.epsilon_accountant == pytest.approx(acc.get_epsilon(1e-5), rel=0.01)
        assert r.refutable and r.bound.ceiling == pytest.approx(3.48, abs=0.01)
        assert r.settings["rounds"] == 2 and r.settings["real_clients"] == 2
    assert correct.bound.epsilon <= correct.epsilon_accountant and not correct.violation
    assert broken.bound.epsilon > broken.epsilon_accountant and broken.violation
    # why: with a tenth of the noise the included canaries stand clear of the excluded ones
    gap = broken.scores[broken.included].mean() - broken.scores[~broken.included].mean()
    assert gap > 3 * broken.scores[~broken.included].std()


def test_distributed_dp_fedavg_correct_and_noise_broken(tmp_path: Path, task: Path) -> None:
    correct = _audit(tmp_path / "ok", task, placement="distributed")
    broken = _audit(tmp_path / "broken", task, placement="distributed", breaks="noise")
    for r in (correct, broken):
        assert any("min_survivors" in n for n in r.notes)  # noise planned for every participant
        assert 0 < r.epsilon_accountant < r.bound.ceiling
    assert not correct.violation
    assert broken.violation


def test_distributed_audit_through_masking_raises_the_threshold(tmp_path: Path, task: Path) -> None:
    config = tiny_config(tmp_path, task, dp={**DP, "placement": "distributed"}, eval=EVAL,
                         federation={**FED, "aggregator": "masking", "aggregator_options": {"threshold": 2}})
    result = audit_client_level(config, ClientAuditSettings(canaries=30), run_dir=tmp_path / "audit-run",
                                rng=SecureRNG.for_testing("masking"))
    need = 2 + int(result.included.sum())
    assert any(f"threshold raised to min_survivors={need}" in n for n in result.notes)
    assert not result.violation and result.epsilon_accountant > 0


def test_skipped_clipping_is_caught_with_canaries_above_the_clip_norm(tmp_path: Path, task: Path) -> None:
    broken = _audit(tmp_path, task, breaks="clip")
    assert broken.settings["canary_norm"] == 10.0  # the default under --break clip
    assert broken.violation


def test_report_files_and_refusals(tmp_path: Path, task: Path) -> None:
    result = _audit(tmp_path, task, canaries=40)
    paths = write_dp_report([result], tmp_path / "report")
    data = json.loads(paths.json.read_text())["audits"][0]
    assert data["canaries"] == 40 and data["ceiling"] == pytest.approx(result.bound.ceiling)
    assert len(data["scores_in"]) + len(data["scores_out"]) == 40
    text = paths.markdown.read_text()
    assert "ceiling" in text and f"{result.bound.ceiling:.3f}" in text
    assert paths.plots[0].stat().st_size > 1000
    # the run went to the audit's own directory; the config's run_dir is untouched
    assert (tmp_path / "audit-run" / "metrics.jsonl").is_file() and not (tmp_path / "run").exists()
    rows = [json.loads(line) for line in (tmp_path / "audit-run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train_loss"]) and r["canary_clients"] == int(result.included.sum()) for r in rows[1:])
    with pytest.raises(ConfigError, match="run_dir|already holds a run"):  # never over an existing run
        _audit(tmp_path, task, canaries=40)
    config = tiny_config(tmp_path, task, federation=FED)
    with pytest.raises(ConfigError, match="no dp: section"):
        audit_client_level(config, ClientAuditSettings(canaries=10), run_dir=tmp_path / "x")
    with pytest.raises(ConfigError, match="canaries"):
        ClientAuditSettings(canaries=1)
    with pytest.raises(ConfigError, match="--break"):
        ClientAuditSettings(breaks="typo")  # type: ignore[arg-type]
