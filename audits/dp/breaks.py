"""Deliberately broken DP mechanisms, for testing the audit (``fedguard audit dp --break noise|clip``).

An audit that never fires proves nothing: these wrappers weaken the real mechanism *silently* — the
accountant still records the configured noise multiplier and reports the configured ε — so the one-run
bound can be seen to exceed the accountant's ε when the implementation does not deserve it.

* ``noise``: the noise actually added is divided by ``divisor`` (default 10). Central placement: the
  server's Gaussian ``N(0, (z·C)²)`` becomes ``N(0, (z·C/divisor)²)`` (a :class:`~fedguard.rng.SecureRNG`
  whose ``normal`` scales its standard deviation; the only draw central DP takes from it). Distributed
  placement: each client's discrete Gaussian is drawn for noise multiplier ``z/divisor``.
  Example level (DP-SGD): Opacus' per-step noise ``N(0, (σC)²)`` is drawn at ``σ/divisor``.
* ``clip``: the client's update (or each example's gradient) is not clipped. Canaries larger than the
  clip norm then move the model by more than the sensitivity the noise was calibrated to.

Nothing here is reachable from ``fedguard train``: only the audit builds these, only when asked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from fedguard.checks import check_number
from fedguard.errors import ConfigError
from fedguard.rng import SecureRNG
from fedguard.updates import ClientUpdate
from fedguard_train.config import DPSection
from fedguard_train.hooks import RingEncoding
from fedguard_train.privacy import ClientDPHook

Break = Literal["noise", "clip"]
BREAKS: tuple[str, ...] = ("noise", "clip")
DEFAULT_NOISE_DIVISOR = 10.0

__all__ = ["BREAKS", "DEFAULT_NOISE_DIVISOR", "Break", "BrokenClientDPHook", "QuietGaussianRNG", "check_break"]


def check_break(breaks: str | None) -> Break | None:
    """``None`` or one of :data:`BREAKS` (typed error otherwise)."""
    if breaks is None:
        return None
    if breaks not in BREAKS:
        raise ConfigError(f"--break must be one of {list(BREAKS)}, got {breaks!r}")
    return breaks  # type: ignore[return-value]


class QuietGaussianRNG(SecureRNG):
    """A :class:`SecureRNG` whose Gaussian draws have ``1/divisor`` of the standard deviation asked for."""

    def __init__(self, divisor: float, seed: bytes | None = None) -> None:
        super().__init__(seed)
        self.divisor = check_number("noise divisor", divisor, low=1.0, low_open=True)

    def normal(self, n: int, *, std: float = 1.0) -> np.ndarray:
        return super().normal(n, std=std / self.divisor)


class BrokenClientDPHook(ClientDPHook):
    """The ``dp:`` hook with one silent bug (module doc); the accountant is untouched."""

    name = "dp"

    def __init__(self, section: DPSection | Mapping[str, Any], *, breaks: Break,
                 divisor: float = DEFAULT_NOISE_DIVISOR, **kwargs: Any) -> None:
        super().__init__(section, **kwargs)
        self.breaks = check_break(breaks)
        self.divisor = check_number("noise divisor", divisor, low=1.0, low_open=True)
        if self.breaks == "clip" and self.dp.config.adaptive is not None:
            raise ConfigError("--break clip with adaptive clipping is not supported (the clipped-count bit needs "
                              "the clip); use a fixed dp.clip_norm")
        if self.breaks == "noise" and not self.distributed:
            from fedguard.dp import ClientLevelDP

            # the same mechanism and accountant; only the Gaussian it draws is quieter
            self.dp = ClientLevelDP(self.dp.config, accountant=self.dp.accountant,
                                    rng=QuietGaussianRNG(self.divisor))

    def client_update(self, update: ClientUpdate) -> ClientUpdate:
        if self.breaks != "clip":
            return super().client_update(update)
        # the bug: weight 1 as DP-FedAvg wants, but no clipping
        return ClientUpdate(update.client_id, update.round, np.asarray(update.vector, dtype=np.float32), 1)

    def ring_encoding(self) -> RingEncoding | None:
        encoding = super().ring_encoding()
        if encoding is None or self.breaks != "noise":
            return encoding
        z = self.dp.config.noise_multiplier / self.divisor

        def encode(update: ClientUpdate, quantise_rng: SecureRNG) -> np.ndarray:
            mechanism = dataclasses.replace(self.dp.distributed_mechanism(update.vector.size), noise_multiplier=z)
            return mechanism.encode_noised(update.vector, rng=SecureRNG(), quantise_rng=quantise_rng)

        return RingEncoding(encoding.spec, encode)
