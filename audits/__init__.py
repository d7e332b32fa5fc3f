"""Ownership, differential-privacy and leakage audits, with JSON + Markdown/HTML reports and plots."""
