"""The trainer as a user meets it: run directories that are never lost, typed one-line errors before any
model loads, resume from a moved directory, progress totals, baselines through the same client step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedguard.cli import main
from fedguard.errors import ConfigError, ProtocolAbort
from fedguard.federation.round import RoundResult
from fedguard_train.checkpoint import load_latest
from fedguard_train.hooks import LocalLoss, TrainerHook
from fedguard_train.runner import compare_modes, run_training
from fedguard_train.trainers.base import RunExistsError
from fedguard_train.trainers.homo import FedHomoLLM
from tests.train.conftest import tiny_config

pytestmark = pytest.mark.deepspeed


def _no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("a model was loaded before the configuration was checked")

    monkeypatch.setattr("fedguard_train.trainers.homo.load_base_model", refuse)


def test_a_finished_run_is_never_overwritten_without_being_told(tmp_path: Path, task: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny_config(tmp_path, task)
    run_training(config, quiet=True)
    run = Path(config.run_dir)
    before = {p: p.read_bytes() for p in [run / "metrics.jsonl", run / "config.json"]}
    with pytest.raises(RunExistsError, match="--resume.*--overwrite"):
        run_training(tiny_config(tmp_path, task, federation={"clients": 2, "rounds": 1}), quiet=True)
    assert {p: p.read_bytes() for p in before} == before
    assert load_latest(run).round == 2  # type: ignore[union-attr]
    # the command line says it in one line, exit status 2, no traceback
    path = tmp_path / "again.yaml"
    path.write_text(json.dumps(config.to_dict()))
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedguard: error:") and "--overwrite" in err and "Traceback" not in err
    # told to: a one-round run replaces it and leaves no stale round 2 behind
    run_training(tiny_config(tmp_path, task, federation={"clients": 2, "rounds": 1}), quiet=True, overwrite=True)
    rounds = [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1] and not (run / "checkpoints" / "round-0002").exists()


def test_bad_run_dirs_and_aggregators_fail_before_the_model_loads(tmp_path: Path, task: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _no_model_loads(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="is a regular file"):
        FedHomoLLM(tiny_config(tmp_path, task, run_dir=str(blocker / "run")), quiet=True)
    # a designated Paillier key holder who is not a participant: said at construction, not in round 1
    holder = tiny_config(tmp_path, task, federation={"clients": 3, "rounds": 1, "aggregator": "paillier",
                                                     "aggregator_options": {"key_bits": 1024, "key_holder": 5,
                                                                            "allow_insecure_test_keys": True}})
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="key_holder 5 is not a participant"):
        FedHomoLLM(holder, quiet=True)
    _no_model_loads(monkeypatch)
    # Paillier keeps two clients besides the key holder: 2 clients cannot run it; said at construction
    paillier = tiny_config(tmp_path, task, federation={"clients": 2, "rounds": 1, "aggregator": "paillier",
                                                       "aggregator_options": {"key_bits": 1024,
                                                                              "allow_insecure_test_keys": True}})
    with pytest.raises(ConfigError, match="2 clients|min_clients"):
        FedHomoLLM(paillier, quiet=True)
    # centralized mode is one party: no secure aggregator can hide one update
    masking = tiny_config(tmp_path, task, mode="centralized", federation={"clients": 3, "rounds": 1,
                                                                          "aggregator": "masking"})
    with pytest.raises(ConfigError):
        FedHomoLLM(masking, quiet=True)


def test_an_aborted_aggregation_leaves_the_global_adapter_in_the_model(tmp_path: Path, task: Path) -> None:
    class AbortSecondRound(TrainerHook):
        name = "abort"

        def aggregate(self, round_id: int, mean: np.ndarray, contributors: Any) -> np.ndarray:
            if round_id == 2:
                raise ProtocolAbort("too few clients survived", round_id=round_id)
            return mean

    trainer = FedHomoLLM(tiny_config(tmp_path, task), hooks=[AbortSecondRound()], quiet=True)
    with pytest.raises(ProtocolAbort):
        trainer.run()
    ckpt = load_latest(Path(trainer.config.run_dir))
    assert ckpt is not None and ckpt.round == 1
    np.testing.assert_array_equal(trainer.global_vector(), ckpt.vector)  # not client 1's local adapter


def test_a_moved_run_directory_resumes(tmp_path: Path, task: Path) -> None:
    FedHomoLLM(tiny_config(tmp_path / "a", task, federation={"clients": 2, "rounds": 1}), quiet=True).run()
    shutil.move(str(tmp_path / "a" / "run"), str(tmp_path / "moved"))
    moved = tiny_config(tmp_path, task, run_dir=str(tmp_path / "moved"))
    result = FedHomoLLM(moved, quiet=True).run(resume=True)
    assert [r["round"] for r in result.history] == [1, 2]
    assert json.loads((tmp_path / "moved" / "config.json").read_text())["run_dir"] == str(tmp_path / "moved")


class _Progress:
    def __init__(self) -> None:
        self.totals: list[int] = []
        self.steps = 0
        self.rows: list[int] = []

    def start(self, total_steps: int) -> None:
        self.totals.append(total_steps)

    def step(self, loss: float) -> None:
        self.steps += 1

    def row(self, values: dict[str, Any]) -> None:
        self.rows.append(values["round"])


def test_progress_totals_match_the_steps_taken_fresh_resumed_and_centralized(tmp_path: Path, task: Path) -> None:
    fresh = _Progress()
    FedHomoLLM(tiny_config(tmp_path / "a", task, federation={"clients": 2, "rounds": 1}), quiet=True).run(observer=fresh)
    assert fresh.totals == [1 * 2 * 2] and fresh.steps == 4 and fresh.rows == [0, 1]
    resumed = _Progress()
    FedHomoLLM(tiny_config(tmp_path / "a", task, federation={"clients": 2, "rounds": 3}), quiet=True).run(
        resume=True, observer=resumed)
    assert resumed.totals == [2 * 2 * 2] and resumed.steps == 8 and resumed.rows == [0, 1, 2, 3]
    central = _Progress()
    FedHomoLLM(tiny_config(tmp_path / "c", task, mode="centralized", federation={"clients": 3, "rounds": 1}),
               quiet=True).run(observer=central)
    assert central.totals == [1 * 1 * 2] and central.steps == 2


def test_the_local_loss_hook_sees_the_batch_and_the_logits(tmp_path: Path, task: Path) -> None:
    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    class Distil(TrainerHook):
        name = "distil"

        def local_loss(self, client_id: int, model: torch.nn.Module):  # type: ignore[no-untyped-def]
            def loss(step: LocalLoss) -> torch.Tensor:
                seen.append((tuple(step.batch["input_ids"].shape), tuple(step.outputs.logits.shape)))
                return step.loss + 0.0 * step.outputs.logits.float().pow(2).mean()

            return loss

    FedHomoLLM(tiny_config(tmp_path, task, federation={"clients": 2, "rounds": 1}), hooks=[Distil()], quiet=True).run()
    assert len(seen) == 4
    for inputs, logits in seen:
        assert logits[:2] == inputs and logits[2] > 1  # (batch, sequence, vocabulary)


class _ServerSide(FedHomoLLM):
    """A trainer whose server takes a model step after aggregation (as FedCoLLM's will)."""

    def setup(self) -> None:
        super().setup()
        self.server_model = np.zeros(3, dtype=np.float32)

    def server_step(self, round_id: int, result: RoundResult) -> np.ndarray:
        self.server_model = self.server_model + np.float32(round_id)
        return (result.global_vector * np.float32(0.5)).astype(np.float32)  # the base loads it

    def server_state(self) -> dict[str, np.ndarray]:
        return {"server_model": self.server_model}

    def load_server_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.server_model = arrays["server_model"]


def test_the_checkpoint_holds_the_state_after_the_server_step(tmp_path: Path, task: Path) -> None:
    trainer = _ServerSide(tiny_config(tmp_path, task, federation={"clients": 2, "rounds": 1}), quiet=True)
    trainer.run()
    ckpt = load_latest(Path(trainer.config.run_dir))
    assert ckpt is not None
    np.testing.assert_array_equal(ckpt.vector, trainer.global_vector())
    np.testing.assert_array_equal(ckpt.arrays["server_model"], np.ones(3, dtype=np.float32))
    again = _ServerSide(tiny_config(tmp_path, task, federation={"clients": 2, "rounds": 2}), quiet=True)
    again.run(resume=True)
    np.testing.assert_array_equal(again.server_model, np.full(3, 3.0, dtype=np.float32))  # 1 + 2


def test_train_compare_refuses_privacy_sections_it_would_not_apply(tmp_path: Path, task: Path) -> None:
    config = tiny_config(tmp_path, task, dp={"clip_norm": 0.5, "noise_multiplier": 1.0, "target_delta": 1e-3})
    with pytest.raises(ConfigError, match="does not apply a dp: section"):
        compare_modes(config, tmp_path / "cmp.md")
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").iterdir())


def test_a_torchrun_rank_builds_no_aggregator(tmp_path: Path, task: Path) -> None:
    config = tiny_config(tmp_path, task, federation={"clients": 2, "rounds": 1, "aggregator": "mpc",
                                                     "aggregator_options": {"n_parties": 2}})
    rank = FedHomoLLM(config, quiet=True, coordinator=False)
    assert rank.aggregator is None  # no MPC party processes were started for a training rank
    with pytest.raises(ConfigError, match="only trains clients"):
        rank.run()


def test_files_that_are_not_a_fedguard_run_are_never_removed(tmp_path: Path, task: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text('{"my": "own config"}')
    (project / "checkpoints").mkdir()
    (project / "checkpoints" / "model.pt").write_text("weights")
    config = tiny_config(tmp_path, task, run_dir=str(project), federation={"clients": 2, "rounds": 1})
    for kwargs in ({"overwrite": True}, {"resume": True}, {}):
        with pytest.raises(RunExistsError):
            run_training(config, quiet=True, **kwargs)
    assert (project / "checkpoints" / "model.pt").read_text() == "weights"
    assert (project / "config.json").read_text() == '{"my": "own config"}'


def test_overwrite_keeps_the_old_run_when_the_new_config_fails(tmp_path: Path, task: Path) -> None:
    config = tiny_config(tmp_path, task, federation={"clients": 2, "rounds": 1})
    run_training(config, quiet=True)
    broken = tiny_config(tmp_path, task, federation={"clients": 2, "rounds": 1, "aggregator": "paillier",
                                                     "aggregator_options": {"key_bits": 1024,
                                                                            "allow_insecure_test_keys": True}})
    with pytest.raises(ConfigError):
        run_training(broken, quiet=True, overwrite=True)  # 2 clients cannot run Paillier
    assert load_latest(Path(config.run_dir)).round == 1  # type: ignore[union-attr]
