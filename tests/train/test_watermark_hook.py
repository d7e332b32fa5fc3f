"""The `watermark:` section: every client's watermark verifies after federated training on DeepSpeed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedguard.errors import ConfigError
from fedguard.rng import SecureRNG
from fedguard_train.trainers.homo import FedHomoLLM
from fedguard_train.watermarking import WatermarkHook
from tests.train.conftest import tiny_config

pytestmark = pytest.mark.deepspeed


def test_each_clients_watermark_is_embedded_through_federated_rounds(tmp_path: Path, task: Path) -> None:
    config = tiny_config(tmp_path, task, watermark={"bits": 24, "alpha": 0.1},
                         federation={"clients": 2, "rounds": 2},
                         training={"local_steps": 8, "batch_size": 4, "lr": 0.003})
    hook = WatermarkHook(config.watermark or {}, config=config, rng=SecureRNG.for_testing("wm-hook"))
    trainer = FedHomoLLM(config, hooks=[hook], quiet=True)
    assert any("ln" in n for n in trainer.layout.names)  # the norm scales travel with the adapter
    result = trainer.run()
    last = result.history[-1]
    # chance is 12 of 24 bits; on this 2-layer toy model after 16 local steps per client every client's
    # bits are far above chance (p < 0.02); the 1e-6 verdict on K=4 clients is shown with longer
    # training in tests/watermark/test_federated.py
    assert all(m >= 18 for m in last["watermark_matched"]), last
    assert last["watermark_max_p"] < 0.02, last
    key = Path(config.run_dir) / "keys" / "client-0.key"
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    assert not list((Path(config.run_dir) / "checkpoints").rglob("*.key"))  # keys never inside a checkpoint


def test_watermark_section_errors_are_typed(tmp_path: Path, task: Path) -> None:
    config = tiny_config(tmp_path, task)
    with pytest.raises(ConfigError, match="unknown key 'watermark.bitz'; did you mean 'bits'"):
        WatermarkHook({"bitz": 3}, config=config)
    with pytest.raises(ConfigError, match="watermark.target must be one of"):
        WatermarkHook({"target": "weights"}, config=config)


def test_stored_keys_of_another_configuration_are_refused_never_replaced(tmp_path: Path, task: Path) -> None:
    from fedguard.watermark import load_key

    config = tiny_config(tmp_path, task, watermark={"bits": 20, "key_dir": str(tmp_path / "keys")},
                         federation={"clients": 2, "rounds": 1})
    FedHomoLLM(config, hooks=[WatermarkHook(config.watermark or {}, config=config,  # type: ignore[arg-type]
                                            rng=SecureRNG.for_testing("k"))], quiet=True)
    kept = (tmp_path / "keys" / "client-0.key").read_bytes()
    more_bits = tiny_config(tmp_path, task, watermark={"bits": 24, "key_dir": str(tmp_path / "keys")},
                            federation={"clients": 2, "rounds": 1})
    with pytest.raises(ConfigError, match="n_bits is 20, the config says 24"):
        FedHomoLLM(more_bits, hooks=[WatermarkHook(more_bits.watermark or {}, config=more_bits)],  # type: ignore[arg-type]
                   quiet=True)
    more_clients = tiny_config(tmp_path, task, watermark={"bits": 20, "key_dir": str(tmp_path / "keys")},
                               federation={"clients": 3, "rounds": 1})
    with pytest.raises(ConfigError, match="holds watermark keys of clients \\[0, 1\\] but not"):
        FedHomoLLM(more_clients, hooks=[WatermarkHook(more_clients.watermark or {}, config=more_clients)],  # type: ignore[arg-type]
                   quiet=True)
    assert (tmp_path / "keys" / "client-0.key").read_bytes() == kept
    assert not (tmp_path / "keys" / "client-2.key").exists()
    assert load_key(tmp_path / "keys" / "client-0.key").n_bits == 20
