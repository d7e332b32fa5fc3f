"""LAMP/TAG-style optimisation inversion: it recovers a client's text from a plaintext full gradient (B=1),
and fails — chance-level tokens, no matching gradient — on what masking and distributed DP leave the server,
both read from a real FedSGD round's captured server view (run_round, masking aggregator, ClientDPHook)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from attacks.inversion import score_recovery
from attacks.optimisation import LampConfig, lamp, observed_gradient
from attacks.protocol_view import fedsgd_round
from fedguard.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, EOS, LENGTH = 256, 0, 12
CONFIG = LampConfig(eos_id=EOS, steps=150, restarts=1, seed=0)
DP = {"placement": "distributed", "clip_norm": 1.0, "noise_multiplier": 1.0, "min_survivors": 3, "target_delta": 1e-3}


def gpt2_model(seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=128, n_layer=2, n_head=4,
                                      bos_token_id=EOS, eos_token_id=EOS))


def batch(seed: int, size: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (LENGTH,), generator=gen).tolist() + [EOS] for _ in range(size)]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return gpt2_model()


def test_plaintext_gradient_batch_of_one_is_recovered(model: torch.nn.Module) -> None:
    truth = batch(1)
    attention = model.config._attn_implementation
    out = lamp(model, observed_gradient(model, truth), [len(s) for s in truth], config=CONFIG)
    score = score_recovery(truth, out.sequences, vocab_size=VOCAB)
    assert score.token_accuracy >= 0.9 and score.rouge1 >= 90
    assert out.final_distance < 0.05  # the recovered batch's gradient matches the observed one
    assert model.config._attn_implementation == attention  # eager attention only while attacking
    assert all(p.grad is None for p in model.parameters())


def test_deterministic_with_a_seed(model: torch.nn.Module) -> None:
    truth = batch(2)
    cfg = LampConfig(eos_id=EOS, steps=20, discrete_every=10, restarts=1, seed=3)
    g = observed_gradient(model, truth)
    assert lamp(model, g, [13], config=cfg).sequences == lamp(model, g, [13], config=cfg).sequences


def test_masked_vector_and_dp_noised_sum_are_at_chance(tmp_path: Path, model: torch.nn.Module) -> None:
    clients = [batch(10 + k) for k in range(3)]
    names = [n for n, _ in model.named_parameters()]
    # masking: client 0's captured input is uniformly masked; nothing matches it
    view = fedsgd_round(model, clients, names, tmp_path / "masked", aggregator="masking",
                        aggregator_options={"threshold": 3})
    out = lamp(model, view.clients[0], [13], config=CONFIG, target="update")
    score = score_recovery(clients[0], out.sequences, vocab_size=VOCAB)
    assert score.exact == 0.0 and score.token_accuracy < 0.2
    assert out.final_distance > 0.5
    # masking + distributed DP (z = 1, C = 1): the revealed sum of 3 is drowned in the clients' noise
    view = fedsgd_round(model, clients, names, tmp_path / "dp", aggregator="masking",
                        aggregator_options={"threshold": 3}, dp=DP)
    assert view.dp and view.contributors == (0, 1, 2)
    union = [s for c in clients for s in c]
    out = lamp(model, view.mean, [13] * 3, config=CONFIG, target="update")
    score = score_recovery(union, out.sequences, vocab_size=VOCAB)
    assert score.exact == 0.0 and score.token_accuracy < 0.2
    assert out.final_distance > 0.5


def test_refusals_are_typed(model: torch.nn.Module) -> None:
    g = observed_gradient(model, batch(3))
    with pytest.raises(ConfigError, match="steps must be"):
        LampConfig(steps=0)
    with pytest.raises(ConfigError, match="lengths >= 2"):
        lamp(model, g, [1], config=CONFIG)
    with pytest.raises(ConfigError, match="zero"):
        lamp(model, {n: np.zeros(tuple(v.shape)) for n, v in g.items()}, [13], config=CONFIG)
    with pytest.raises(ConfigError, match="no parameters"):
        lamp(model, {"nope.weight": np.ones(3)}, [13], config=CONFIG)
    with pytest.raises(ConfigError, match="non-finite"):
        lamp(model, {n: torch.full_like(v, float("nan")) for n, v in g.items()}, [13], config=CONFIG)
    with pytest.raises(ConfigError, match="target must be"):
        lamp(model, g, [13], config=CONFIG, target="weights")  # type: ignore[arg-type]
