"""Compatibility layer for CrypTen 0.4.1 (the last release, 2022) on torch 2.6 - 2.13.

Import CrypTen **only** through :func:`load_crypten`; never ``import crypten`` directly. Three fixes, each
pinned by a test in ``tests/secagg_mpc/test_crypten_compat.py`` that fails without it (DESIGN.md §5):

1. **The moved ONNX registry.** ``crypten.nn.onnx_converter`` does
   ``from torch.onnx._internal.registration import registry``; torch 2.9+ moved that module to
   ``torch.onnx._internal.torchscript_exporter.registration``, so a bare ``import crypten`` raises
   :class:`ModuleNotFoundError`. :func:`install_onnx_registration_alias` registers the new module under
   the old name in :data:`sys.modules` (only when the old name is missing and the new one exists), then
   CrypTen imports unchanged. fedguard never uses CrypTen's ONNX converter; the alias only lets the
   package import.

2. **The decode rounding bug.** 0.4.1's ``FixedPointEncoder.decode`` computes, for a negative encoded
   integer ``t`` and scale ``S = 2^p``, ``floor(t / (S - 1)) + (t mod S) / S``: the divisor should be ``S``.
   For ``t = -(k·S + r)`` with ``0 < r < S`` the wrong divisor gives ``-(k + 2)`` instead of ``-(k + 1)``
   whenever ``k + r >= S - 1``, i.e. a value exactly 1.0 too low (for ``|x|`` around 1 that is about one
   value in ``S = 65536``; more often, and by more than 1.0, as ``|x|`` grows). :func:`fixed_decode`
   is the correct decode,

       x = floor(t / S) + (t mod S) / S,      with  0 <= (t mod S) < S,

   which is exact for every ``t`` up to float32's representation of the result; scale 1 (integer
   tensors, ``precision=0``) returns the integers unchanged. :func:`patch_fixed_point_decode` installs
   it on ``crypten.encoder.FixedPointEncoder``.

3. **Non-cryptographic randomness.** CrypTen draws its masks and Beaver triples from MT19937 generators
   with 64-bit seeds; :mod:`fedguard.secagg.mpc.crypten_rng` replaces them with ChaCha20 streams keyed by
   256-bit seeds (installed by :func:`load_crypten`).

A fourth fact is not a bug but a rule: ``crypten.init()`` takes over the process's *default*
``torch.distributed`` process group. CrypTen must therefore never run in a process that also runs
DeepSpeed (or anything else that owns the default group): fedguard runs each MPC compute party in its
own OS process (:mod:`fedguard.secagg.mpc.parties`). :func:`load_crypten` refuses to load CrypTen into a
process in which ``deepspeed`` is already imported.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

import torch

from fedguard.errors import ConfigError

OLD_REGISTRATION = "torch.onnx._internal.registration"
"""Where CrypTen 0.4.1 looks for torch's ONNX symbolic registry."""
NEW_REGISTRATION = "torch.onnx._internal.torchscript_exporter.registration"
"""Where torch >= 2.9 keeps it."""
SUPPORTED_CRYPTEN = "0.4.1"


class CryptenUnavailableError(ConfigError):
    """CrypTen is not installed, is another version than the one this module patches, or may not be
    loaded into this process (DeepSpeed is already there)."""


def install_onnx_registration_alias() -> bool:
    """Alias the moved registry module under its old name; returns whether an alias was installed.

    Nothing is changed when the old module still exists (older torch) or the new one does not.
    """
    if OLD_REGISTRATION in sys.modules:
        return False
    try:
        importlib.import_module(OLD_REGISTRATION)
        return False
    except ModuleNotFoundError:
        pass
    try:
        new = importlib.import_module(NEW_REGISTRATION)
    except ModuleNotFoundError:
        return False
    sys.modules[OLD_REGISTRATION] = new
    parent = importlib.import_module("torch.onnx._internal")
    if not hasattr(parent, "registration"):
        parent.registration = new  # type: ignore[attr-defined]
    return True


def fixed_decode(tensor: torch.Tensor | None, scale: int) -> torch.Tensor | None:
    """Correct fixed-point decode: ``floor(t / S) + (t mod S) / S`` as float32 (``S = scale``).

    >>> fixed_decode(torch.tensor([-131071, -1, 65536, 98304]), 65536).tolist()
    [-1.9999847412109375, -1.52587890625e-05, 1.0, 1.5]
    """
    if tensor is None:
        return None
    if tensor.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"fixed_decode needs an integer tensor, got {tensor.dtype}")
    if scale == 1:
        return tensor.data
    t = tensor.long()
    quotient = torch.div(t, scale, rounding_mode="floor")
    remainder = t - quotient * scale  # in [0, scale)
    return (quotient.float() + remainder.float() / scale).data


def _patched_decode(self: Any, tensor: torch.Tensor | None) -> torch.Tensor | None:
    return fixed_decode(tensor, int(self._scale))


def patch_fixed_point_decode(crypten_module: ModuleType) -> None:
    """Replace ``crypten.encoder.FixedPointEncoder.decode`` by :func:`fixed_decode` (idempotent)."""
    encoder_cls = crypten_module.encoder.FixedPointEncoder
    if getattr(encoder_cls.decode, "__fedguard_patched__", False):
        return
    _patched_decode.__fedguard_patched__ = True  # type: ignore[attr-defined]
    _patched_decode.__fedguard_original__ = encoder_cls.decode  # type: ignore[attr-defined]
    encoder_cls.decode = _patched_decode


def original_decode(crypten_module: ModuleType) -> Any:
    """CrypTen's own (unpatched) decode, kept for tests that demonstrate the bug."""
    decode = crypten_module.encoder.FixedPointEncoder.decode
    return getattr(decode, "__fedguard_original__", decode)


def load_crypten() -> ModuleType:
    """Import CrypTen with the three fixes applied and return the module.

    Raises:
        CryptenUnavailableError: CrypTen is missing or not version 0.4.1, or ``deepspeed`` is imported
            in this process (``crypten.init()`` would take over DeepSpeed's default process group).
    """
    if "deepspeed" in sys.modules:
        raise CryptenUnavailableError(
            "refusing to load CrypTen into a process that has imported deepspeed: crypten.init() takes over "
            "the default torch.distributed group; run MPC compute parties in their own processes"
        )
    install_onnx_registration_alias()
    if "crypten" not in sys.modules:
        # a failed bare `import crypten` leaves its already-imported submodules behind, bound to a
        # package object that no longer exists; drop them so the package imports whole
        for name in [m for m in sys.modules if m.startswith("crypten.")]:
            del sys.modules[name]
    try:
        crypten = importlib.import_module("crypten")
    except ModuleNotFoundError as err:
        raise CryptenUnavailableError(
            f"CrypTen is not installed ({err}); install it with `pip install --no-deps crypten==0.4.1`"
        ) from err
    version = getattr(crypten, "__version__", "?")
    if version != SUPPORTED_CRYPTEN:
        raise CryptenUnavailableError(
            f"fedguard's CrypTen compatibility layer supports crypten=={SUPPORTED_CRYPTEN}, found {version}"
        )
    patch_fixed_point_decode(crypten)
    from fedguard.secagg.mpc.crypten_rng import install_stream_generators

    install_stream_generators(crypten)
    return crypten
