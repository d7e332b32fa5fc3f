"""FedHomoLLM end to end on tiny models with DeepSpeed: rounds, checkpoints, resume, hooks, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import PeftModel

from fedguard.errors import BudgetExceededError, ConfigError  # noqa: F401
from fedguard.params import AdapterLayout, flatten
from fedguard_train.checkpoint import load_latest
from fedguard_train.config import ModelConfig, TrainConfig
from fedguard_train.engine import TrainingDiverged
from fedguard_train.hooks import TrainerHook
from fedguard_train.models import load_base_model
from fedguard_train.runner import run_training
from fedguard_train.trainers.homo import FedHomoLLM
from tests.train.conftest import tiny_config

pytestmark = pytest.mark.deepspeed


def test_two_clients_two_rounds_end_to_end(tmp_path: Path, task: Path) -> None:
    config = tiny_config(tmp_path, task)
    result = run_training(config, quiet=True)
    run = Path(config.run_dir)
    assert [r["round"] for r in result.history] == [1, 2]
    for row in result.history:
        assert row["clients"] == 2 and row["bytes_up"] > 0 and row["bytes_down"] > 0
        assert {"rouge1", "rouge2", "rougeL", "bleu4", "perplexity"} <= set(row)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] + 0.5
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0, 1, 2]
    assert (run / "report.md").read_text().count("| 2 |") >= 1 and (run / "curves.png").stat().st_size > 1000
    assert TrainConfig.from_dict(json.loads((run / "config.json").read_text())) == config
    # the adapter checkpoint loads with plain peft, by someone who never heard of fedguard
    base, _ = load_base_model(ModelConfig(name_or_path="tiny:gpt2"), seed=config.seed)
    peft_model = PeftModel.from_pretrained(base, run / "checkpoints" / "round-0002" / "adapter")
    ckpt = load_latest(run)
    assert ckpt is not None and ckpt.round == 2
    layout = AdapterLayout.from_json(json.dumps(ckpt.state["layout"]))
    np.testing.assert_array_equal(flatten(peft_model, layout), ckpt.vector)


def test_resume_after_round_one_is_bit_identical(tmp_path: Path, task: Path) -> None:
    full = tiny_config(tmp_path / "a", task)
    FedHomoLLM(full, quiet=True).run()
    first = tiny_config(tmp_path / "b", task, federation={"clients": 2, "rounds": 1})
    FedHomoLLM(first, quiet=True).run()
    resumed_cfg = tiny_config(tmp_path / "b", task)
    result = FedHomoLLM(resumed_cfg, quiet=True).run(resume=True)
    assert [r["round"] for r in result.history] == [1, 2]
    a, b = load_latest(Path(full.run_dir)), load_latest(Path(resumed_cfg.run_dir))
    assert a is not None and b is not None and a.round == b.round == 2
    np.testing.assert_array_equal(a.vector, b.vector)


def test_resume_with_a_different_config_is_refused(tmp_path: Path, task: Path) -> None:
    FedHomoLLM(tiny_config(tmp_path, task, federation={"clients": 2, "rounds": 1}), quiet=True).run()
    changed = tiny_config(tmp_path, task, training={"local_steps": 2, "batch_size": 4, "lr": 0.5})
    with pytest.raises(ConfigError, match=r"config differs from the checkpoint's in \['training.lr'\]"):
        FedHomoLLM(changed, quiet=True).run(resume=True)


class _Recorder(TrainerHook):
    name = "recorder"

    def __init__(self, *, poison_round: int | None = None, refuse_round: int | None = None) -> None:
        self.calls: list[str] = []
        self.poison_round = poison_round
        self.refuse_round = refuse_round
        self.round = 0

    def on_round_start(self, round_id: int, participants: Any) -> None:
        self.round = round_id
        if round_id == self.refuse_round:
            raise BudgetExceededError(f"round {round_id} would exceed the budget")
        self.calls.append(f"start{round_id}")

    def local_loss(self, client_id: int, model: torch.nn.Module):  # type: ignore[no-untyped-def]
        if self.round == self.poison_round:
            return lambda step: step.loss * float("nan")
        return lambda step: step.loss + 0.0

    def client_update(self, update):  # type: ignore[no-untyped-def]
        self.calls.append(f"update{update.round}/{update.client_id}")
        return update

    def aggregate(self, round_id, mean, contributors):  # type: ignore[no-untyped-def]
        self.calls.append(f"aggregate{round_id}")
        return mean

    def on_round_end(self, round_id: int, model: torch.nn.Module, metrics: dict) -> None:
        metrics["recorder_rounds"] = round_id

    def state_dict(self) -> dict:
        return {"calls": list(self.calls)}

    def load_state_dict(self, state: dict) -> None:
        self.calls = list(state.get("calls", []))


def test_hooks_see_every_seam_and_their_state_is_checkpointed(tmp_path: Path, task: Path) -> None:
    hook = _Recorder()
    config = tiny_config(tmp_path, task)
    result = FedHomoLLM(config, hooks=[hook], quiet=True).run()
    assert hook.calls == ["start1", "update1/0", "update1/1", "aggregate1",
                          "start2", "update2/0", "update2/1", "aggregate2"]
    assert result.history[-1]["recorder_rounds"] == 2
    ckpt = load_latest(Path(config.run_dir))
    assert ckpt is not None and ckpt.state["hooks"]["recorder"]["calls"] == hook.calls


def test_nan_loss_aborts_the_round_and_keeps_the_last_checkpoint(tmp_path: Path, task: Path) -> None:
    config = tiny_config(tmp_path, task)
    trainer = FedHomoLLM(config, hooks=[_Recorder(poison_round=2)], quiet=True)
    with pytest.raises(TrainingDiverged, match="round 2 aborted: client 0: local loss became nan"):
        trainer.run()
    ckpt = load_latest(Path(config.run_dir))
    assert ckpt is not None and ckpt.round == 1
    np.testing.assert_array_equal(trainer.global_vector(), ckpt.vector)  # the model is back at the last good state


def test_an_exhausted_budget_stops_the_run_before_the_round_and_keeps_the_checkpoint(tmp_path: Path, task: Path) -> None:
    config = tiny_config(tmp_path, task)
    result = FedHomoLLM(config, hooks=[_Recorder(refuse_round=2)], quiet=True).run()
    assert result.stopped is not None and "stopped before round 2: round 2 would exceed" in result.stopped
    assert [r["round"] for r in result.history] == [1]
    assert load_latest(Path(config.run_dir)).round == 1  # type: ignore[union-attr]


@pytest.mark.parametrize("method", ["p-tuning-v2", "prompt-tuning"])
def test_prompt_methods_and_zero_stage_two_run(tmp_path: Path, task: Path, method: str) -> None:
    config = tiny_config(tmp_path, task, adapter={"method": method, "pre_seq_len": 4, "num_virtual_tokens": 4},
                         federation={"clients": 2, "rounds": 1},
                         training={"local_steps": 2, "batch_size": 4, "lr": 0.01, "zero_stage": 2, "grad_accum": 2},
                         model={"name_or_path": "tiny:llama"})
    result = FedHomoLLM(config, quiet=True).run()
    assert result.history[0]["clients"] == 2


def test_centralized_mode_trains_one_party_on_the_union(tmp_path: Path, task: Path) -> None:
    config = tiny_config(tmp_path, task, mode="centralized", federation={"clients": 2, "rounds": 1})
    trainer = FedHomoLLM(config, quiet=True)
    assert len(trainer.client_items) == 1
    assert len(trainer.client_items[0]) == 48 - 6
    assert trainer.run().history[0]["clients"] == 1


def test_compare_modes_writes_the_tables_1_2_layout(tmp_path: Path, task: Path) -> None:
    from fedguard_train.runner import compare_modes

    config = tiny_config(tmp_path, task, federation={"clients": 2, "rounds": 1})
    table = compare_modes(config, tmp_path / "cmp.md")
    assert list(table) == ["Federated", "Centralized", "Client-1", "Client-2", "Before training"]
    assert all(set(v) == {"rouge1", "rouge2", "rougeL", "bleu4", "perplexity"} for v in table.values())
    text = (tmp_path / "cmp.md").read_text()
    assert "| rougeL |" in text and "FATE-LLM (lora, ChatGLM-6B)" in text


def test_zero_stage_three_partitions_the_shared_model_and_still_aggregates(tmp_path: Path, task: Path) -> None:
    config = tiny_config(tmp_path, task, federation={"clients": 2, "rounds": 1},
                         training={"local_steps": 2, "batch_size": 4, "lr": 0.01, "zero_stage": 3})
    trainer = FedHomoLLM(config, quiet=True)
    before = trainer.global_vector()
    result = trainer.run()
    after = trainer.global_vector()
    assert result.history[0]["clients"] == 2 and "rougeL" in result.history[0]
    assert after.shape == before.shape and not np.array_equal(after, before)


@pytest.mark.multiprocess
def test_a_client_can_train_as_a_two_process_deepspeed_job(tmp_path: Path, task: Path) -> None:
    config = tiny_config(tmp_path, task, federation={"clients": 2, "rounds": 1},
                         training={"local_steps": 2, "batch_size": 2, "lr": 0.01, "nproc_per_node": 2})
    trainer = FedHomoLLM(config, quiet=True)
    global_vec = trainer.global_vector()
    loss, delta = trainer.train_in_torchrun(0, 1, global_vec)
    assert np.isfinite(loss) and delta.shape == global_vec.shape and np.abs(delta).max() > 0
    result = trainer.run()  # the whole round with torchrun clients
    assert result.history[0]["clients"] == 2


@pytest.mark.parametrize(
    ("aggregator", "options"),
    [
        ("masking", {}),
        ("paillier", {"key_bits": 1024, "allow_insecure_test_keys": True}),
        pytest.param("mpc", {"backend": "crypten", "n_parties": 2}, marks=pytest.mark.multiprocess),
    ],
)
def test_secure_aggregators_give_the_plaintext_round_exactly(
    tmp_path: Path, task: Path, aggregator: str, options: dict
) -> None:
    """Selected by `federation.aggregator`; the aggregate equals the plaintext one bit for bit."""
    vectors, uploads = {}, {}
    for name, opts in (("plaintext", {}), (aggregator, options)):
        config = tiny_config(tmp_path / name, task, federation={"clients": 3, "rounds": 1, "aggregator": name,
                                                                 "aggregator_options": opts},
                             data={"source": "jsonl", "path": str(task), "max_examples": 48, "test_size": 6,
                                   "partition": "iid"})
        trainer = FedHomoLLM(config, quiet=True)
        trainer.run()
        assert trainer.aggregator is None  # closed by run(): MPC's compute-party processes are gone
        ckpt = load_latest(Path(config.run_dir))
        assert ckpt is not None
        vectors[name] = ckpt.vector
        uploads[name] = ckpt.state["metrics"]["bytes_up"] / (3 * trainer.layout.size)  # bytes per value
    np.testing.assert_array_equal(vectors[aggregator], vectors["plaintext"])
    if aggregator == "paillier":
        # the trainer's fixed-point spec reaches the round, so values are packed in bounded slots: 31
        # ciphertexts of 256 bytes for 1,025 values with these 1024-bit test keys (~7.7 B/value, plus the key
        # holder's decrypted sum, 8 B/value over 3 clients: ~11 in all); ring mode needs 129 (~35 in all)
        assert uploads["paillier"] < 16, uploads


def test_the_adapters_initial_values_are_fixed_by_the_seed(tmp_path: Path, task: Path) -> None:
    # a model directory (as for SmolLM2): loading it draws no randomness, so the adapter's
    # initialisation must be seeded by the trainer itself
    base, tok = load_base_model(ModelConfig(name_or_path="tiny:llama"))
    base.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    model = {"name_or_path": str(tmp_path / "model")}
    adapter = {"method": "p-tuning-v2", "pre_seq_len": 4}
    torch.manual_seed(123)
    a = FedHomoLLM(tiny_config(tmp_path, task, model=model, adapter=adapter), quiet=True).global_vector()
    torch.manual_seed(456)
    b = FedHomoLLM(tiny_config(tmp_path, task, model=model, adapter=adapter), quiet=True).global_vector()
    c = FedHomoLLM(tiny_config(tmp_path, task, seed=4, model=model, adapter=adapter), quiet=True).global_vector()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
