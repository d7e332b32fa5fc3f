"""Test helpers that ship with fedguard so plug-in implementations can reuse them.

``fedguard.testing.aggregator_contract.AggregatorContract`` is the contract every aggregator inherits
(needs ``pytest`` and ``hypothesis``, the ``dev`` extra).
"""
