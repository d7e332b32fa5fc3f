"""Membership inference succeeds where it should (a model overfitted on its members) and stays at chance
where nothing distinguishes members from non-members (a model that never trained on them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.membership import (
    MembershipConfig,
    ShadowRecipe,
    lira_scores,
    run_membership,
    shadow_splits,
    train_shadow,
)
from attacks.roc import auc, summarize, tpr_at_fpr
from fedguard.errors import ConfigError
from tests.models import tiny_gpt2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _items(seed: int, n: int, length: int = 16, vocab: int = 64) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, vocab, (length,), generator=gen).tolist()} for _ in range(n)]


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict[str, list[int]]]]:
    return {"members": _items(1, 32), "nonmembers": _items(2, 32), "population": _items(3, 32),
            "other": _items(4, 32)}


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return tiny_gpt2(5)


RECIPE = ShadowRecipe(steps=150, batch_size=8, lr=3e-3)


def test_roc_metrics_known_answers() -> None:
    assert auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5
    assert auc(np.array([0.0, 3.0]), np.array([1.0, 2.0])) == 0.5
    members, nonmembers = np.arange(100, 200.0), np.arange(0, 100.0)
    assert tpr_at_fpr(members, nonmembers, 0.0) == 1.0
    s = summarize(np.array([0.0, 1.0, 2.0]), np.array([0.5, 1.5, 2.5]), n_boot=200)
    assert s.auc_ci[0] <= s.auc <= s.auc_ci[1]
    with pytest.raises(ConfigError, match="at least 2 members"):
        summarize(np.array([1.0]), np.array([0.0, 1.0]))


def test_overfitted_model_is_detected_by_every_attack(data: dict, base: torch.nn.Module) -> None:
    target = train_shadow(base, data["members"], RECIPE, seed=11)
    report = run_membership(target, data["members"], data["nonmembers"], reference=base,
                            population=data["population"],
                            config=MembershipConfig(shadows=2, recipe=RECIPE, n_boot=300, seed=0))
    by = {r.attack: r for r in report.results}
    assert set(by) == {"loss", "zlib", "min_k", "min_k_pp", "ref", "rmia", "lira"}
    for name in ("loss", "ref", "rmia", "lira", "min_k"):
        assert by[name].roc.auc > 0.8, (name, by[name].roc.auc)
        assert by[name].roc.auc_ci[0] > 0.5, (name, by[name].roc.auc_ci)
    assert by["loss"].roc.tpr_at[0.01] > 0.2  # with 32 non-members: TPR at zero false positives


def test_model_never_trained_on_members_is_at_chance(data: dict, base: torch.nn.Module) -> None:
    # trained on other examples of the same distribution: members and non-members are alike to it
    target = train_shadow(base, data["other"], RECIPE, seed=12)
    report = run_membership(target, data["members"], data["nonmembers"], reference=base,
                            population=data["population"], config=MembershipConfig(shadows=0, n_boot=300, seed=0))
    for r in report.results:
        low, high = r.roc.auc_ci
        assert low <= 0.5 <= high, (r.attack, r.roc.auc, r.roc.auc_ci)


def test_deterministic_with_a_seed(data: dict, base: torch.nn.Module) -> None:
    target = train_shadow(base, data["members"][:8], ShadowRecipe(steps=5), seed=3)
    cfg = MembershipConfig(n_boot=50, seed=7)
    a = run_membership(target, data["members"], data["nonmembers"], reference=base, population=data["population"],
                       config=cfg)
    b = run_membership(target, data["members"], data["nonmembers"], reference=base, population=data["population"],
                       config=cfg)
    assert [r.to_json() for r in a.results] == [r.to_json() for r in b.results]


def test_lira_and_config_refusals() -> None:
    masks = shadow_splits(10, 4, seed=0)
    assert (masks.sum(0) == 2).all()
    with pytest.raises(ConfigError, match="even number"):
        shadow_splits(10, 3, seed=0)
    with pytest.raises(ConfigError, match="IN at least one"):
        lira_scores(np.zeros(3), np.zeros((2, 3)), np.zeros((2, 3), dtype=bool))
    with pytest.raises(ConfigError, match="shadows must be"):
        MembershipConfig(shadows=3)
    with pytest.raises(ConfigError, match="k must be"):
        MembershipConfig(k=0.0)
