"""Writing files so that a crash never leaves a half-written one behind.

:func:`atomic_write` writes to a temporary file in the target's directory, flushes and ``fsync``s it, and
``os.replace``\\ s it into place: a reader sees the old file or the new one, never a mix. A key file is
created with ``mode=0o600`` before any byte is written. ``overwrite=False`` refuses to replace an
existing file (never lose a user's key, ledger or run).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fedguard.errors import ConfigError

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike[str], data: str | bytes, *, mode: int | None = None,
                 overwrite: bool = True) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically; returns the path.

    ``mode``: the file's permission bits (set on the temporary file before writing, e.g. ``0o600``).
    ``overwrite=False``: raise :class:`ConfigError` if ``path`` exists (checked before writing; the final
    rename still replaces a file created concurrently, which callers that care must rule out).
    The parent directory must exist (:class:`ConfigError` otherwise).
    """
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"cannot write {target}: directory {parent} does not exist")
    if not overwrite and target.exists():
        raise ConfigError(f"refusing to overwrite {target}: it exists")
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if mode is not None:
        os.chmod(target, mode)
    return target
