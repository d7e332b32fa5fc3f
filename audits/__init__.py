"""Audits that write JSON + Markdown reports with plots (:mod:`audits.report`).

Today: the ownership audit (:mod:`audits.ownership`, ``fedguard audit ownership``). Differential-privacy and
leakage audits are not written yet. Nothing in ``fedguard`` imports this package.
"""
