"""Watermark-removal and ambiguity attacks against FedIPR sign watermarks (issue 14).

Each attack takes a model the attacker holds (the released, merged model, or the adapter on its base),
the owners' keys *only to measure* (the attacker never uses them), and the attacker's data, and returns
one :class:`~attacks.watermark.result.AttackResult` per strength: bits matched and p-value per owner, the
verdict, and the change in task loss the attacker paid.

* :mod:`~attacks.watermark.transforms` — prune, quantise, exact re-parametrisations (norm fold with sign
  flips, MLP permutation, head permutation, per-head rotation);
* :mod:`~attacks.watermark.finetune` — same-task fine-tuning (steps, lr, which parameters, data source);
* :mod:`~attacks.watermark.overwrite` — the attacker embeds 1..K keys of its own;
* :mod:`~attacks.watermark.ambiguity` — offset forgery and seed trying (refused by the audit);
* :mod:`~attacks.watermark.suite` — the default suite, its JSON/Markdown/PNG report and the CLI.
"""
