"""Leakage and watermark-removal attacks against fedguard configurations (none written yet).

Each attack is to return a result dataclass that an audit can report. Nothing in ``fedguard`` imports this
package.
"""
