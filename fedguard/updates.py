"""``ClientUpdate``: what a client contributes to one federated round.

``vector`` is the flat float32 update ``local - global`` over an :class:`~fedguard.params.AdapterLayout`;
``weight`` is the client's sample count, the weight of FedAvg (McMahan et al., 2017):
``global' = global + Σ_i w_i Δ_i / Σ_i w_i``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedguard.checks import int_problem
from fedguard.errors import ConfigError, InvalidUpdateError


@dataclass(frozen=True, slots=True)
class ClientUpdate:
    """One client's update for one round; validated on construction (NaN/inf are refused)."""

    client_id: int
    round: int
    vector: np.ndarray
    weight: int

    def __post_init__(self) -> None:
        problems = [p for p in (
            int_problem("client_id", self.client_id, low=0),
            int_problem("round", self.round, low=0),
            int_problem("weight (a sample count)", self.weight, low=1),
        ) if p]
        if problems:
            raise ConfigError.collect(problems)
        object.__setattr__(self, "client_id", int(self.client_id))  # numpy ints are accepted as Python ints
        object.__setattr__(self, "round", int(self.round))
        v = self.vector
        if not isinstance(v, np.ndarray) or v.dtype != np.float32 or v.ndim != 1:
            raise InvalidUpdateError(
                f"client {self.client_id}: vector must be a 1-D float32 numpy array, got "
                f"{getattr(v, 'dtype', type(v).__name__)} with shape {getattr(v, 'shape', None)}"
            )
        finite = np.isfinite(v)
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            raise InvalidUpdateError(
                f"client {self.client_id} round {self.round}: update has {int((~finite).sum())} non-finite "
                f"value(s), first at index {bad} ({v[bad]})"
            )
