"""Preloaded by the ``forkserver`` that starts CrypTen party processes (never imported elsewhere).

Importing torch and CrypTen once in the fork server, instead of once per party, cuts the start-up of a
pool of parties from one interpreter start per process to one in total. The fork server is a process of
its own: CrypTen still never enters the coordinator's (or DeepSpeed's) process. Nothing is initialised
here; ``crypten.init()`` runs in each forked party.
"""

from __future__ import annotations

import torch  # noqa: F401

from fedguard.secagg.mpc.crypten_compat import load_crypten

load_crypten()
