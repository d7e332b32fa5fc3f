"""Secure aggregation by pairwise masking: SecAgg (Bonawitz et al., CCS 2017) and SecAgg+ (Bell et al.,
CCS 2020).

* :mod:`~fedguard.secagg.masking.aggregator` — :class:`MaskingAggregator`, the four-stage protocol;
* :mod:`~fedguard.secagg.masking.options` — :class:`MaskingOptions` (light: no cryptography imported);
* :mod:`~fedguard.secagg.masking.crypto` — X25519 key agreement, sealed shares, ChaCha20 masks;
* :mod:`~fedguard.secagg.masking.graph` — the SecAgg+ communication graph (Harary graph);
* :mod:`~fedguard.secagg.masking.shamir` — Shamir secret sharing over a 257-bit prime field.

Importing this package loads nothing heavy; the names below resolve on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedguard.secagg._lazy import lazy_getattr

if TYPE_CHECKING:
    from fedguard.secagg.masking.aggregator import MaskingAggregator, MaskingParams, ShareCommitmentError
    from fedguard.secagg.masking.graph import CommunicationGraph
    from fedguard.secagg.masking.options import MaskingOptions

_LAZY = {
    "MaskingAggregator": "fedguard.secagg.masking.aggregator",
    "MaskingParams": "fedguard.secagg.masking.aggregator",
    "ShareCommitmentError": "fedguard.secagg.masking.aggregator",
    "CommunicationGraph": "fedguard.secagg.masking.graph",
    "MaskingOptions": "fedguard.secagg.masking.options",
}

__all__ = [
    "CommunicationGraph",
    "MaskingAggregator",
    "MaskingOptions",
    "MaskingParams",
    "ShareCommitmentError",
]

__getattr__ = lazy_getattr(__name__, _LAZY)
