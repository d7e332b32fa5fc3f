"""DAGER-style inversion recovers a client's text exactly from a plaintext gradient (B=1 and B=4), through
the real server view; it fails where it should: too many tokens for the width, masked vectors, LoRA A of
rank 8 below the number of tokens, LoRA's first round (B = 0)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from attacks.inversion import (
    InversionConfig,
    batch_gradient,
    dager,
    row_space,
    score_recovery,
    target_parameters,
)
from fedguard.encoding import FixedPointSpec, dequantize, from_ring
from fedguard.errors import ConfigError
from fedguard.federation import aggregate_updates
from fedguard.federation.registry import make_aggregator
from fedguard.rng import SecureRNG
from fedguard.updates import ClientUpdate
from fedguard.wire import decode
from fedguard_train.capture import CapturingAggregator, ServerView

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, EOS, LENGTH = 256, 0, 12
CONFIG = InversionConfig(eos_id=EOS, max_len=16)
SPEC = FixedPointSpec(clip=1.0, value_bits=24, ring_bits=64, max_weight=16)


def gpt2_model(seed: int = 0) -> torch.nn.Module:
    """A GPT-2-style model wide enough (128) for a batch of 4 sequences of 13 tokens to be low-rank."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=128, n_layer=2, n_head=4,
                                      bos_token_id=EOS, eos_token_id=EOS))


def batches(seed: int, count: int, size: int) -> list[list[list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randint(1, VOCAB, (LENGTH,), generator=gen).tolist() + [EOS] for _ in range(size)]
            for _ in range(count)]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return gpt2_model()


def _recover(model: torch.nn.Module, batch: list[list[int]], **kwargs: object):  # type: ignore[no-untyped-def]
    names = target_parameters(model)[:2]
    out = dager(model, batch_gradient(model, batch, names), config=CONFIG, lengths_hint=[len(s) for s in batch],
                **kwargs)  # type: ignore[arg-type]
    return out, score_recovery(batch, out.sequences, vocab_size=VOCAB)


def test_batch_of_one_is_recovered_exactly(model: torch.nn.Module) -> None:
    scores = [_recover(model, b)[1] for b in batches(1, 10, 1)]
    assert np.mean([s.exact for s in scores]) >= 0.9
    assert np.mean([s.rouge1 for s in scores]) > 90


def test_batch_of_four_is_recovered(model: torch.nn.Module) -> None:
    results = [_recover(model, b) for b in batches(2, 4, 4)]
    assert all(out.informative for out, _ in results)
    assert np.mean([s.exact for _, s in results]) >= 0.5


def test_more_tokens_than_width_is_uninformative(model: torch.nn.Module) -> None:
    out, score = _recover(model, batches(3, 1, 16)[0])  # 16 × 13 = 208 tokens > 128 dimensions
    assert not out.informative and "no low-rank structure" in out.reason
    assert score.exact == 0.0
    assert score.token_accuracy < 0.05  # random guesses: about 1/256 of positions match


def _through_aggregator(tmp_path: Path, model: torch.nn.Module, name: str, batch_per_client: list[list[list[int]]]
                        ) -> tuple[Path, dict[str, tuple[int, ...]], list[ClientUpdate]]:
    names = target_parameters(model)[:2]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in names}
    updates = []
    for cid, batch in enumerate(batch_per_client):
        g = batch_gradient(model, batch, names)
        updates.append(ClientUpdate(cid, 1, np.concatenate([g[n].numpy().ravel() for n in names]), 1))
    inner = make_aggregator(name)
    view = ServerView(tmp_path / "server_view", inner)
    view.begin(1, np.zeros(1, dtype=np.float32))
    out = aggregate_updates(updates, CapturingAggregator(inner, view), SPEC, round_id=1, rng=SecureRNG.for_testing(2))
    view.record_mean(1, out.mean, out.contributors)
    return tmp_path / "server_view" / "round_0001", shapes, updates


def _unflatten(vector: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for n, shape in shapes.items():
        size = int(np.prod(shape))
        out[n] = vector[at:at + size].reshape(shape)
        at += size
    return out


def _captured_update(path: Path) -> np.ndarray:
    signed = from_ring(decode(path.read_bytes()).arrays["x"], SPEC.ring_bits)
    return dequantize(signed[:-1], SPEC, divisor=max(int(signed[-1]), 1))


NOISE = 1 / SPEC.scale  # the public quantisation step bounds the rounding noise per entry


def test_server_view_plaintext_recovers_each_client_masking_does_not(tmp_path: Path, model: torch.nn.Module) -> None:
    clients = [b for b in batches(4, 3, 1)]
    truth = [b[0] for b in clients]
    # plaintext: the server's view holds each client's (quantised) gradient: each text is recovered exactly
    directory, shapes, _ = _through_aggregator(tmp_path / "plain", model, "plaintext", clients)
    for cid in range(3):
        grads = _unflatten(_captured_update(directory / "input" / f"client_{cid}.msg"), shapes)
        out = dager(model, grads, config=CONFIG, noise_std=NOISE, lengths_hint=[len(truth[cid])])
        assert score_recovery([truth[cid]], out.sequences, vocab_size=VOCAB).exact == 1.0
    # masking: each client's captured vector is uniformly masked: no low-rank structure, chance level
    directory, shapes, _ = _through_aggregator(tmp_path / "masked", model, "masking", clients)
    for cid in range(3):
        grads = _unflatten(_captured_update(directory / "mask" / f"client_{cid}.msg"), shapes)
        out = dager(model, grads, config=CONFIG, noise_std=NOISE, lengths_hint=[len(truth[cid])])
        score = score_recovery([truth[cid]], out.sequences, vocab_size=VOCAB, seed=cid)
        assert not out.informative and score.exact == 0.0 and score.token_accuracy < 0.2
    # ...but the revealed sum of 3 clients is one gradient of the union batch: the texts come back, unattributed
    with np.load(directory / "aggregate.npz") as data:
        mean = data["mean"]
    out = dager(model, _unflatten(mean, shapes), config=CONFIG, noise_std=NOISE / 3)
    union = score_recovery(truth, out.sequences, vocab_size=VOCAB)
    assert union.exact == 1.0
    json.dumps(union.to_json())


def test_lora_rank_8_and_first_round() -> None:
    from peft import LoraConfig, get_peft_model

    base = gpt2_model(1)
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["c_attn"],
                                           fan_in_fan_out=True))
    names = target_parameters(lora)
    assert names[2] and "lora_A" in names[0]
    batch = batches(5, 1, 1)[0]
    # first round: B = 0, so the gradient of A is exactly zero
    out, score = _recover(lora, batch)
    assert not out.informative and "zero" in out.reason and score.exact == 0.0
    # after some training B != 0: the gradient of A has rank <= 8 < 12 visible tokens: the span misses them
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.02)
    out, score = _recover(lora, batch)
    assert out.rank[0] <= 8
    assert score.exact == 0.0


def test_row_space_and_config_refusals() -> None:
    rows = np.outer(np.arange(1.0, 4.0), np.ones(5))
    assert row_space(rows, 1e-6).shape == (5, 1)
    with pytest.raises(ConfigError, match="non-finite"):
        row_space(np.full((2, 2), np.nan), 1e-6)
    with pytest.raises(ConfigError, match="tau must be"):
        InversionConfig(tau=0.0)


def test_rope_model_without_positions_at_the_input_is_recovered() -> None:
    """Llama-style (SmolLM2's family): the first block's input carries no position; order comes from block 2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS))
    assert "v_proj" in target_parameters(llama)[0]  # values: the query of position 0 has no gradient
    for batch in batches(6, 2, 1) + batches(7, 1, 4):
        out, score = _recover(llama, batch)
        assert out.informative and score.exact == 1.0
