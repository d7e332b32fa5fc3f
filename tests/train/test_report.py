"""The run report lists the other models a trainer scores beside the global one (FedOST's emulator and
zero-shot model) with their own tables, from the rows of metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from fedguard_train.report import companion_prefixes, write_report

CONFIG = {"model": {"name_or_path": "tiny"}, "adapter": {"method": "lora"}, "mode": "federated",
          "federation": {"aggregator": "plaintext", "clients": 2, "rounds": 2},
          "training": {"local_steps": 1, "batch_size": 1, "grad_accum": 1, "zero_stage": 0}}
SCORES = {"rouge1": 1.0, "rouge2": 2.0, "rougeL": 3.0, "bleu4": 4.0, "perplexity": 5.0}


def _scored(prefix: str, base: float) -> dict[str, float]:
    return {f"{prefix}{k}": base + v for k, v in SCORES.items()}


def test_companion_models_get_their_own_tables(tmp_path: Path) -> None:
    baseline = {"round": 0, **_scored("", 0.0), **_scored("zeroshot_", 10.0)}
    history = [{"round": 1, "train_loss": 1.0, "bytes_up": 2048, "bytes_down": 1024, "seconds": 1.0},
               {"round": 2, "train_loss": 0.5, "bytes_up": 2048, "bytes_down": 1024, "seconds": 1.0,
                **_scored("", 20.0), **_scored("emulator_", 40.0), **_scored("zeroshot_", 10.0)}]
    assert companion_prefixes([baseline, *history]) == ["zeroshot", "emulator"]
    text = write_report(tmp_path, config=CONFIG, history=history, baseline=baseline, partition=[],
                        counts={"trainable": 1, "total": 2, "share": 0.5}).read_text()
    emulator = text.split("## Also scored: `emulator`")[1].split("##")[0]
    assert "| 2 | 41.00 | 42.00 | 43.00 | 44.00 | 45.00 |" in emulator
    assert "| 0 |" not in emulator and "| 1 |" not in emulator  # scored in round 2 only
    zeroshot = text.split("## Also scored: `zeroshot`")[1].split("##")[0]
    assert "| 0 | 11.00 |" in zeroshot and "| 2 | 11.00 |" in zeroshot


def test_no_companion_tables_for_a_plain_run(tmp_path: Path) -> None:
    history = [{"round": 1, "train_loss": 1.0, **_scored("", 1.0)}]
    text = write_report(tmp_path, config=CONFIG, history=history, baseline={"round": 0, **_scored("", 0.0)},
                        partition=[], counts={"trainable": 1, "total": 2, "share": 0.5}).read_text()
    assert "Also scored" not in text
