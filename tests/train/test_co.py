"""FedCoLLM (trainer: co) on tiny random models: secure aggregation, the mutual-KD server step in each
direction, FedMKT's logits from real messages, two tokenisers, DP, resume, public data, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedguard import wire
from fedguard.errors import ConfigError
from fedguard_train.checkpoint import load_latest
from fedguard_train.config import DataConfig, TrainConfig
from fedguard_train.data import Example, load_wordnet
from fedguard_train.public_data import disjoint_pairs, lemma_of, load_public
from fedguard_train.trainers.co import FedCoLLM
from tests.train.conftest import UpdateNorms, tiny_config

SMALL_CO: dict[str, Any] = {"server_model": "tiny:llama:4", "small_layers": 1, "server_steps": 2, "top_k": 4,
                            "public_examples": 12, "public_seq_len": 16, "logits_examples": 6, "server_lr": 0.01}


def co_config(tmp_path: Path, task: Path, **overrides: Any) -> TrainConfig:
    """Small model: a tiny Llama (2 blocks) layer-dropped to 1 block; server LLM: a 4-block tiny Llama;
    same byte tokeniser; public data: the licence texts."""
    co = {**SMALL_CO, **overrides.pop("co", {})}
    return tiny_config(tmp_path, task, trainer="co", model={"name_or_path": "tiny:llama"}, co=co, **overrides)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # vocabulary maps are cached per session (the GPT-2 -> byte map takes ~20 s to build)
    monkeypatch.setenv("FEDGUARD_CACHE", str(tmp_path_factory.getbasetemp() / "co-cache"))


class Recording(FedCoLLM):
    """Records the aggregate the server step receives and the vector it dispatches."""

    def server_step(self, round_id: int, result: Any) -> np.ndarray:
        received = result.global_vector.copy()
        sent = super().server_step(round_id, result)
        self.seen = getattr(self, "seen", []) + [(received, sent.copy())]
        return sent


@pytest.mark.deepspeed
def test_masking_run_co_tunes_both_models_and_only_the_small_adapter_travels(tmp_path: Path, task: Path) -> None:
    config = co_config(tmp_path, task, federation={"clients": 2, "rounds": 2, "aggregator": "masking"},
                       co={"send_logits": True})
    trainer = Recording(config, quiet=True)
    llm_start = trainer.llm_vector().copy()
    llm_params = sum(p.numel() for p in trainer.llm.parameters())
    result = trainer.run()
    assert len(result.history) == 2
    for row in [result.baseline, *result.history]:
        assert {"rougeL", "bleu4", "perplexity", "llm_rougeL", "llm_bleu4", "llm_perplexity"} <= set(row)
    for row in result.history:
        assert row["server_steps"] == 2 and row["server_seconds"] > 0
        assert row["server_kd_to_llm"] > 0 and row["server_kd_to_small"] > 0
        # the logits broadcast is sized from its real wire message, once per client, and counted as down traffic
        assert row["logits_bytes_down"] == 2 * trainer.logits_message_bytes > 0
        assert row["bytes_down"] > row["logits_bytes_down"]
    # the server step changes the aggregate it received (LLM -> small) and the dispatched vector is the global one
    for received, sent in trainer.seen:
        assert not np.array_equal(received, sent)
    ckpt = load_latest(Path(config.run_dir))
    assert ckpt is not None and ckpt.round == 2
    np.testing.assert_array_equal(ckpt.vector, trainer.seen[-1][1])
    # the LLM's adapter moved (small -> LLM) and is checkpointed, with both optimisers' state
    assert not np.array_equal(ckpt.arrays["llm_adapter"], llm_start)
    assert any(k.startswith("llm_opt.") for k in ckpt.arrays) and any(k.startswith("small_opt.") for k in ckpt.arrays)
    # what travels up is the small adapter only: far less than the LLM's weights
    assert ckpt.vector.size == trainer.layout.size < llm_params
    assert result.history[0]["bytes_up"] / (2 * trainer.layout.size) < 40
    assert result.history[-1]["perplexity"] != result.baseline["perplexity"]
    assert result.history[-1]["llm_perplexity"] != result.baseline["llm_perplexity"]


@pytest.mark.deepspeed
def test_directions_choose_which_side_learns(tmp_path: Path, task: Path) -> None:
    """``to_llm``: the aggregate is dispatched unchanged; ``to_small``: the LLM's adapter stays; ``none``:
    neither moves. Repeated LLM -> small steps lower the KD loss (the small model moves towards the LLM)."""
    trainer = FedCoLLM(co_config(tmp_path, task, co={"directions": "to_small", "server_steps": 1,
                                                     "server_batch_size": 2, "lam": 5.0}), quiet=True)
    llm0, small0 = trainer.llm_vector().copy(), trainer.global_vector().copy()
    kd = []
    for r in range(1, 16):
        trainer.server_step(r, None)  # type: ignore[arg-type]  # the server step reads no client result
        kd.append(trainer.stats.server["server_kd_to_small"])
    np.testing.assert_array_equal(trainer.llm_vector(), llm0)
    assert not np.array_equal(trainer.global_vector(), small0)
    assert np.mean(kd[-5:]) < np.mean(kd[:5])

    for directions in ("to_llm", "none"):
        other = FedCoLLM(co_config(tmp_path / directions, task, co={"directions": directions}), quiet=True)
        llm0, small0 = other.llm_vector().copy(), other.global_vector().copy()
        sent = other.server_step(1, None)  # type: ignore[arg-type]
        np.testing.assert_array_equal(sent, small0)
        assert np.array_equal(other.llm_vector(), llm0) == (directions == "none")
        assert ("server_kd_to_llm" in other.stats.server) == (directions == "to_llm")


@pytest.mark.deepspeed
def test_fedmkt_logits_are_sparse_top_k_from_a_real_message_and_change_the_client_update(tmp_path: Path,
                                                                                          task: Path) -> None:
    trainer = FedCoLLM(co_config(tmp_path, task, co={"send_logits": True}), quiet=True)
    targets = trainer.client_targets
    assert targets is not None
    n, width, k = targets.ids.shape
    assert n == 6 and k == 4
    sums = targets.probs.sum(-1)[targets.mask]
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=2e-3, rtol=0)  # fp16 on the wire
    expected = wire.encoded_size(wire.Message(
        kind="co-logits", round=0, stage="dispatch", sender=wire.SERVER, recipient=wire.BROADCAST,
        meta={"top_k": 4, "temperature": 2.0},
        arrays={"ids": np.zeros((n, width, k), np.int32), "probs": np.zeros((n, width, k), np.float16),
                "mask": np.zeros((n, width), np.uint8)}))
    assert trainer.logits_message_bytes == expected
    vocab = len(trainer.tokenizer)
    assert trainer.logits_message_bytes < n * width * vocab * 4 / 4  # far below dense float32 logits
    start = trainer.global_vector()
    with_kd = trainer.local_train(1, 0, start).vector
    trainer.load(start)
    trainer._alone = True  # each client alone: no server, no logits
    without = trainer.local_train(1, 0, start).vector
    assert not np.array_equal(with_kd, without)
    trainer._alone = False
    rows = trainer.run_local()
    assert [r["client"] for r in rows] == [0, 1]


@pytest.mark.slow  # ~70 s building the GPT-2 -> byte vocabulary map; tests/train/test_hetero.py covers two tokenisers
@pytest.mark.deepspeed
def test_two_tokenisers_align_both_directions(tmp_path: Path, task: Path) -> None:
    """Small model: tiny GPT-2 with GPT-2's BPE; LLM: tiny Llama with the byte tokeniser. Each public item
    reads as the same text on both sides; targets cross through both vocabulary maps and alignments."""
    config = tiny_config(tmp_path, task, trainer="co", model={"name_or_path": "tiny:gpt2"},
                         federation={"clients": 2, "rounds": 1},
                         co={**SMALL_CO, "server_model": "tiny:llama", "small_layers": None,
                             "small_tokenizer": "gpt2", "alignment": "dtw", "send_logits": True,
                             "public_data": str(task.with_name("public.jsonl"))})
    public = [{"prompt": f'Define the noun "{w}".', "response": f"a {w} thing"} for w in ("kettle", "harbor", "tulip")]
    import json

    task.with_name("public.jsonl").write_text("".join(json.dumps(r) + "\n" for r in public))
    trainer = FedCoLLM(config, quiet=True)
    assert not trainer.same_tokenizer
    assert trainer.to_small_map is not None and trainer.to_llm_map is not None
    assert len(trainer.to_small_map) == len(trainer.llm_tokenizer) and len(trainer.to_llm_map) == len(trainer.tokenizer)
    for pair in trainer.public:
        small_text = trainer.tokenizer.decode(pair.small["input_ids"], skip_special_tokens=True)
        llm_text = trainer.llm_tokenizer.decode(pair.llm["input_ids"], skip_special_tokens=True)
        assert small_text == llm_text
        assert pair.llm_for_small is not None and pair.small_for_llm is not None
        assert len(pair.llm_for_small) == len(pair.small["input_ids"])
        assert pair.llm_for_small.max() < len(pair.llm["input_ids"])
        assert pair.small_for_llm.max() < len(pair.small["input_ids"])
        # labels: the response (and end of sequence) on both sides, the same text
        s_resp = trainer.tokenizer.decode([t for t in pair.small["labels"] if t >= 0], skip_special_tokens=True)
        l_resp = trainer.llm_tokenizer.decode([t for t in pair.llm["labels"] if t >= 0], skip_special_tokens=True)
        assert s_resp.strip() == l_resp.strip() and s_resp.strip().startswith("a ")
    result = trainer.run()
    row = result.history[0]
    assert np.isfinite(row["server_kd_to_llm"]) and row["server_kd_to_small"] > 0
    assert trainer.client_targets is not None
    assert int(trainer.client_targets.ids.max()) < len(trainer.tokenizer)  # in the small model's vocabulary


@pytest.mark.deepspeed
def test_resume_after_round_one_is_bit_identical(tmp_path: Path, task: Path) -> None:
    co = {"send_logits": True, "direction": "reverse"}
    full = co_config(tmp_path / "a", task, co=co)
    FedCoLLM(full, quiet=True).run()
    FedCoLLM(co_config(tmp_path / "b", task, co=co, federation={"clients": 2, "rounds": 1}), quiet=True).run()
    resumed = FedCoLLM(co_config(tmp_path / "b", task, co=co), quiet=True).run(resume=True)
    assert [r["round"] for r in resumed.history] == [1, 2]
    a, b = load_latest(Path(full.run_dir)), load_latest(tmp_path / "b" / "run")
    assert a is not None and b is not None and a.round == b.round == 2
    np.testing.assert_array_equal(a.vector, b.vector)
    assert set(a.arrays) == set(b.arrays) and "llm_adapter" in a.arrays
    for key in a.arrays:
        np.testing.assert_array_equal(a.arrays[key], b.arrays[key], err_msg=key)


@pytest.mark.deepspeed
def test_client_level_dp_clips_and_accounts_the_small_adapter(tmp_path: Path, task: Path) -> None:
    """The DP hook sees FedCoLLM's client update like FedHomoLLM's: the small adapter's vector, clipped."""
    from fedguard_train.privacy import hooks_from_config

    config = co_config(tmp_path, task, dp={"clip_norm": 0.05, "noise_multiplier": 1.0, "target_delta": 1e-3},
                       federation={"clients": 2, "rounds": 1})
    norms = UpdateNorms()
    trainer = FedCoLLM(config, hooks=[*hooks_from_config(config), norms], quiet=True)
    result = trainer.run()
    assert result.history[0]["epsilon"] > 0 and "server_kd_to_small" in result.history[0]
    assert len(norms.seen) == 2
    assert all(size == trainer.layout.size and norm <= 0.05 * (1 + 1e-4) for size, norm in norms.seen)


def test_public_data_shares_no_lemma_with_the_run() -> None:
    run = [Example('Define the noun "harbor".', "a port"), Example('Define the verb "run".', "move fast")]
    pool = [Example('Define the noun "run".', "a race"), Example('Define the noun "tulip".', "a flower"),
            Example('Define the adjective "Harbor".', "x")]
    assert [ex.prompt for ex in disjoint_pairs(pool, run)] == ['Define the noun "tulip".']
    assert lemma_of('Define the verb "Run".') == "run"
    if not Path("/usr/share/wordnet/data.noun").is_file():
        pytest.skip("WordNet (wordnet-base) is not installed")
    from fedguard_train.models import byte_tokenizer

    data = DataConfig(source="wordnet", max_examples=300, test_size=20)
    examples = load_wordnet(max_examples=300, seed=1)
    items = load_public("wordnet-disjoint", tokenizer=byte_tokenizer(), data=data, run_examples=examples, count=50,
                        seq_len=32, seed=2)
    assert len(items) == 50
    texts = {byte_tokenizer().decode(it["input_ids"]) for it in items}
    run_lemmas = {lemma_of(ex.prompt) for ex in examples}
    for text in texts:
        assert lemma_of(text) not in run_lemmas
    licences = load_public("common-licenses", tokenizer=byte_tokenizer(), data=data, run_examples=examples, count=5,
                           seq_len=32, seed=2)
    assert len(licences) == 5 and all(it["labels"] == it["input_ids"] and len(it["input_ids"]) == 32 for it in licences)


def test_bad_co_configs_are_refused(tmp_path: Path, task: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'co.lamda'; did you mean 'lam'"):
        co_config(tmp_path, task, co={"lamda": 1.0})
    with pytest.raises(ConfigError, match="applies to trainer 'co' only"):
        tiny_config(tmp_path, task, co={"lam": 1.0})
    with pytest.raises(ConfigError, match="zero_stage = 0"):
        co_config(tmp_path, task, training={"local_steps": 1, "batch_size": 4, "zero_stage": 2})
    with pytest.raises(ConfigError, match="co.directions must be one of"):
        co_config(tmp_path, task, co={"directions": "sideways"})
    with pytest.raises(ConfigError) as err:
        co_config(tmp_path, task, co={"server_steps": -1, "lam": -1, "temperature": 0, "top_k": 0})
    assert all(key in str(err.value) for key in ("server_steps", "lam", "temperature", "top_k"))
    with pytest.raises(ConfigError, match="neither 'common-licenses'"):
        FedCoLLM(co_config(tmp_path, task, co={"public_data": str(tmp_path / "missing.txt")}), quiet=True)


def test_the_smollm2_example_config_loads() -> None:
    config = TrainConfig.from_yaml(Path(__file__).resolve().parents[2] / "examples" / "co_smollm2.yaml")
    assert config.trainer == "co" and config.co is not None and config.co.small_layers == 8
    assert config.federation.aggregator == "masking" and config.co.server_model == "smollm2"


@pytest.mark.deepspeed
def test_selective_transfer_lets_only_the_lower_nll_side_teach(tmp_path: Path, task: Path) -> None:
    """FedMKT's DualMinCE: a small model made far worse than the LLM (its adapter blown up) teaches the LLM
    nothing (KD to the LLM exactly 0), while the LLM still teaches it; summed NLLs match the models' own loss."""
    from fedguard_train.trainers.co import sequence_nll

    trainer = FedCoLLM(co_config(tmp_path, task, co={"selective": True, "server_steps": 3}), quiet=True)
    small, llm, _, _ = trainer._batch(trainer.public[:3])
    with torch.no_grad():
        out = trainer.model(**small)
        tokens = int((small["labels"][:, 1:] != -100).sum())
        torch.testing.assert_close(sequence_nll(out.logits, small["labels"]).sum() / tokens, out.loss)
    trainer.load(np.full(trainer.layout.size, 3.0, dtype=np.float32))
    trainer.server_step(1, None)  # type: ignore[arg-type]
    stats = trainer.stats.server
    assert stats["server_small_teaches"] == 0.0
    assert stats["server_kd_to_llm"] == 0.0 and stats["server_kd_to_small"] > 0


@pytest.mark.deepspeed
def test_the_server_step_leaves_watermarked_norm_scales_alone_and_the_marks_verify(tmp_path: Path, task: Path) -> None:
    """The watermark hook runs in FedCoLLM's client step like FedHomoLLM's. The server's mutual-KD step moves
    the small adapter after every aggregation; with the marks in the norm scales it must not train those scales
    (it has no key to re-embed them): the dispatched vector's scale entries equal the aggregate's, bit for bit,
    while the adapter's entries move, and every client's mark verifies after two co-tuned rounds (chance: 12 of
    24 bits; ``invariant`` mode reads the scales alone — ``gram`` mode also reads the projections the server's
    LoRA step moves, docs/co.md)."""
    from fedguard.rng import SecureRNG
    from fedguard_train.watermarking import WatermarkHook

    config = co_config(tmp_path, task, watermark={"bits": 24, "alpha": 0.1, "mode": "invariant"},
                       federation={"clients": 2, "rounds": 2},
                       training={"local_steps": 8, "batch_size": 4, "lr": 0.003})
    hook = WatermarkHook(config.watermark or {}, config=config, rng=SecureRNG.for_testing("wm-co"))
    trainer = Recording(config, hooks=[hook], quiet=True)
    last = trainer.run().history[-1]
    assert "server_kd_to_small" in last and trainer.server_frozen
    scale = np.zeros(trainer.layout.size, dtype=bool)
    for name in trainer.layout.names:
        if "lora" not in name:
            scale[trainer.layout.slice_of(name)] = True
    assert scale.any() and (~scale).any()
    for received, sent in trainer.seen:
        np.testing.assert_array_equal(received[scale], sent[scale])
        assert not np.array_equal(received[~scale], sent[~scale])
    assert all(m >= 18 for m in last["watermark_matched"]), last
    assert last["watermark_max_p"] < 0.02, last
