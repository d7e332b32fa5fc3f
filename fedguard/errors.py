"""The typed errors of fedguard.

Every failure a user can cause (bad configuration, malformed or out-of-order messages, wrong keys,
exhausted privacy budgets, updates that would overflow the ring) raises a subclass of
:class:`FedGuardError`, and the message names the offending value, e.g.
``"clip must be > 0, got -1.0"``. Validation never uses ``assert`` and never changes state before all
checks have passed.

>>> try:
...     raise ConfigError.collect(["clip must be > 0, got -1.0", "value_bits must be in [2, 62], got 80"])
... except ConfigError as err:
...     print(err)
2 problems: clip must be > 0, got -1.0; value_bits must be in [2, 62], got 80
"""

from __future__ import annotations

from collections.abc import Sequence


class FedGuardError(Exception):
    """Base class of every error fedguard raises on purpose."""


class ConfigError(FedGuardError, ValueError):
    """A configuration value is invalid, or a configuration has an unknown key.

    Use :meth:`collect` to report every problem of a configuration at once.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems) or (message,)

    @classmethod
    def collect(cls, problems: Sequence[str]) -> ConfigError:
        """One error that lists all ``problems`` (at least one)."""
        if not problems:
            raise ValueError("ConfigError.collect needs at least one problem")
        if len(problems) == 1:
            return cls(problems[0], problems)
        return cls(f"{len(problems)} problems: " + "; ".join(problems), problems)


class MessageError(FedGuardError, ValueError):
    """A serialised message is malformed: truncated, oversized, wrong version, wrong type or dtype,
    corrupted (checksum mismatch), or not what the receiving stage expects."""


class ProtocolAbort(FedGuardError, RuntimeError):
    """A secure-aggregation round cannot complete safely and was aborted, e.g. fewer clients survived a
    stage than the protocol's threshold. The server never learns the sum from an aborted round.

    ``nothing_revealed`` is ``True`` only where the abort provably came before *any* party could decode a
    sum (before unmasking, decryption or opening). It is ``False`` (the conservative default) where a
    party may already have decoded one: e.g. a Paillier key holder that decrypted and then refused an
    overfull slot, or a masking round whose unmasking shares were already revealed. Privacy accounting
    may take back a write-ahead record only for ``nothing_revealed=True``."""

    def __init__(self, message: str, *, round_id: int | None = None, stage: str | None = None,
                 nothing_revealed: bool = False) -> None:
        super().__init__(message)
        self.round_id = round_id
        self.stage = stage
        self.nothing_revealed = nothing_revealed


class ProtocolViolation(ProtocolAbort):
    """One party sent a message that the stage machine refuses: out of order, replayed, from a foreign
    round, from an unknown sender. The offending message is dropped; the receiver's state is unchanged,
    so the round can still complete with the remaining parties (the sender counts as dropped)."""

    def __init__(
        self,
        message: str,
        *,
        sender: int | None = None,
        round_id: int | None = None,
        stage: str | None = None,
    ) -> None:
        super().__init__(message, round_id=round_id, stage=stage)
        self.sender = sender


class KeyMismatchError(FedGuardError, ValueError):
    """A layout, key or checkpoint does not match the model (or the party) it is applied to.
    The message names the first differing parameter or key."""


class BudgetExceededError(FedGuardError):
    """A privacy-budget-consuming step would exceed the configured (epsilon, delta) budget.
    Raised *before* anything is released."""


class RingOverflowError(FedGuardError, ValueError):
    """A sum of quantised values could wrap around the integer ring (too many clients, too large weights
    or too few ring bits). Raised before any value is encoded."""


class InvalidUpdateError(FedGuardError, ValueError):
    """A client update is unusable: NaN/inf entries, wrong length or dtype, non-positive weight."""
