"""fedguard_train.config: typed sections, unknown keys named with the nearest valid one, YAML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedguard.errors import ConfigError
from fedguard_train.config import TrainConfig


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"federation": {"clinets": 3}}, "unknown key 'federation.clinets'; did you mean 'clients'?"),
        ({"trainig": {}}, "unknown key 'trainig'; did you mean 'training'?"),
        ({"training": {"zero_stage": 1}}, "training.zero_stage must be one of [0, 2, 3], got 1"),
        ({"adapter": {"r": "8"}}, "adapter.r must be an integer, got '8'"),
        ({"adapter": {"method": "qlora"}}, "adapter.method must be one of ['lora', 'p-tuning-v2', 'prompt-tuning', 'bottleneck']"),
        ({"data": {"source": "jsonl"}}, "source 'jsonl' needs a path"),
        ({"federation": {"rounds": 0, "clients": 0}}, "2 problems"),
        ({"adapter": {"target_modules": "q_proj"}}, "adapter.target_modules must be a list of strings"),
    ],
)
def test_bad_configs_name_the_problem(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(raw)
    assert message in str(info.value)


def test_yaml_round_trip_and_differences(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("federation:\n  clients: 4\nadapter:\n  target_modules: [q_proj, v_proj]\n")
    config = TrainConfig.from_yaml(path)
    assert config.federation.clients == 4 and config.adapter.target_modules == ("q_proj", "v_proj")
    again = TrainConfig.from_dict(config.to_dict())
    assert again == config
    more_rounds = TrainConfig.from_dict({**config.to_dict(), "federation": {**config.to_dict()["federation"], "rounds": 9}})
    assert config.differences(more_rounds) == []  # more rounds may be resumed
    other = TrainConfig.from_dict({**config.to_dict(), "seed": 5})
    assert config.differences(other) == ["seed"]


def test_yaml_problems_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        TrainConfig.from_yaml(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        TrainConfig.from_yaml(listed)


def test_shipped_example_configs_load_and_build_their_privacy_hooks() -> None:
    from fedguard_train.privacy import hooks_from_config

    root = Path(__file__).resolve().parents[2] / "examples"
    paths = sorted(root.glob("*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        config = TrainConfig.from_yaml(path)
        hooks = hooks_from_config(config)  # a bad dp:/watermark: section fails here, before any model loads
        assert len(hooks) == bool(config.dp) + bool(config.watermark)


def test_the_round_table_shows_privacy_columns_only_for_runs_that_have_them(tmp_path: Path) -> None:
    from fedguard_train.runner import _Table

    base = {"run_dir": str(tmp_path), "model": {"name_or_path": "tiny:gpt2"},
            "data": {"source": "jsonl", "path": str(tmp_path / "x.jsonl")}}
    plain = _Table(TrainConfig.from_dict(base))
    assert [c.key for c in plain.columns if c.key in ("epsilon", "wm_bits", "wm_owners")] == []
    private = _Table(TrainConfig.from_dict({**base, "dp": {"clip_norm": 1.0, "noise_multiplier": 1.0,
                                                            "target_delta": 1e-3},
                                            "watermark": {"bits": 32}}))
    row = private.format_row(private.shown({"round": 2, "epsilon": 1.5, "watermark_matched": [32, 30, 31],
                                            "watermark_bits": 32, "watermark_verified": 3,
                                            "bytes_up": 2048, "bytes_down": 1024}))
    assert "1.500" in row and "30/32" in row and "3/3" in row and "2.0" in row


def test_an_empty_yaml_is_refused_with_what_a_config_needs(tmp_path: Path) -> None:
    for text in ("", "# only a comment\n", "{}\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match="is empty; a run config needs at least run_dir, model, data, federation"):
            TrainConfig.from_yaml(path)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True])
def test_seeds_outside_the_range_are_refused(seed: object) -> None:
    with pytest.raises(ConfigError, match="seed must be an int(eger| in \\[0, 18446744073709551615\\]), got"):
        TrainConfig.from_dict({"seed": seed})


def test_mode_local_is_refused_at_load_naming_train_compare() -> None:
    with pytest.raises(ConfigError, match="train-compare"):
        TrainConfig.from_dict({"mode": "local"})


def test_privacy_sections_are_typed_and_checked_with_the_rest_of_the_config() -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({"dp": {"clip_norm": 1.0, "noise_multiplr": 1.0, "target_delta": 1e-3},
                               "watermark": {"bitz": 3}})
    text = str(info.value)
    assert "unknown key 'dp.noise_multiplr'; did you mean 'noise_multiplier'?" in text
    assert "unknown key 'watermark.bitz'; did you mean 'bits'?" in text
    with pytest.raises(ConfigError, match="dp.noise_multiplier is required"):
        TrainConfig.from_dict({"dp": {"clip_norm": 1.0, "target_delta": 1e-3}})
    with pytest.raises(ConfigError, match="needs a secure aggregator"):
        TrainConfig.from_dict({"dp": {"clip_norm": 1.0, "noise_multiplier": 1.0, "target_delta": 1e-3,
                                      "placement": "distributed"}})
    with pytest.raises(ConfigError, match="watermark needs in-process clients"):
        TrainConfig.from_dict({"watermark": {}, "training": {"nproc_per_node": 2}})
    config = TrainConfig.from_dict({"dp": {"clip_norm": 1.0, "noise_multiplier": 1.0, "target_delta": 1e-3},
                                    "watermark": {"bits": 8}})
    assert config.dp is not None and config.dp.accounting_backend == "pld" and config.watermark.bits == 8  # type: ignore[union-attr]
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_aggregator_options_are_typed_when_the_config_loads() -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({"federation": {"aggregator": "masking", "aggregator_options": {"neighbors": 2}}})
    assert "did you mean 'neighbours'?" in str(info.value)
    config = TrainConfig.from_dict({"federation": {"aggregator": "masking", "aggregator_options": {"neighbours": 2}}})
    assert config.federation.aggregator_options.neighbours == 2
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown trainer|trainer must be one of"):
        TrainConfig.from_dict({"trainer": "hommo"})
