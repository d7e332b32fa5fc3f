"""`fedguard attack inversion|membership --run` and `fedguard audit leakage --run` on a captured tiny run:
reports written (JSON, Markdown with redacted recoveries, PNG), deterministic with a seed, typed refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedguard.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def captured_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedguard_train.runner import build_trainer
    from tests.train.conftest import tiny_config, write_task

    tmp = tmp_path_factory.mktemp("leak")
    cfg = tiny_config(tmp, write_task(tmp / "task.jsonl"), capture=True, federation={"clients": 2, "rounds": 1})
    build_trainer(cfg, quiet=True).run()
    return Path(cfg.run_dir)


def test_attack_inversion_writes_a_report(captured_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "inv"
    assert main(["attack", "inversion", "--run", str(captured_run), "--out", str(out), "--quiet"]) == 0
    data = json.loads((out / "inversion.json").read_text())
    targets = {r["target"] for r in data["inversion"]}
    assert targets == {"client 0", "client 1", "aggregate"}
    for r in data["inversion"]:
        assert 0.0 <= r["exact"] <= 1.0 and r["n_true_sequences"] > 0
    assert (out / "inversion_inversion.png").stat().st_size > 0
    md = (out / "inversion.md").read_text()
    assert "SERVER VIEW CAPTURED" in md and "| round | target |" in md


def test_attack_inversion_lamp_method(captured_run: Path, tmp_path: Path) -> None:
    """``--method lamp``: LAMP/TAG gradient matching on every captured input and the aggregate (a few steps:
    the tiny run's multi-step LoRA updates are not expected to be inverted, the report must say how far off)."""
    out = tmp_path / "lamp"
    assert main(["attack", "inversion", "--run", str(captured_run), "--out", str(out), "--quiet", "--method", "lamp",
                 "--lamp-steps", "4"]) == 0
    data = json.loads((out / "inversion.json").read_text())
    assert {r["method"] for r in data["inversion"]} == {"lamp"}
    assert {r["target"] for r in data["inversion"]} == {"client 0", "client 1", "aggregate"}
    for r in data["inversion"]:
        assert 0.0 <= r["gradient_distance"] <= 3.0 and 0.0 <= r["token_accuracy"] <= 1.0
    assert "LAMP/TAG-style" in (out / "inversion.md").read_text()


def test_attack_membership_global_and_client_update(captured_run: Path, tmp_path: Path) -> None:
    args = ["attack", "membership", "--run", str(captured_run), "--n-boot", "50", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "membership.json").read_text())
    b = json.loads((tmp_path / "b" / "membership.json").read_text())
    assert a["membership"] == b["membership"]  # deterministic with a seed
    attacks = {r["attack"] for r in a["membership"][0]["results"]}
    assert {"loss", "zlib", "min_k", "min_k_pp", "ref", "rmia"} <= attacks
    assert (tmp_path / "a" / "membership_roc.png").is_file()
    assert main([*args, "--client", "1", "--out", str(tmp_path / "c")]) == 0
    c = json.loads((tmp_path / "c" / "membership.json").read_text())
    assert "client 1" in c["membership"][0]["target"]


def test_audit_leakage_runs_the_suite(captured_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "audit"
    assert main(["audit", "leakage", "--run", str(captured_run), "--out", str(out), "--n-boot", "50",
                 "--quiet"]) == 0
    data = json.loads((out / "leakage.json").read_text())
    assert data["server_view_captured"] and data["membership"] and data["inversion"]
    md = (out / "leakage.md").read_text()
    assert "## Membership inference" in md and "## Update inversion" in md


def test_redaction_keeps_only_the_first_words() -> None:
    from audits.leakage import redact

    assert redact("one two three four five") == "one two three …"
    assert redact("short text") == "short text"


def test_refusals_are_typed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["attack", "inversion", "--run", str(tmp_path), "--quiet"]) == 2
    assert "no readable run config.json" in capsys.readouterr().err
