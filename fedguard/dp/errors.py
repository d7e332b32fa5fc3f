"""Typed errors of :mod:`fedguard.dp` (subclasses of the foundation's :mod:`fedguard.errors`).

:class:`~fedguard.errors.BudgetExceededError` itself lives in the foundation; these add the failures
that only differential privacy can cause. Every message names the offending value.
"""

from __future__ import annotations

from fedguard.errors import ConfigError, FedGuardError, ProtocolAbort


class UnreachableTargetError(ConfigError):
    """No noise level in the searched range meets the target (epsilon, delta) for the given number of
    steps and sampling rate. The message names the target and the best epsilon that was reachable."""


class UnsupportedEventError(ConfigError):
    """The chosen accounting backend cannot account for this privacy event (e.g. the PLD backend and a
    zCDP event of the distributed discrete Gaussian). The message names the event and a backend that can."""


class UnsupportedModelError(FedGuardError, TypeError):
    """Example-level DP-SGD cannot compute per-example gradients of this model or adapter type
    (e.g. a PEFT adapter whose trainable parameters Opacus cannot see per example)."""


class InsufficientNoiseError(ProtocolAbort):
    """Fewer clients contributed noise to a distributed-DP round than the round was planned for, so the
    released sum carries less noise than planned. The event with the *actual* noise was still written to
    the ledger (the ledger never lies); the aggregate must be discarded and the run stopped."""
