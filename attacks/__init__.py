"""Attacks against fedguard configurations: watermark removal and forgery (``attacks.watermark``), update
inversion (``attacks.inversion``) and membership inference (``attacks.membership``, metrics in ``attacks.roc``);
``attacks.run_view`` reads a run and its captured server view as an attacker would.

Each attack returns a result dataclass that an audit can report (``audits.leakage``, ``audits.report``).
Nothing in ``fedguard`` imports this package.
"""
