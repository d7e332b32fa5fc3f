"""The paper's trainers, selected by the config's ``trainer:`` key.

``homo`` (FedHomoLLM, FATE-LLM §3.1) is built on :class:`fedguard_train.trainers.base.Trainer`;
FedHeteroLLM, FedCoLLM and FedOST register here as they land. The registry is light (it imports a
trainer's module only when that trainer is built), so configs can be checked without loading models.
"""

from __future__ import annotations

import difflib
import importlib
from typing import TYPE_CHECKING, Any

from fedguard.errors import ConfigError

if TYPE_CHECKING:
    from fedguard_train.trainers.base import Trainer

# name -> "module:Class"
_TRAINERS: dict[str, str] = {
    "homo": "fedguard_train.trainers.homo:FedHomoLLM",
    "ost": "fedguard_train.trainers.ost:FedOST",
    "hetero": "fedguard_train.trainers.hetero:FedHeteroLLM",
    "co": "fedguard_train.trainers.co:FedCoLLM",
}


def register_trainer(name: str, target: str) -> None:
    """Make ``trainer: name`` build the class named by ``target`` (``"package.module:Class"``, imported
    when first built). A name registered twice is refused."""
    if name in _TRAINERS:
        raise ConfigError(f"a trainer named {name!r} is already registered ({_TRAINERS[name]})")
    if target.count(":") != 1:
        raise ConfigError(f"trainer target must be 'module:Class', got {target!r}")
    _TRAINERS[name] = target


def trainer_names() -> list[str]:
    return sorted(_TRAINERS)


def trainer_class(name: str) -> type[Trainer]:
    """The trainer class registered as ``name`` (:class:`ConfigError` naming the closest otherwise)."""
    if name not in _TRAINERS:
        close = difflib.get_close_matches(name, list(_TRAINERS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown trainer {name!r} (known: {trainer_names()}){hint}")
    module, _, attr = _TRAINERS[name].partition(":")
    cls: type[Trainer] = getattr(importlib.import_module(module), attr)
    return cls


def __getattr__(name: str) -> Any:  # lazy re-exports: `from fedguard_train.trainers import FedHomoLLM`
    if name == "FedHomoLLM":
        return trainer_class("homo")
    if name in ("Trainer", "RunResult"):
        return getattr(importlib.import_module("fedguard_train.trainers.base"), name)
    raise AttributeError(name)


__all__ = ["register_trainer", "trainer_class", "trainer_names"]
