"""MPC secure aggregation: secret-shared updates across non-colluding compute parties (CrypTen).

* :mod:`~fedguard.secagg.mpc.aggregator` — :class:`MpcAggregator`, the one-stage protocol;
* :mod:`~fedguard.secagg.mpc.options` — :class:`MpcOptions` (light: nothing heavy imported);
* :mod:`~fedguard.secagg.mpc.sharing` — additive shares sealed to each party (X25519 + AES-GCM);
* :mod:`~fedguard.secagg.mpc.parties` — :class:`CryptenParties` (party processes, the default) and
  :class:`SimulatedParties` (every party in this process: tests and simulations, no protection);
* :mod:`~fedguard.secagg.mpc.network` — parties on other machines (``python -m fedguard.secagg.mpc.network``);
* :mod:`~fedguard.secagg.mpc.pin` — the parties' public keys as clients pin them (the party-keys file);
* :mod:`~fedguard.secagg.mpc.norm` — the exact norm check and clipping under MPC;
* :mod:`~fedguard.secagg.mpc.crypten_compat`, :mod:`~fedguard.secagg.mpc.crypten_rng`,
  :mod:`~fedguard.secagg.mpc.preload` — CrypTen 0.4.1 on torch 2.13, ChaCha20 generators for CrypTen,
  and the fork server's preload.

Importing this package loads nothing heavy (CrypTen only ever loads inside party processes); the names
below resolve on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedguard.secagg._lazy import lazy_getattr

if TYPE_CHECKING:
    from fedguard.secagg.mpc.aggregator import (
        INVALID_DROPPED,
        NORM_CHECK_DROPPED,
        MpcAggregator,
        unweighted_input,
    )
    from fedguard.secagg.mpc.norm import NormCheck
    from fedguard.secagg.mpc.options import MpcOptions
    from fedguard.secagg.mpc.parties import ComputeParties, CryptenParties, PinnedParties, SimulatedParties

_LAZY = {
    "MpcAggregator": "fedguard.secagg.mpc.aggregator",
    "INVALID_DROPPED": "fedguard.secagg.mpc.aggregator",
    "NORM_CHECK_DROPPED": "fedguard.secagg.mpc.aggregator",
    "unweighted_input": "fedguard.secagg.mpc.aggregator",
    "NormCheck": "fedguard.secagg.mpc.norm",
    "MpcOptions": "fedguard.secagg.mpc.options",
    "ComputeParties": "fedguard.secagg.mpc.parties",
    "CryptenParties": "fedguard.secagg.mpc.parties",
    "SimulatedParties": "fedguard.secagg.mpc.parties",
    "PinnedParties": "fedguard.secagg.mpc.parties",
}

__all__ = [
    "ComputeParties",
    "CryptenParties",
    "INVALID_DROPPED",
    "MpcAggregator",
    "MpcOptions",
    "NORM_CHECK_DROPPED",
    "NormCheck",
    "PinnedParties",
    "SimulatedParties",
    "unweighted_input",
]

__getattr__ = lazy_getattr(__name__, _LAZY)
