"""Aggregators by name, as configs select them (``aggregator: plaintext``).

Secure aggregators register themselves here from their own modules (``fedguard.secagg.masking`` etc.);
:func:`make_aggregator` imports a known module lazily so heavy dependencies load only when chosen.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

from fedguard.errors import ConfigError
from fedguard.federation.protocol import Aggregator

_FACTORIES: dict[str, Callable[..., Aggregator]] = {}
# name -> module that registers it when imported (lazy: crypten, phe, ... load only when chosen)
_LAZY_MODULES: dict[str, str] = {
    "plaintext": "fedguard.federation.plaintext",
    "masking": "fedguard.secagg.masking",
    "paillier": "fedguard.secagg.paillier",
    "mpc": "fedguard.secagg.mpc",
}


def register_aggregator(name: str, factory: Callable[..., Aggregator]) -> None:
    """Make ``factory(**options)`` available as ``aggregator: name``."""
    _FACTORIES[name] = factory


def available_aggregators() -> list[str]:
    """Names whose implementation can be imported here."""
    names = []
    for name, module in _LAZY_MODULES.items():
        if name in _FACTORIES or importlib.util.find_spec(module) is not None:
            names.append(name)
    return sorted(set(names) | set(_FACTORIES))


def make_aggregator(name: str, **options: Any) -> Aggregator:
    """Build the aggregator registered as ``name`` with ``options``; unknown names raise
    :class:`ConfigError` naming the closest known one."""
    if name not in _FACTORIES and name in _LAZY_MODULES:
        try:
            importlib.import_module(_LAZY_MODULES[name])
        except ModuleNotFoundError as err:
            raise ConfigError(f"aggregator {name!r} is not available in this installation: {err}") from err
    if name not in _FACTORIES:
        known = sorted(set(_FACTORIES) | set(_LAZY_MODULES))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown aggregator {name!r} (known: {known}){hint}")
    return _FACTORIES[name](**options)
