"""Typed errors of packed Paillier aggregation (subclasses of the foundation's :mod:`fedguard.errors`).

Every error that a *received message* can cause derives from :class:`~fedguard.errors.MessageError`, so
the stage machine refuses the message exactly as it refuses a corrupted one (the transport records it as
rejected) and, under ``on_bad_input="abort"``, the server aborts the round before anything is decrypted.
"""

from __future__ import annotations

from fedguard.errors import KeyMismatchError, MessageError, RingOverflowError


class ForeignKeyError(MessageError, KeyMismatchError):
    """A ciphertext, public key or obfuscator pool belongs to a different Paillier key than the round's.

    The message names both key fingerprints (see :attr:`PaillierPublicKey.fingerprint`)."""


class CiphertextError(MessageError):
    """A ciphertext is malformed: wrong byte length, out of range (not in ``[1, n^2)``) or not a unit of
    ``Z*_{n^2}`` (shares a factor with ``n``). The message names the offending index."""


class SlotLayoutError(MessageError):
    """A party uses a different slot layout (slot width, slots per ciphertext, offsets, ciphertext count)
    than the one derived from the round's public parameters. The message names the first differing field."""


class SlotOverflowError(RingOverflowError):
    """More clients would be summed than the slot headroom was sized for, so a slot could carry into its
    neighbour; or a decrypted slot exceeds the bound it must respect (wrong key or tampered sum)."""


class DecryptionError(MessageError):
    """A decrypted plaintext is not a valid packed sum (bits above the last slot, a slot above its bound,
    a non-zero padding slot): the ciphertext was produced under another key or was tampered with."""
