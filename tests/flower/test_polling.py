"""Flower's poll intervals (fedguard_train.flower.polling): the override is confined to the SuperNode's loop
module, bounded, refuses an unexpected Flower, and the ServerApp's push/pull loop returns every reply that
came within the timeout without waiting Flower's fixed 3 s."""

from __future__ import annotations

import time
import types
from typing import Any

import pytest

from fedguard.errors import ConfigError
from fedguard_train.flower import flower_available
from fedguard_train.flower.polling import (
    POLL_ENV,
    SUPEREXEC_POLL_ENV,
    CappedTime,
    cap_sleeps,
    check_poll,
    exchange_messages,
    flower_env,
)


@pytest.mark.parametrize("bad", [0, 0.001, 61, float("nan"), float("inf"), -1, True, "0.1", None])
def test_poll_bounds_refused(bad: object) -> None:
    with pytest.raises(ConfigError, match="poll"):
        check_poll(bad)


def test_flower_env_uses_flowers_own_variable() -> None:
    env = flower_env(0.05)
    assert env == {SUPEREXEC_POLL_ENV: "0.05", POLL_ENV: "0.05"}


def test_capped_time_caps_sleep_and_forwards_the_rest() -> None:
    capped = CappedTime(0.02)
    t0 = time.monotonic()
    capped.sleep(3)
    assert time.monotonic() - t0 < 1.0
    assert abs(capped.time() - time.time()) < 1.0
    assert capped.monotonic is time.monotonic


def test_cap_sleeps_touches_only_the_given_module() -> None:
    mod = types.ModuleType("fake_loop")
    mod.time = time  # type: ignore[attr-defined]
    mod.start_client_internal = lambda: None  # type: ignore[attr-defined]
    cap_sleeps(mod, 0.05)
    assert isinstance(mod.time, CappedTime)  # type: ignore[attr-defined]
    assert time.sleep is not mod.time.sleep  # type: ignore[attr-defined]  # the real module is untouched
    t0 = time.monotonic()
    mod.time.sleep(3)  # type: ignore[attr-defined]
    assert time.monotonic() - t0 < 1.0


def test_cap_sleeps_refuses_a_loop_module_it_does_not_know() -> None:
    moved = types.ModuleType("moved")
    moved.sleep = time.sleep  # type: ignore[attr-defined]  # `from time import sleep`: a cap would do nothing
    moved.start_client_internal = lambda: None  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="flwr==1.42.0"):
        cap_sleeps(moved, 0.1)
    no_loop = types.ModuleType("no_loop")
    no_loop.time = time  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="start_client_internal"):
        cap_sleeps(no_loop, 0.1)


@pytest.mark.skipif(not flower_available(), reason="flwr is not installed (pip install 'fedguard[flower]')")
def test_the_installed_supernode_loop_is_where_the_override_expects_it() -> None:
    import importlib

    from fedguard_train.flower.polling import SUPERNODE_MODULE, check_supernode_module

    module = importlib.import_module(SUPERNODE_MODULE)
    check_supernode_module(module)  # raises for an unexpected Flower
    source = importlib.util.find_spec(SUPERNODE_MODULE)
    assert source is not None and source.origin is not None
    text = open(source.origin).read()
    assert "time.sleep(3)" in text  # the idle pull loop this override shortens


class FakeLink:
    """Replies become available ``delay[i]`` seconds after the push; node ``silent`` never answers."""

    def __init__(self, delays: dict[str, float]) -> None:
        self.delays = delays
        self.pushed_at = 0.0
        self.pulls = 0

    def push(self, msgs: list[str]) -> list[str]:
        self.pushed_at = time.monotonic()
        return [f"id-{m}" for m in msgs]

    def pull(self, ids: set[str]) -> list[dict[str, Any]]:
        self.pulls += 1
        now = time.monotonic() - self.pushed_at
        return [{"reply_to": i} for i in sorted(ids) if self.delays.get(i.removeprefix("id-"), 1e9) <= now]


def test_exchange_returns_each_reply_once_and_soon() -> None:
    link = FakeLink({"a": 0.0, "b": 0.15})
    t0 = time.monotonic()
    got = exchange_messages(link.push, link.pull, ["a", "b"], timeout=30, poll=0.02,
                            reply_to=lambda m: m["reply_to"])
    took = time.monotonic() - t0
    assert sorted(m["reply_to"] for m in got) == ["id-a", "id-b"]
    assert took < 2.0  # Grid.send_and_receive would sleep 3 s after the first pull


def test_exchange_stops_at_the_timeout_with_what_came() -> None:
    link = FakeLink({"a": 0.0})  # "b" is silent
    t0 = time.monotonic()
    got = exchange_messages(link.push, link.pull, ["a", "b"], timeout=0.3, poll=0.05,
                            reply_to=lambda m: m["reply_to"])
    took = time.monotonic() - t0
    assert [m["reply_to"] for m in got] == ["id-a"]
    assert 0.25 <= took < 2.0


def test_exchange_of_nothing_sends_nothing() -> None:
    link = FakeLink({})
    assert exchange_messages(link.push, link.pull, [], timeout=5, poll=0.05, reply_to=lambda m: m) == []
    assert link.pulls == 0


def test_supernode_main_refuses_a_bad_poll_before_starting_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedguard_train.flower.polling import supernode_main

    for bad in ("fast", "0", "1e9"):
        monkeypatch.setenv(POLL_ENV, bad)
        with pytest.raises(ConfigError, match="seconds in"):
            supernode_main(["--help"])
