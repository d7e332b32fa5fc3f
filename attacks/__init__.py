"""Leakage and watermark-removal attacks against fedguard configurations; each returns a result dataclass."""
