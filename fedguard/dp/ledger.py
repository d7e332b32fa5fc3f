"""The write-ahead privacy ledger: every release is durably on disk *before* it happens.

A checkpoint saved after a round is too late to hold that round's privacy event: a process that dies
between the server's decoding of a sum and the checkpoint would, on ``--resume``, restore the previous
ledger and rerun the round with fresh noise — a release the ledger forgot. The rule here is the
database one (write-ahead logging): the event of a release is appended to the ledger file and the file is
``fsync``-ed (:func:`fedguard.files.atomic_write`: temporary file, flush, ``fsync``, atomic rename,
directory ``fsync``) before the caller lets the release go ahead. Hence the invariant

    at any instant, the ledger file holds every release the server may have seen,

whatever point the process is killed at. A write-ahead record is *retracted* (removed and the file
rewritten) only when the round provably released nothing — the aggregator aborted before decoding
(:class:`~fedguard.errors.ProtocolAbort`, whose contract is "aborted without revealing anything") or
training failed before aggregation. A crash leaves the record in place: over-counting a release that did
not happen is the safe error.

On resume the checkpoint's ledger must be a prefix of the file's (:meth:`PrivacyAccountant.extends`);
the file, the longer of the two, is the one that continues. Any other relation is refused: the two do not
belong to the same run.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedguard.dp.accountant import PrivacyAccountant
from fedguard.dp.events import Event
from fedguard.errors import ConfigError
from fedguard.files import atomic_write


class WriteAheadLedger:
    """The durable copy of a :class:`PrivacyAccountant`'s ledger at ``path`` (JSON, atomic + fsync)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def persist(self, accountant: PrivacyAccountant) -> Path:
        """Write the whole ledger durably (returns only once the bytes and the rename are on disk)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(self.path, accountant.to_json())

    def commit(self, accountant: PrivacyAccountant, event: Event, *, label: str) -> None:
        """Spend ``event`` on ``accountant`` (refusing over budget: ledger and file unchanged) and persist.
        Call before the release it describes."""
        accountant.spend(event, label=label)
        self.persist(accountant)

    def retract(self, accountant: PrivacyAccountant, label: str) -> bool:
        """Take back the last record ``label`` (its round released nothing) and persist the result."""
        if accountant.retract(label):
            self.persist(accountant)
            return True
        return False

    def load(self) -> PrivacyAccountant | None:
        """The ledger on disk, or ``None`` when there is none yet."""
        if not self.path.exists():
            return None
        return PrivacyAccountant.load(self.path)

    def reconcile(self, checkpointed: PrivacyAccountant | None) -> PrivacyAccountant | None:
        """The ledger a resumed run continues from: the file's, which must extend the checkpoint's.

        Raises :class:`ConfigError` naming both lengths when the file does not extend the checkpoint's
        ledger (a ledger of another run, or an edited one)."""
        on_disk = self.load()
        if on_disk is None:
            return checkpointed
        if checkpointed is None:
            return on_disk
        if not on_disk.extends(checkpointed):
            raise ConfigError(
                f"the privacy ledger {self.path} ({len(on_disk.ledger)} entries) does not extend the checkpoint's "
                f"({len(checkpointed.ledger)} entries): they are not the same run's; restore the run's own ledger"
            )
        return on_disk
