"""Aggregators by name, as configs select them (``aggregator: masking`` + ``aggregator_options: {...}``).

Each entry is ``(name, options class, factory)``. The options class is a frozen, keyword-only
:class:`~fedguard.federation.protocol.AggregatorOptions` dataclass that lives in a *light* module (no
crypten, phe, gmpy2 or cryptography at import time), so a configuration can be checked completely
(:func:`aggregator_options`) before any heavy dependency loads; the factory's module is imported only when
an aggregator is built (:func:`make_aggregator`).

The built-in aggregators are declared here by module path (imported lazily); plug-ins call
:func:`register_aggregator`. A name is registered once: a second registration raises :class:`ConfigError`.

>>> options = aggregator_options("masking", {"neighbours": 4})
>>> options.to_dict()
{'neighbours': 4, 'threshold': None, 'unmask_workers': 1}
>>> aggregator_options("masking", {"neighbors": 4})
Traceback (most recent call last):
...
fedguard.errors.ConfigError: unknown key 'aggregator_options.neighbors'; did you mean 'neighbours'?
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedguard.errors import ConfigError
from fedguard.federation.protocol import Aggregator, AggregatorOptions

__all__ = [
    "AggregatorOptions",
    "aggregator_options",
    "available_aggregators",
    "make_aggregator",
    "options_class",
    "register_aggregator",
]

OPTIONS_PREFIX = "aggregator_options"
"""How unknown keys are named in messages (``unknown key 'aggregator_options.neighbors'``)."""

Factory = Callable[..., Aggregator]
"""``factory(options, **runtime) -> Aggregator``: ``options`` is an instance of the registered options class;
``runtime`` are constructor arguments that are not options (key pairs, compute parties, generators)."""


@dataclass(frozen=True)
class _Entry:
    options_class: type[AggregatorOptions]
    factory: Factory


@dataclass(frozen=True)
class _Lazy:
    options: str  # "module:Class", a light module
    factory: str  # "module:Class", imported only to build


_REGISTERED: dict[str, _Entry] = {}
_BUILTIN: dict[str, _Lazy] = {
    "plaintext": _Lazy("fedguard.federation.plaintext:PlaintextOptions", "fedguard.federation.plaintext:PlaintextAggregator"),
    "masking": _Lazy("fedguard.secagg.masking.options:MaskingOptions", "fedguard.secagg.masking.aggregator:MaskingAggregator"),
    "masking-signed": _Lazy("fedguard.secagg.masking.options:SignedMaskingOptions",
                            "fedguard.secagg.masking.signed:SignedMaskingAggregator"),
    "paillier": _Lazy("fedguard.secagg.paillier.options:PaillierOptions",
                      "fedguard.secagg.paillier.aggregator:PaillierAggregator"),
    "mpc": _Lazy("fedguard.secagg.mpc.options:MpcOptions", "fedguard.secagg.mpc.aggregator:MpcAggregator"),
}


def _known() -> list[str]:
    return sorted(set(_REGISTERED) | set(_BUILTIN))


def _resolve(target: str, name: str) -> Any:
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as err:
        raise ConfigError(f"aggregator {name!r} is not available in this installation: {err}") from err


def register_aggregator(name: str, options_class: type[AggregatorOptions], factory: Factory) -> None:
    """Make ``factory(options, **runtime)`` available as ``aggregator: name``, configured by
    ``options_class``. A name that is already registered (or built in) raises :class:`ConfigError`."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"aggregator name must be a non-empty string, got {name!r}")
    if name in _REGISTERED or name in _BUILTIN:
        raise ConfigError(f"an aggregator named {name!r} is already registered")
    if not (isinstance(options_class, type) and issubclass(options_class, AggregatorOptions)):
        raise ConfigError(f"options_class must be an AggregatorOptions subclass, got {options_class!r}")
    if not callable(factory):
        raise ConfigError(f"factory must be callable, got {factory!r}")
    _REGISTERED[name] = _Entry(options_class, factory)


def _unknown_name(name: object) -> ConfigError:
    known = _known()
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown aggregator {name!r} (known: {', '.join(known)}){hint}")


def options_class(name: str) -> type[AggregatorOptions]:
    """The options class of aggregator ``name`` (imports only its light options module)."""
    if name in _REGISTERED:
        return _REGISTERED[name].options_class
    if isinstance(name, str) and name in _BUILTIN:
        cls: type[AggregatorOptions] = _resolve(_BUILTIN[name].options, name)
        return cls
    raise _unknown_name(name)


def _factory(name: str) -> Factory:
    if name in _REGISTERED:
        return _REGISTERED[name].factory
    if name in _BUILTIN:
        factory: Factory = _resolve(_BUILTIN[name].factory, name)
        return factory
    raise _unknown_name(name)


def available_aggregators() -> list[str]:
    """Names whose implementation can be imported here."""
    names = set(_REGISTERED)
    for name, lazy in _BUILTIN.items():
        module = lazy.factory.partition(":")[0]
        try:
            if importlib.util.find_spec(module) is not None:
                names.add(name)
        except ModuleNotFoundError:
            pass
    return sorted(names)


def aggregator_options(name: str, raw: Mapping[str, Any] | None = None) -> AggregatorOptions:
    """The options of aggregator ``name`` from a plain mapping (a config's ``aggregator_options``).

    Unknown keys are refused with the nearest valid key named, wrong types and ranges are collected, and
    all problems are raised in one :class:`ConfigError`; an unknown aggregator name names the closest known
    one. Nothing heavy is imported (no crypten, phe, gmpy2 or cryptography)."""
    cls = options_class(name)
    if isinstance(raw, AggregatorOptions):
        if not isinstance(raw, cls):
            raise ConfigError(f"aggregator {name!r} takes {cls.__name__}, got {type(raw).__name__}")
        return raw
    return cls.from_dict(raw, prefix=OPTIONS_PREFIX)


def make_aggregator(name: str, options: AggregatorOptions | Mapping[str, Any] | None = None,
                    **overrides: Any) -> Aggregator:
    """Build the aggregator registered as ``name``.

    ``options``: its options class instance, a plain mapping of options, or ``None`` (defaults).
    ``overrides``: option values that replace those in ``options`` (``make_aggregator("masking",
    neighbours=4)``), or runtime constructor arguments that are not options (``keypair=``, ``parties=``,
    ``rng=``), which go to the factory as they are. Unknown names and keys raise :class:`ConfigError`
    naming the closest valid one."""
    cls = options_class(name)
    valid = set(cls.keys())
    changes = {k: v for k, v in overrides.items() if k in valid}
    runtime = {k: v for k, v in overrides.items() if k not in valid}
    if isinstance(options, AggregatorOptions) and not isinstance(options, cls):
        raise ConfigError(f"aggregator {name!r} takes {cls.__name__}, got {type(options).__name__}")
    built = cls.build(options, changes, prefix=OPTIONS_PREFIX)
    return _factory(name)(built, **runtime)
