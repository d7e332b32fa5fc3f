"""Watermark keys: secure seeds, a key file of its own (0600, versioned, checksummed), binding checks."""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest
import torch

from fedguard.errors import ConfigError, KeyMismatchError
from fedguard.rng import SecureRNG
from fedguard.watermark import (
    CorruptKeyError,
    MissingTargetError,
    SignKey,
    SignWatermark,
    load_key,
    make_backdoor_key,
    make_sign_key,
    save_key,
)
from fedguard.watermark.keys import key_to_json, projection_matrix, signature_bits
from fedguard.watermark.simulation import SimulationConfig, tiny_gpt2_lora

# tiny models run fastest on one thread (and do not fight xdist's other worker for the 2 cores)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_gpt2_lora(SimulationConfig(n_layer=2), 0)


@pytest.fixture(scope="module")
def key(model: torch.nn.Module) -> SignKey:
    return make_sign_key(model, bits=32, owner="alice", rng=SecureRNG.for_testing("keys/alice"))


def test_key_round_trips_through_its_file_with_mode_0600(key: SignKey, tmp_path) -> None:
    path = save_key(key, tmp_path / "alice.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key(path) == key


def test_an_existing_key_is_never_replaced_and_a_missing_directory_is_refused(key: SignKey, tmp_path) -> None:
    path = save_key(key, tmp_path / "k.key")
    before = path.read_bytes()
    other = make_sign_key(tiny_gpt2_lora(SimulationConfig(n_layer=2), 0), bits=24, rng=SecureRNG.for_testing("o"))
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        save_key(other, path)
    assert path.read_bytes() == before and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k.key"]  # no temporary file left behind
    with pytest.raises(ConfigError, match="does not exist"):
        save_key(key, tmp_path / "nowhere" / "k.key")


def test_key_file_holds_the_seed_not_the_projection(key: SignKey, tmp_path) -> None:
    path = save_key(key, tmp_path / "alice.key")
    doc = json.loads(path.read_text())
    dense = sum(b.bits * b.shapes[0][0] for b in key.blocks)  # what a dense E would need
    assert path.stat().st_size < 8 * dense
    assert set(doc) == {"format", "version", "key", "checksum"}
    assert "projection" not in json.dumps(doc)


def test_secret_material_is_a_deterministic_function_of_the_seed(key: SignKey) -> None:
    np.testing.assert_array_equal(signature_bits(key.seed, 32), key.signature())
    np.testing.assert_array_equal(projection_matrix(key.seed, 0, 64, 8), projection_matrix(key.seed, 0, 64, 8))
    assert not np.array_equal(projection_matrix(key.seed, 0, 64, 8), projection_matrix(key.seed, 1, 64, 8))


def test_default_seeds_come_from_the_os_and_differ_between_clients(model: torch.nn.Module) -> None:
    a = make_sign_key(model, bits=24)
    b = make_sign_key(model, bits=24)
    assert a.seed != b.seed and a.key_id != b.key_id
    assert np.mean(a.signature() == b.signature()) < 0.9


@pytest.mark.parametrize("edit", ["flip_seed_digit", "change_bits", "truncate", "not_json", "wrong_version"])
def test_corrupt_key_file_is_detected(key: SignKey, tmp_path, edit: str) -> None:
    path = save_key(key, tmp_path / "k.key")
    text = path.read_text()
    doc = json.loads(text)
    if edit == "flip_seed_digit":
        seed = doc["key"]["seed"]
        doc["key"]["seed"] = ("0" if seed[0] != "0" else "1") + seed[1:]
        text = json.dumps(doc)
    elif edit == "change_bits":
        doc["key"]["blocks"][0]["bits"] += 1
        text = json.dumps(doc)
    elif edit == "truncate":
        text = text[: len(text) // 2]
    elif edit == "not_json":
        text = "\x00garbage"
    else:
        doc["version"] = 99
        text = json.dumps(doc)
    path.write_text(text)
    with pytest.raises(CorruptKeyError, match="k.key"):
        load_key(path)


def test_missing_key_file_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_key(tmp_path / "nope.key")


def test_key_is_never_written_into_a_model_checkpoint(key: SignKey, model: torch.nn.Module, tmp_path) -> None:
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="checkpoint"):
        save_key(key, tmp_path / "ckpt" / "secret.key")
    assert not (tmp_path / "ckpt" / "secret.key").exists()


def test_key_is_refused_anywhere_under_a_checkpoint_tree(key: SignKey, model: torch.nn.Module, tmp_path) -> None:
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "keys" / "deeper").mkdir(parents=True)
    for where in (tmp_path / "ckpt" / "keys", tmp_path / "ckpt" / "keys" / "deeper"):
        with pytest.raises(ConfigError, match="inside its tree"):
            save_key(key, where / "secret.key")
        assert not (where / "secret.key").exists()
    # a fedguard checkpoints/ tree (latest.json at its root) is refused too; a run directory whose
    # config.json is the run configuration (no model_type) is not a checkpoint
    run = tmp_path / "run"
    (run / "checkpoints" / "keys").mkdir(parents=True)
    (run / "checkpoints" / "latest.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({"run_dir": str(run)}))
    with pytest.raises(ConfigError, match="latest.json"):
        save_key(key, run / "checkpoints" / "keys" / "k.key")
    (run / "keys").mkdir()
    assert save_key(key, run / "keys" / "k.key").exists()


def test_binding_to_a_model_with_other_targets_raises_key_mismatch(key: SignKey) -> None:
    other = tiny_gpt2_lora(SimulationConfig(n_layer=2, n_embd=32), 0)
    with pytest.raises(KeyMismatchError, match=r"shape \(32,\).*\(64,\)"):
        SignWatermark(key, other)


def test_binding_to_a_model_without_the_target_modules_raises(key: SignKey) -> None:
    shallow = tiny_gpt2_lora(SimulationConfig(n_layer=1), 0)
    with pytest.raises(MissingTargetError, match=r"transformer\.h\.1\.ln_1"):
        SignWatermark(key, shallow)


def test_lora_targets_on_a_model_without_lora_raise_missing_target() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    plain = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(MissingTargetError, match="no lora target"):
        make_sign_key(plain, bits=20, target="lora")


def test_backdoor_key_round_trips_and_regenerates_triggers(tmp_path) -> None:
    key = make_backdoor_key(48, excluded=[0], rng=SecureRNG.for_testing("keys/bd"))
    loaded = load_key(save_key(key, tmp_path / "bd.key"))
    assert loaded == key
    t1, r1 = key.triggers_and_responses()
    t2, r2 = loaded.triggers_and_responses()
    np.testing.assert_array_equal(t1, t2)
    np.testing.assert_array_equal(r1, r2)
    assert t1.shape == (16, 8) and r1.shape == (16, 4) and 0 not in t1 and 0 not in r1


def test_key_json_is_stable(key: SignKey) -> None:
    assert key_to_json(key) == key_to_json(key)
