"""What travels, in the trainer: the ring sized to need, quantised uploads with rotation (exact through a secure
aggregator), what central DP is told, distributed DP in the upload's ring, the Paillier pool between rounds, and
the refusals."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedguard.encoding import FixedPointSpec
from fedguard.errors import ConfigError, RingOverflowError
from fedguard.quantise import padded_length
from fedguard_train.checkpoint import load_latest
from fedguard_train.hooks import TrainerHook
from fedguard_train.privacy import hooks_from_config
from fedguard_train.trainers.homo import FedHomoLLM
from tests.train.conftest import tiny_config

pytestmark = pytest.mark.deepspeed

IID = {"partition": "iid"}


def _config(tmp_path: Path, task: Path, **federation: object):  # type: ignore[no-untyped-def]
    return tiny_config(tmp_path, task, federation={"clients": 3, "rounds": 1, **federation},
                       data={"source": "jsonl", "path": str(task), "max_examples": 48, "test_size": 6, **IID})


class _Encoding(TrainerHook):
    name = "encoding-spy"

    def __init__(self) -> None:
        self.seen: list[tuple[FixedPointSpec, int]] = []

    def on_encoding(self, spec: FixedPointSpec, dimension: int) -> None:
        self.seen.append((spec, dimension))


def test_an_8_bit_rotated_upload_through_masking_is_the_plaintext_round_exactly(tmp_path: Path, task: Path) -> None:
    vectors, per_value = {}, {}
    for name in ("plaintext", "masking"):
        config = _config(tmp_path / name, task, aggregator=name, upload_bits=8, rotation=True, clip=0.05)
        trainer = FedHomoLLM(config, quiet=True)
        assert (trainer.spec.ring_bits, trainer.spec.value_bits, trainer.spec.max_weight) == (8, 6, 1)
        result = trainer.run()
        ckpt = load_latest(Path(config.run_dir))
        assert ckpt is not None
        vectors[name] = ckpt.vector
        per_value[name] = result.history[0]["bytes_up"] / (3 * trainer.upload.travelling_length)
    np.testing.assert_array_equal(vectors["masking"], vectors["plaintext"])
    assert per_value["plaintext"] < 1.2  # one byte per value on the wire (+ framing of a small message)


def test_ring_auto_uses_32_bits_when_the_sum_fits_and_a_fixed_ring_that_cannot_hold_it_is_refused(
        tmp_path: Path, task: Path) -> None:
    trainer = FedHomoLLM(_config(tmp_path / "auto", task), quiet=True)
    assert trainer.spec.ring_bits == 32  # 3 clients x ~14 examples x 2^23 fits; the upload is not 64-bit
    trainer.close()
    with pytest.raises(RingOverflowError, match="ring_bits=32 would overflow"):
        FedHomoLLM(_config(tmp_path / "fixed", task, value_bits=30, ring_bits=32), quiet=True)
    with pytest.raises(ConfigError, match="upload_bits must be 8, 16, 32 or null"):
        _config(tmp_path / "bad", task, upload_bits=12)


def test_central_dp_is_told_the_padded_dimension_it_must_count(tmp_path: Path, task: Path) -> None:
    config = tiny_config(tmp_path, task, dp={"clip_norm": 0.5, "noise_multiplier": 1.0, "target_delta": 1e-3},
                         federation={"clients": 2, "rounds": 1, "upload_bits": 16, "rotation": True, "clip": 0.5})
    spy = _Encoding()
    trainer = FedHomoLLM(config, hooks=[*hooks_from_config(config), spy], quiet=True)
    (spec, dimension), = spy.seen
    d = trainer.layout.size
    assert dimension == padded_length(d + 1) >= d and spec is trainer.spec
    dp = trainer.hooks.hooks[0].dp  # type: ignore[attr-defined]
    assert dp.quantisation_excess == pytest.approx(math.sqrt(dimension) / spec.scale)
    trainer.close()


def test_distributed_dp_rides_a_rotated_16_bit_upload_exactly_through_masking_and_mpc(tmp_path: Path,
                                                                                        task: Path) -> None:
    from fedguard.rng import SecureRNG
    from fedguard_train.privacy import ClientDPHook

    dp = {"clip_norm": 0.05, "noise_multiplier": 0.5, "target_delta": 1e-3, "placement": "distributed"}
    vectors, rows, specs = {}, {}, {}
    for name, options in (("masking", {"threshold": 3}), ("mpc", {"backend": "simulated", "min_clients": 3})):
        config = tiny_config(tmp_path / name, task, dp=dp,
                             federation={"clients": 3, "rounds": 1, "aggregator": name, "upload_bits": 16,
                                         "rotation": True, "clip": 0.02, "aggregator_options": options},
                             data={"source": "jsonl", "path": str(task), "max_examples": 48, "test_size": 6, **IID})
        assert config.dp is not None
        hook = ClientDPHook(config.dp, n_clients=3, aggregator=name, aggregator_options=options,
                            noise_rng=lambda client: SecureRNG.for_testing(f"dp-noise/{client}"),
                            upload_bits=16, rotation=True)
        trainer = FedHomoLLM(config, hooks=[hook], quiet=True)
        encoding = trainer.hooks.ring_encoding()
        assert encoding is not None and encoding.spec.ring_bits == 16 and encoding.spec.clip == 0.02
        assert encoding.spec.value_bits < trainer.spec.value_bits  # value bits given up for the noise's room
        specs[name] = encoding.spec
        rows[name] = trainer.run().history
        ckpt = load_latest(Path(config.run_dir))
        assert ckpt is not None
        vectors[name] = ckpt.vector
        assert math.isfinite(rows[name][0]["epsilon"])
    # the noise travels in the upload's 16-bit word: the same bytes as the same upload without DP
    plain = tiny_config(tmp_path / "no-dp", task,
                        federation={"clients": 3, "rounds": 1, "aggregator": "masking", "upload_bits": 16,
                                    "rotation": True, "clip": 0.02, "aggregator_options": {"threshold": 3}},
                        data={"source": "jsonl", "path": str(task), "max_examples": 48, "test_size": 6, **IID})
    assert abs(FedHomoLLM(plain, quiet=True).run().history[0]["bytes_up"] - rows["masking"][0]["bytes_up"]) <= 16
    # the same noise streams: both secure aggregators reveal the same noised sum, bit for bit
    np.testing.assert_array_equal(vectors["mpc"], vectors["masking"])
    assert rows["mpc"][0]["epsilon"] == rows["masking"][0]["epsilon"]


def test_distributed_dp_noise_that_an_8_bit_upload_cannot_hold_is_refused(tmp_path: Path, task: Path) -> None:
    dp = {"clip_norm": 0.05, "noise_multiplier": 0.5, "target_delta": 1e-3, "placement": "distributed"}
    config = tiny_config(tmp_path, task, dp=dp,
                         federation={"clients": 3, "rounds": 1, "aggregator": "masking", "upload_bits": 8,
                                     "aggregator_options": {"threshold": 3}},
                         data={"source": "jsonl", "path": str(task), "max_examples": 48, "test_size": 6, **IID})
    with pytest.raises(RingOverflowError, match="does not fit a 8-bit upload.*use wider federation.upload_bits"):
        FedHomoLLM(config, hooks=hooks_from_config(config), quiet=True)


def test_paillier_pools_are_filled_before_local_training_and_the_round_stays_exact(tmp_path: Path, task: Path) -> None:
    vectors, rows = {}, {}
    for name, options in (("plaintext", {}), ("paillier", {"key_bits": 1024, "allow_insecure_test_keys": True,
                                                           "precompute": True})):
        config = _config(tmp_path / name, task, aggregator=name, aggregator_options=options, rounds=2)
        trainer = FedHomoLLM(config, quiet=True)
        result = trainer.run()
        rows[name] = result.history
        ckpt = load_latest(Path(config.run_dir))
        assert ckpt is not None
        vectors[name] = ckpt.vector
    np.testing.assert_array_equal(vectors["paillier"], vectors["plaintext"])
    assert all(row["offline_seconds"] > 0 for row in rows["paillier"])  # each round's pools, made offline
    assert all("offline_seconds" not in row for row in rows["plaintext"])


@pytest.mark.multiprocess
def test_paillier_pools_filled_in_the_background_during_local_training_keep_the_round_exact(
        tmp_path: Path, task: Path) -> None:
    """``precompute_background``: the trainer's precompute call only starts the filling (low-priority worker
    processes run it while the clients train); the clients' encryption waits for it; the model is the
    plaintext run's bit for bit."""
    vectors, rows = {}, {}
    for name, options in (("plaintext", {}), ("paillier", {"key_bits": 1024, "allow_insecure_test_keys": True,
                                                           "precompute": True, "precompute_background": True,
                                                           "workers": 2})):
        config = _config(tmp_path / name, task, aggregator=name, aggregator_options=options, rounds=2)
        rows[name] = FedHomoLLM(config, quiet=True).run().history
        ckpt = load_latest(Path(config.run_dir))
        assert ckpt is not None
        vectors[name] = ckpt.vector
    np.testing.assert_array_equal(vectors["paillier"], vectors["plaintext"])
    assert all(row["offline_seconds"] > 0 for row in rows["paillier"])  # the filling was started each round


def test_a_public_clip_smaller_than_the_update_is_counted_and_named_in_the_log(
        tmp_path: Path, task: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The upload's clip is a public config value: when local training moves values beyond it, the round's
    metrics give the share that was clipped and the log names the fix; with room to spare the share is 0."""
    tight = FedHomoLLM(_config(tmp_path / "tight", task, upload_bits=8, clip=1e-5), quiet=False)
    row = tight.run().history[0]
    assert row["clipped"] > 0.5  # AdamW moves nearly every value by about lr = 1e-2 per step, far beyond 1e-5
    out = capsys.readouterr().out
    assert "were clipped" in out and "raise federation.clip" in out and "±1e-05" in out
    roomy = FedHomoLLM(_config(tmp_path / "roomy", task, upload_bits=8, clip=1.0), quiet=False)
    assert roomy.run().history[0]["clipped"] == 0.0
    assert "were clipped" not in capsys.readouterr().out
