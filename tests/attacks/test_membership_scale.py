"""Membership inference at scale: the fast scoring path equals the plain forward, shadows train on every IN
example, LiRA on a subset still separates members, and the reference model's scores are computed once per
item list when audits share a cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.membership import (
    MembershipConfig,
    ShadowRecipe,
    _shadow_batches,
    run_membership,
    shared_prefix_length,
    token_stats,
    train_shadow,
)
from fedguard.errors import ConfigError
from tests.models import tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _chat_items(seed: int, n: int, *, vocab: int = 64, head: int = 9) -> list[dict[str, list[int]]]:
    """Items shaped like the chat-formatted task: a template head common to all, a short varying prompt
    tail (unscored) and a response (scored)."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.randint(1, vocab, (head,), generator=torch.Generator().manual_seed(99)).tolist()
    out = []
    for _ in range(n):
        tail = torch.randint(1, vocab, (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen).tolist()
        resp = torch.randint(1, vocab, (int(torch.randint(2, 9, (1,), generator=gen)),), generator=gen).tolist()
        out.append({"input_ids": common + tail + resp, "labels": [-100] * (head + len(tail)) + resp})
    return out


def test_shared_prefix_stops_before_the_first_prediction() -> None:
    items = _chat_items(0, 12)
    assert shared_prefix_length(items) == 9
    # an item scored from its second token leaves no prefix to share
    assert shared_prefix_length([*items, {"input_ids": items[0]["input_ids"]}]) == 0
    # the first scored label at position 9: its prediction is made at position 8, so the prefix is 8 long
    early = {"input_ids": items[0]["input_ids"], "labels": [-100] * 9 + items[0]["input_ids"][9:]}
    assert shared_prefix_length([*items, early]) == 8
    assert shared_prefix_length([]) == 0


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_fast_scoring_equals_the_plain_forward(make) -> None:  # type: ignore[no-untyped-def]
    from peft import LoraConfig, get_peft_model

    model = make(0)
    targets = ["c_attn"] if make is tiny_gpt2 else ["q_proj", "v_proj"]
    model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False,
                                             fan_in_fan_out=make is tiny_gpt2))
    items = _chat_items(1, 21)
    fast = token_stats(model, items, batch_size=4)
    # the plain forward, one item at a time, no prefix reuse
    plain = token_stats(model, items, batch_size=1, share_prefix=False)
    assert len(fast) == len(plain) == len(items)
    for a, b in zip(fast, plain):
        assert a.logp.shape == b.logp.shape
        np.testing.assert_allclose(a.logp, b.logp, atol=1e-5)
        np.testing.assert_allclose(a.mu, b.mu, atol=1e-5)
        np.testing.assert_allclose(a.sigma, b.sigma, atol=1e-5)
    # and the order of the results is the order of the items, not the length-sorted batching order
    single = token_stats(model, [items[7]], batch_size=1, share_prefix=False)[0]
    np.testing.assert_allclose(fast[7].logp, single.logp, atol=1e-5)


def test_epoch_recipe_trains_on_every_example_once() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = _shadow_batches(10, ShadowRecipe(batch_size=4, epochs=1), gen)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(i for b in batches for i in b) == list(range(10))
    two = _shadow_batches(10, ShadowRecipe(batch_size=4, epochs=2), gen)
    assert sorted(i for b in two for i in b) == sorted(list(range(10)) * 2)
    # with replacement (the default): `steps` batches
    assert len(_shadow_batches(10, ShadowRecipe(batch_size=4, steps=7), gen)) == 7
    with pytest.raises(ConfigError, match="epochs"):
        ShadowRecipe(epochs=-1)
    with pytest.raises(ConfigError, match="lira_nonmembers"):
        MembershipConfig(lira_nonmembers=1)


def test_lira_on_a_subset_still_finds_the_members_and_says_so() -> None:
    base = tiny_gpt2(5)
    gen = torch.Generator().manual_seed(3)
    items = [{"input_ids": torch.randint(1, 64, (16,), generator=gen).tolist()} for _ in range(96)]
    members, nonmembers, population = items[:24], items[24:72], items[72:]
    recipe = ShadowRecipe(epochs=40, batch_size=8, lr=3e-3)  # overfits: the members are memorised
    target = train_shadow(base, members, recipe, seed=11)
    cfg = MembershipConfig(shadows=2, recipe=recipe, n_boot=100, seed=0, lira_nonmembers=16)
    report = run_membership(target, members, nonmembers, reference=base, population=population, config=cfg)
    by = {r.attack: r for r in report.results}
    assert by["lira"].roc.n_members == 24 and by["lira"].roc.n_nonmembers == 16
    assert "first 16 non-members" in by["lira"].note
    assert by["loss"].roc.n_nonmembers == 48  # the other attacks score every non-member
    assert by["rmia"].note.startswith("offline")  # shadows scored only LiRA's subset
    assert by["lira"].roc.auc > 0.8 and by["loss"].roc.auc > 0.8


class _Counting(torch.nn.Module):
    """Counts the examples a model is asked to score."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.rows = 0

    def forward(self, input_ids: torch.Tensor, **kwargs):  # type: ignore[no-untyped-def]
        self.rows += int(input_ids.shape[0])
        return self.inner(input_ids=input_ids, **kwargs)


def test_a_shared_cache_scores_the_reference_once() -> None:
    base = _Counting(tiny_gpt2(5))
    items = _chat_items(2, 30)
    members, nonmembers, population = items[:10], items[10:20], items[20:]
    target = tiny_gpt2(6)
    cache: dict = {}
    first = run_membership(target, members, nonmembers, reference=base, population=population,
                           config=MembershipConfig(n_boot=50), stats_cache=cache, reference_key="base")
    rows = base.rows
    assert rows > 0 and len(cache) == 2  # the scored items and the population
    second = run_membership(target, members, nonmembers, reference=base, population=population,
                            config=MembershipConfig(n_boot=50), stats_cache=cache, reference_key="base")
    assert base.rows == rows  # nothing scored again
    assert [r.to_json() for r in first.results] == [r.to_json() for r in second.results]
    # other items (or another reference key) are scored afresh
    run_membership(target, members[:5], nonmembers, reference=base, config=MembershipConfig(n_boot=50),
                   stats_cache=cache, reference_key="base")
    assert base.rows > rows
