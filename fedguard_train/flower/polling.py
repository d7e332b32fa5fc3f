"""Flower's polling intervals, shortened the supported way where there is one and by a minimal override where not.

Flower 1.42's Deployment Engine moves a message by polling, not by push. Each round trip of
:class:`~fedguard_train.flower.server_app.GridExchange` waited on these sleeps (read in the installed
``flwr`` source, version pinned by the ``flower`` extra):

==========================================================  =========  ====================================
where                                                       interval   how fedguard shortens it
==========================================================  =========  ====================================
``Grid.send_and_receive`` (ServerApp: pull the replies)     3 s        not called: the ServerApp uses the
                                                                       Grid's own ``push_messages`` /
                                                                       ``pull_messages`` and polls every
                                                                       ``poll`` seconds
                                                                       (:func:`exchange_messages`)
SuperExec task poll (SuperLink's and every SuperNode's:     1 s        Flower's own environment variable
start ``flwr-serverapp`` / a ``flwr-clientapp`` per                    ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``
message)                                                               (:func:`flower_env`)
SuperNode pull loop: ask the SuperLink for a message        3 s        no option: the SuperNode runs through
                                                                       :func:`supernode_main`, which caps
                                                                       the sleeps of that one module
SuperNode: wait for the ClientApp's reply, for its objects  0.5 s      the same cap
==========================================================  =========  ====================================

The override (:func:`cap_sleeps`) replaces the name ``time`` inside the module
``flwr.supernode.start_client_internal`` with a proxy whose ``sleep(s)`` sleeps ``min(s, cap)``; every
other attribute (``time.time``, ``time.monotonic``) is the real one, and no other module is touched. The
loop's logic (pull, then wait for the reply, then push) is unchanged: only how long an idle SuperNode
waits before asking again. It is checked at import against the installed Flower
(:func:`check_supernode_module`): if a Flower upgrade moves the loop, the SuperNode refuses to start with
a :class:`~fedguard.errors.ConfigError` rather than silently keeping 3 s polls.

What polling costs: an idle SuperNode sends ``1 / poll`` pull requests per second to the SuperLink. The
default ``poll`` of 0.1 s (10 requests per second per SuperNode) is a few percent of a core here; a
deployment with hundreds of SuperNodes should raise it (``fedguard flower run --poll``).

What polling cannot remove: Flower starts a new ``flwr-clientapp`` process for every message, and
importing Flower in it takes ~1.9 s of CPU here (SQLAlchemy, Alembic, FastAPI); with ``n`` clients on
``c`` cores that is about ``1.9·n/c`` seconds per protocol stage (docs/flower.md, "Round time").
"""

from __future__ import annotations

import math
import os
import sys
import time as _time
import types
from collections.abc import Callable, Iterable
from typing import Any, Final

from fedguard.errors import ConfigError

POLL_ENV: Final[str] = "FEDGUARD_FLOWER_POLL_SECONDS"
"""Environment variable :func:`supernode_main` reads its cap from (set by the launcher)."""
SUPEREXEC_POLL_ENV: Final[str] = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
"""Flower's own setting of the SuperExec's task poll interval (seconds, 0.01-60)."""
DEFAULT_POLL: Final[float] = 0.1
SUPERNODE_MODULE: Final[str] = "flwr.supernode.start_client_internal"


def check_poll(poll: object) -> float:
    """``poll`` as a float in [0.01, 60] (Flower's own bounds for the SuperExec interval), else ConfigError."""
    if isinstance(poll, bool) or not isinstance(poll, int | float) or not math.isfinite(poll) \
            or not 0.01 <= poll <= 60.0:
        raise ConfigError(f"poll must be a number of seconds in [0.01, 60], got {poll!r}")
    return float(poll)


def flower_env(poll: float) -> dict[str, str]:
    """Environment for every Flower process the launcher starts: the SuperExec interval (Flower's variable)
    and the cap :func:`supernode_main` applies."""
    value = repr(check_poll(poll))
    return {SUPEREXEC_POLL_ENV: value, POLL_ENV: value}


class CappedTime(types.ModuleType):
    """The ``time`` module with ``sleep(s)`` capped at ``cap`` seconds (everything else forwarded)."""

    def __init__(self, cap: float) -> None:
        super().__init__("time")
        self.cap = check_poll(cap)

    def sleep(self, seconds: float) -> None:
        _time.sleep(max(0.0, min(float(seconds), self.cap)))

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)


def check_supernode_module(module: types.ModuleType) -> None:
    """Refuse a Flower whose SuperNode loop is not where this override expects it."""
    if getattr(module, "time", None) is not _time and not isinstance(getattr(module, "time", None), CappedTime):
        raise ConfigError(f"{module.__name__} no longer imports `time` as a module: this Flower version is not "
                          "the one fedguard's poll override was written for (flwr==1.42.0)")
    if not callable(getattr(module, "start_client_internal", None)):
        raise ConfigError(f"{module.__name__} has no start_client_internal: unsupported Flower version")


def cap_sleeps(module: types.ModuleType, cap: float) -> None:
    """Make ``module``'s ``time.sleep`` sleep at most ``cap`` seconds (see the module doc)."""
    check_supernode_module(module)
    module.time = CappedTime(cap)  # type: ignore[attr-defined]


def supernode_main(argv: list[str] | None = None) -> None:
    """``flower-supernode`` with its polls capped at ``$FEDGUARD_FLOWER_POLL_SECONDS`` (default 0.1 s)."""
    import importlib

    raw = os.environ.get(POLL_ENV, str(DEFAULT_POLL))
    try:
        cap = check_poll(float(raw))
    except ValueError:
        raise ConfigError(f"{POLL_ENV} must be a number of seconds in [0.01, 60], got {raw!r}") from None
    cap_sleeps(importlib.import_module(SUPERNODE_MODULE), cap)
    from flwr.supernode.cli import flower_supernode

    if argv is not None:
        sys.argv = ["flower-supernode", *argv]
    else:
        sys.argv[0] = "flower-supernode"
    flower_supernode()


def exchange_messages(push: Callable[[list[Any]], Iterable[str]], pull: Callable[[set[str]], Iterable[Any]],
                      messages: list[Any], *, timeout: float, poll: float,
                      reply_to: Callable[[Any], str]) -> list[Any]:
    """What ``Grid.send_and_receive`` does, polling every ``poll`` seconds instead of 3: push ``messages``,
    then pull replies until every message has one or ``timeout`` seconds pass; the replies that came.

    ``push``/``pull`` are the Grid's ``push_messages``/``pull_messages`` (part of Flower's public Grid
    interface); ``reply_to`` gives the id of the message a reply answers."""
    check_poll(poll)
    pending = set(push(messages)) if messages else set()
    deadline = _time.monotonic() + timeout
    replies: list[Any] = []
    while pending:
        got = list(pull(pending))
        replies.extend(got)
        pending.difference_update(reply_to(m) for m in got)
        if not pending:
            break
        left = deadline - _time.monotonic()
        if left <= 0:
            break
        _time.sleep(min(poll, left))
    return replies


if __name__ == "__main__":
    supernode_main()
