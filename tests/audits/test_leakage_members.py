"""Who the membership audit calls a member: the examples the clients really trained on (replayed from the
trainer's seeded batch order and client sample), checked against the batches the trainer drew; the held-out
split between non-members and RMIA's population; typed refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedguard.cli import main
from fedguard.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[tuple[int, int]]]:
    """A tiny run with a client sample per round, and the (client, index) pairs its local trainer drew."""
    from fedguard_train import engine
    from fedguard_train.runner import build_trainer
    from tests.train.conftest import tiny_config, write_task

    tmp = tmp_path_factory.mktemp("members")
    cfg = tiny_config(tmp, write_task(tmp / "task.jsonl", n=72), federation={"clients": 3, "rounds": 3,
                                                                             "clients_per_round": 2})
    drawn: list[tuple[int, list[int]]] = []
    original = engine._batches

    def spy(items: Any, size: int, gen: Any, rank: int, world: int) -> Iterator[Any]:
        where = {id(it): i for i, it in enumerate(items)}
        for batch in original(items, size, gen, rank, world):
            drawn.append((id(items), [where[id(it)] for it in batch]))
            yield batch

    mp = pytest.MonkeyPatch()
    mp.setattr(engine, "_batches", spy)
    try:
        trainer = build_trainer(cfg, quiet=True)
        trainer.run()
    finally:
        mp.undo()
    owner = {id(items): c for c, items in enumerate(trainer.client_items)}
    truth = {(owner[key], i) for key, idx in drawn for i in idx}
    return Path(cfg.run_dir), truth


def test_trained_on_replays_exactly_the_batches_the_trainer_drew(sampled_run: tuple[Path, set]) -> None:
    from attacks.run_view import load_run, round_participants, trained_on

    path, truth = sampled_run
    run = load_run(path)
    assert set(trained_on(run)) == truth
    # a client sample of 2 of 3 per round: someone sat out, and the replay knows who
    assert all(len(round_participants(run, r)) == 2 for r in (1, 2, 3))
    total = sum(len(items) for items in run.client_items)
    assert 0 < len(truth) < total  # a short run leaves most of the clients' data untouched
    assert set(trained_on(run, client=1)) == {k for k in truth if k[0] == 1}


def test_member_sets_and_population_split(sampled_run: tuple[Path, set]) -> None:
    from attacks.run_view import load_run
    from audits.leakage import membership_on_run

    path, truth = sampled_run
    run = load_run(path)
    seen = membership_on_run(run, n_boot=20, member_set="seen", max_members=1000)
    assert seen.n_members == len(truth)
    assert any("trained on" in n for n in seen.notes)
    part = membership_on_run(run, n_boot=20, member_set="partition", max_members=1000)
    assert part.n_members == sum(len(items) for items in run.client_items)
    split = membership_on_run(run, n_boot=20, population=2)
    assert (split.n_population, split.n_nonmembers) == (2, len(run.test_items) - 2)
    with pytest.raises(ConfigError, match="fewer than 2"):
        membership_on_run(run, n_boot=20, population=len(run.test_items) - 1)
    with pytest.raises(ConfigError, match="unknown member set"):
        membership_on_run(run, n_boot=20, member_set="everyone")


def test_cli_options_reach_the_report(sampled_run: tuple[Path, set], tmp_path: Path) -> None:
    path, truth = sampled_run
    out = tmp_path / "m"
    assert main(["attack", "membership", "--run", str(path), "--out", str(out), "--quiet", "--n-boot", "20",
                 "--population", "2", "--shadows", "2", "--lira-nonmembers", "3", "--max-members", "1000"]) == 0
    report = json.loads((out / "membership.json").read_text())["membership"][0]
    assert report["n_members"] == len(truth) and report["n_population"] == 2
    lira = next(r for r in report["results"] if r["attack"] == "lira")
    assert lira["n_nonmembers"] == 3 and lira["n_members"] == len(truth)
    assert "members: examples a client trained on" in (out / "membership.md").read_text()
