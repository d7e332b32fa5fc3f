"""Private ownership watermarks for federated adapters (FedIPR, Li et al. TPAMI 2022; FATE-LLM §3.1).

Each client embeds its own secret watermark into the shared trainable parameters while it trains, and
can later prove ownership of the federated model from the model and its key alone, with a p-value:

* :mod:`~fedguard.watermark.keys` — keys from a 256-bit seed, key files (0600, versioned, checksummed);
* :mod:`~fedguard.watermark.sign` — the feature-based sign watermark (regulariser + extraction);
* :mod:`~fedguard.watermark.invariant` — extraction that survives function-preserving re-parametrisation
  (``invariant``: norm folding; ``gram``: also output-side permutations and rotations);
* :mod:`~fedguard.watermark.backdoor` — the trigger-set watermark, verified black-box by generation;
* :mod:`~fedguard.watermark.capacity` — FedIPR's bound for K clients;
* :mod:`~fedguard.watermark.verify` — :class:`Detection` and the exact binomial test;
* :mod:`~fedguard.watermark.calibration` — the audit recomputes a key's offsets from the base model;
* :mod:`~fedguard.watermark.commitment` — public key commitments made at round 0.

Two lines in a torch loop::

    wm = SignWatermark(load_key("client0.key"), model)
    loss = task_loss + wm.loss()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Exports are imported lazily (PEP 562): `fedguard keygen ...` registers its parser through
# fedguard.watermark.cli without pulling torch, transformers or scipy into every `fedguard` command.
_EXPORTS: dict[str, str] = {
    "BackdoorWatermark": "backdoor",
    "make_backdoor_key": "backdoor",
    "CapacityError": "capacity",
    "CapacityPlan": "capacity",
    "plan_capacity": "capacity",
    "reparametrise_norm": "invariant",
    "BackdoorKey": "keys",
    "CorruptKeyError": "keys",
    "SignKey": "keys",
    "TargetBlock": "keys",
    "WatermarkKey": "keys",
    "load_key": "keys",
    "save_key": "keys",
    "SignWatermark": "sign",
    "make_sign_key": "sign",
    "MissingTargetError": "targets",
    "prepare_norm_targets": "targets",
    "DEFAULT_SIGNIFICANCE": "verify",
    "BlockAgreement": "verify",
    "Detection": "verify",
    "binomial_p_value": "verify",
}

if TYPE_CHECKING:
    import torch

    from fedguard.watermark.backdoor import BackdoorWatermark, make_backdoor_key
    from fedguard.watermark.capacity import CapacityError, CapacityPlan, plan_capacity
    from fedguard.watermark.invariant import reparametrise_norm
    from fedguard.watermark.keys import (
        BackdoorKey,
        CorruptKeyError,
        SignKey,
        TargetBlock,
        WatermarkKey,
        load_key,
        save_key,
    )
    from fedguard.watermark.sign import SignWatermark, make_sign_key
    from fedguard.watermark.targets import MissingTargetError, prepare_norm_targets
    from fedguard.watermark.verify import DEFAULT_SIGNIFICANCE, BlockAgreement, Detection, binomial_p_value


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedguard.watermark' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fedguard.watermark.{module}"), name)
    globals()[name] = value
    return value


def verify_key(model: torch.nn.Module, key: WatermarkKey, significance: float = 1e-6, *,
               base: torch.nn.Module | None = None, test: str = "binomial") -> Detection:
    """Verify one key of either scheme against a model (white-box for sign keys, by generation for
    backdoor keys); ``significance`` defaults to :data:`DEFAULT_SIGNIFICANCE` (1e-6). With ``base`` (the
    public starting model) invariant/gram sign keys are read after undoing a residual-stream rotation
    (:mod:`fedguard.watermark.alignment`). (Not named ``verify``: that is the submodule
    :mod:`fedguard.watermark.verify`.) ``test``: a sign key's test, ``"binomial"`` (the bit count) or
    ``"sign-flip"`` (:func:`fedguard.watermark.verify.sign_flip_p_value`); backdoor keys have only their
    binomial count."""
    from fedguard.errors import ConfigError
    from fedguard.watermark.backdoor import BackdoorWatermark
    from fedguard.watermark.keys import BackdoorKey, SignKey
    from fedguard.watermark.sign import SignWatermark

    if isinstance(key, SignKey):
        return SignWatermark(key, model, align_to=base).detect(significance, test=test)
    if isinstance(key, BackdoorKey):
        if test != "binomial":
            raise ConfigError(f"a backdoor key is tested by its trigger count (binomial), not {test!r}")
        return BackdoorWatermark(key).detect(model, significance)
    raise ConfigError(f"not a watermark key: {type(key).__name__}")


__all__ = [
    "BackdoorKey",
    "BackdoorWatermark",
    "BlockAgreement",
    "CapacityError",
    "CapacityPlan",
    "CorruptKeyError",
    "DEFAULT_SIGNIFICANCE",
    "Detection",
    "MissingTargetError",
    "SignKey",
    "SignWatermark",
    "TargetBlock",
    "WatermarkKey",
    "binomial_p_value",
    "load_key",
    "make_backdoor_key",
    "make_sign_key",
    "plan_capacity",
    "prepare_norm_targets",
    "reparametrise_norm",
    "save_key",
    "verify_key",
]
