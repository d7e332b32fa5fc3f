"""DP audit in one training run: an empirical lower bound on ε beside the accountant's upper bound.

* :mod:`audits.dp.bound` — the one-run bound of Steinke, Nasr, Jagielski (NeurIPS 2023) with scipy, the
  guess grid with its Bonferroni correction, and the ceiling;
* :mod:`audits.dp.canaries` — membership, client canaries (random directions, Andrew et al., ICLR 2024)
  and example canaries (random token sequences);
* :mod:`audits.dp.client` — the client-level audit of DP-FedAvg through the real trainer round;
* :mod:`audits.dp.example` — the example-level audit of DP-SGD (Opacus) on one client's data;
* :mod:`audits.dp.breaks` — silently broken mechanisms (``--break noise|clip``) the audit should catch;
* :mod:`audits.dp.report`, :mod:`audits.dp.cli` — ``fedguard audit dp CONFIG.yaml --canaries M``.

Submodules import torch and the trainer; this package file imports nothing heavy.
"""
