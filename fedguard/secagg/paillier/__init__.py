"""Packed Paillier secure aggregation: the server adds ciphertexts and never holds the private key.

* :mod:`~fedguard.secagg.paillier.aggregator` — :class:`PaillierAggregator`, the three-stage protocol,
  and the operations usable without it (:func:`encrypt_vector`, :func:`sum_ciphertexts`, :func:`decrypt_sum`);
* :mod:`~fedguard.secagg.paillier.options` — :class:`PaillierOptions` and the key-size policy (light: no
  phe, no gmpy2);
* :mod:`~fedguard.secagg.paillier.keys` — keys, CRT decryption, obfuscators (gmpy2);
* :mod:`~fedguard.secagg.paillier.packing` — :class:`SlotLayout`, many values per plaintext;
* :mod:`~fedguard.secagg.paillier.errors` — the typed errors.

Importing this package loads nothing heavy; the names below resolve on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedguard.secagg._lazy import lazy_getattr

if TYPE_CHECKING:
    from fedguard.secagg.paillier.aggregator import (
        PaillierAggregator,
        decrypt_sum,
        encrypt_vector,
        sum_ciphertexts,
    )
    from fedguard.secagg.paillier.errors import (
        CiphertextError,
        DecryptionError,
        ForeignKeyError,
        SlotLayoutError,
        SlotOverflowError,
    )
    from fedguard.secagg.paillier.keys import (
        ObfuscatorPool,
        PaillierKeypair,
        PaillierPrivateKey,
        PaillierPublicKey,
        generate_keypair,
    )
    from fedguard.secagg.paillier.options import PaillierOptions
    from fedguard.secagg.paillier.packing import SlotLayout

_LAZY = {
    "PaillierAggregator": "fedguard.secagg.paillier.aggregator",
    "decrypt_sum": "fedguard.secagg.paillier.aggregator",
    "encrypt_vector": "fedguard.secagg.paillier.aggregator",
    "sum_ciphertexts": "fedguard.secagg.paillier.aggregator",
    "CiphertextError": "fedguard.secagg.paillier.errors",
    "DecryptionError": "fedguard.secagg.paillier.errors",
    "ForeignKeyError": "fedguard.secagg.paillier.errors",
    "SlotLayoutError": "fedguard.secagg.paillier.errors",
    "SlotOverflowError": "fedguard.secagg.paillier.errors",
    "ObfuscatorPool": "fedguard.secagg.paillier.keys",
    "PaillierKeypair": "fedguard.secagg.paillier.keys",
    "PaillierPrivateKey": "fedguard.secagg.paillier.keys",
    "PaillierPublicKey": "fedguard.secagg.paillier.keys",
    "generate_keypair": "fedguard.secagg.paillier.keys",
    "PaillierOptions": "fedguard.secagg.paillier.options",
    "SlotLayout": "fedguard.secagg.paillier.packing",
}

__all__ = [
    "CiphertextError",
    "DecryptionError",
    "ForeignKeyError",
    "ObfuscatorPool",
    "PaillierAggregator",
    "PaillierKeypair",
    "PaillierOptions",
    "PaillierPrivateKey",
    "PaillierPublicKey",
    "SlotLayout",
    "SlotLayoutError",
    "SlotOverflowError",
    "decrypt_sum",
    "encrypt_vector",
    "generate_keypair",
    "sum_ciphertexts",
]

__getattr__ = lazy_getattr(__name__, _LAZY)
