"""Where a process finds the signing identities of the clients it plays: a light module (no cryptography
imported), shared by the options of ``masking-signed`` and ``mpc``.

``identity_files`` is a path template with ``{client}`` (``"keys/client-{client}.identity"``) or a mapping
``{client id: path}``; the files are written by ``fedguard keygen identity`` (mode 0600) and loaded with
:meth:`fedguard.identity.Identity.load`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedguard.checks import is_int

if TYPE_CHECKING:
    from fedguard.identity import Identity, Roster

__all__ = ["identity_files_problem", "identity_paths", "load_client_identity", "missing_identity_files",
           "normalise_identity_files"]


def identity_files_problem(value: object) -> str | None:
    """Why ``identity_files`` is neither a path template with ``{client}`` nor a mapping of client ids to paths."""
    if isinstance(value, str):
        if "{client}" not in value:
            return (f"identity_files must contain '{{client}}' (e.g. 'keys/client-{{client}}.identity'), "
                    f"got {value!r}")
        try:
            value.format(client=0)
        except (IndexError, KeyError, ValueError) as err:
            return f"identity_files {value!r} is not a valid path template: {err}"
        return None
    if isinstance(value, Mapping):
        bad = [k for k in value if not (is_int(k) or (isinstance(k, str) and k.isdigit()))]
        if bad:
            return f"identity_files keys must be client ids (ints >= 0), got {bad!r}"
        paths = [v for v in value.values() if not isinstance(v, str) or not v]
        if paths:
            return f"identity_files values must be file paths, got {paths!r}"
        return None
    return (f"identity_files must be a path template with '{{client}}' or a mapping {{client id: path}}, "
            f"got {value!r}")


def normalise_identity_files(value: Any) -> Any:
    """A valid mapping with its keys as ints (JSON's ``{"0": path}`` and YAML's ``{0: path}`` are one
    config); anything else unchanged."""
    if isinstance(value, Mapping) and identity_files_problem(value) is None:
        return {int(k): v for k, v in value.items()}
    return value


def missing_identity_files(value: Any) -> str | None:
    """For a valid mapping: which of its files do not exist (one sentence), else ``None``."""
    if not isinstance(value, Mapping) or identity_files_problem(value) is not None:
        return None
    missing = [f"client {k}: {v}" for k, v in value.items() if not Path(v).is_file()]
    if not missing:
        return None
    return f"identity_files do not exist: {', '.join(missing)} (create them with `fedguard keygen identity`)"


def identity_paths(identity_files: str | Mapping[Any, str], clients: Iterable[int]) -> dict[int, Path]:
    """Where each of ``clients`` keeps its identity file, from ``identity_files`` (a template or a mapping);
    a client the mapping does not name is left out (the caller names it as missing)."""
    if isinstance(identity_files, str):
        return {c: Path(identity_files.format(client=c)) for c in clients}
    by_id = {int(k): Path(v) for k, v in identity_files.items()}
    return {c: by_id[c] for c in clients if c in by_id}


def load_client_identity(identity_files: str | Mapping[Any, str], client: int, roster: Roster) -> Identity:
    """Client ``client``'s identity from ``identity_files``, checked against ``roster``: a
    :class:`~fedguard.errors.ConfigError` naming the client when its file is missing or holds another key."""
    from fedguard.errors import ConfigError
    from fedguard.identity import Identity

    path = identity_paths(identity_files, [client]).get(client)
    if path is None:
        raise ConfigError(f"aggregator_options.identity_files names no identity file for client {client}")
    if not path.is_file():
        raise ConfigError(f"client {client} has no identity file {str(path)!r} (create it with "
                          f"`fedguard keygen identity --client {client} --out {path}`)")
    ident = Identity.load(path)
    if client not in roster.keys or roster.keys[client] != ident.public_key or ident.client_id != client:
        raise ConfigError(f"the identity in {str(path)!r} is not client {client}'s on the roster of deployment "
                          f"{roster.deployment!r}")
    return ident
