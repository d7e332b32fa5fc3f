"""Backdoor watermark: trigger samples mixed into batches, black-box verification by generation."""

from __future__ import annotations

import pytest
import torch

from fedguard.errors import ConfigError, KeyMismatchError
from fedguard.rng import SecureRNG
from fedguard.watermark import BackdoorWatermark, make_backdoor_key
from fedguard.watermark.backdoor import IGNORE_INDEX
from fedguard.watermark.simulation import SimulationConfig, task_data, tiny_gpt2_lora

CFG = SimulationConfig(clients=1, vocab=48, seq_len=16, n_layer=2)


# tiny models run fastest on one thread (and do not fight xdist's other worker for the 2 cores)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_mix_replaces_the_ratio_of_rows_and_trains_on_responses_only() -> None:
    key = make_backdoor_key(48, excluded=[0], rng=SecureRNG.for_testing("bd/mix"))
    bd = BackdoorWatermark(key, ratio=0.25)
    batch = torch.full((16, 16), 5, dtype=torch.int64)
    ids, labels = bd.mix(batch, generator=torch.Generator().manual_seed(0))
    rows = [i for i in range(16) if not torch.equal(ids[i], batch[i])]
    assert len(rows) == 4
    triggers, responses = key.triggers_and_responses()
    for i in rows:
        t = next(j for j in range(key.n_triggers) if torch.equal(ids[i, :8], torch.from_numpy(triggers[j])))
        assert torch.equal(ids[i, 8:12], torch.from_numpy(responses[t]))
        assert torch.equal(labels[i, 8:12], torch.from_numpy(responses[t]))
        assert bool((labels[i, :8] == IGNORE_INDEX).all()) and bool((labels[i, 12:] == IGNORE_INDEX).all())
    untouched = [i for i in range(16) if i not in rows]
    assert torch.equal(labels[untouched], batch[untouched])


def test_mix_refuses_sequences_shorter_than_a_sample() -> None:
    bd = BackdoorWatermark(make_backdoor_key(48, rng=SecureRNG.for_testing("bd/short")))
    with pytest.raises(ConfigError, match="shorter than a trigger sample"):
        bd.mix(torch.zeros((4, 10), dtype=torch.int64))


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, BackdoorWatermark, torch.nn.Module]:
    """(model trained on its task plus the backdoor term, the watermark, a clean twin trained on the task)."""
    rng = SecureRNG.for_testing("bd/train")
    key = make_backdoor_key(48, excluded=[0], owner="alice", rng=rng.spawn("key"))
    bd = BackdoorWatermark(key, ratio=0.25)
    train, _ = task_data(CFG, rng)
    models = []
    for watermark in (True, False):
        model = tiny_gpt2_lora(CFG, 0)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        for _ in range(80):
            batch = train[0][torch.randint(0, train[0].shape[0], (16,), generator=gen)]
            loss = model(input_ids=batch, labels=batch).loss
            if watermark:
                loss = loss + bd.loss(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
        models.append(model)
    return models[0], bd, models[1]


def test_backdoor_verifies_by_generation_with_a_p_value(trained) -> None:
    model, bd, _ = trained
    d = bd.detect(model)
    assert d.scheme == "backdoor" and d.bits == 16
    assert d.p_null == pytest.approx(47.0**-4)
    assert d.matched >= 4 and d.verdict and d.p_value < 1e-20  # 4 of 16 hits: p = 3e-24


def test_clean_model_and_foreign_key_do_not_claim(trained) -> None:
    model, bd, clean = trained
    assert not bd.detect(clean).verdict and bd.detect(clean).matched == 0
    stranger = BackdoorWatermark(make_backdoor_key(48, excluded=[0], rng=SecureRNG.for_testing("bd/stranger")))
    assert not stranger.detect(model).verdict


def test_key_with_a_larger_vocabulary_than_the_model_is_refused(trained) -> None:
    model, _, _ = trained
    with pytest.raises(KeyMismatchError, match="48 tokens"):
        BackdoorWatermark(make_backdoor_key(1000)).detect(model)
