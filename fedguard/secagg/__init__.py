"""Secure aggregation: one sub-package per protocol, each an :class:`~fedguard.federation.protocol.Aggregator`
with a frozen options class in a light ``options`` module.

* :mod:`fedguard.secagg.masking` — pairwise masking, SecAgg / SecAgg+ (``aggregator: masking``);
* :mod:`fedguard.secagg.paillier` — packed Paillier with a key-holding client (``aggregator: paillier``);
* :mod:`fedguard.secagg.mpc` — additive sharing over non-colluding CrypTen parties (``aggregator: mpc``).

Select them by name through :mod:`fedguard.federation.registry`; nothing here is imported eagerly.
"""
