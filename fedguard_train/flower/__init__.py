"""fedguard on Flower's Deployment Engine: the same trainers, aggregators and hooks across processes and machines.

FATE-LLM's trainers (arXiv:2310.10049, §3) run here with every client on its own Flower SuperNode and the
server in a Flower ServerApp, talking through Flower's Message API (Flower 1.42; the ``flower`` extra):

* :mod:`.rounds` — one round whose clients are remote: the aggregator's server-side stage machine driven
  with one network round trip per protocol stage; network dropouts feed its dropout logic;
* :mod:`.coordinator` — the server's trainer (run loop, resume, evaluation, checkpoints) over those rounds;
* :mod:`.worker` — one client's long-lived process (model, hooks, the aggregator's client side);
* :mod:`.ipc` and :mod:`.messages` — how payloads reach the worker, and how they ride in Flower messages;
* :mod:`.server_app` / :mod:`.client_app` — the Flower ServerApp and ClientApp;
* :mod:`.certs` and :mod:`.launcher` — TLS material and the processes of ``fedguard flower run``;
* :mod:`.dp_strategy` — fedguard's privacy accountant around Flower's own DP strategy wrappers.

Only :mod:`.messages`, :mod:`.server_app`, :mod:`.client_app` and :mod:`.dp_strategy` import ``flwr``.
"""

from __future__ import annotations

import importlib.util


def flower_available() -> bool:
    """Whether ``flwr`` can be imported here (install ``fedguard[flower]``)."""
    return importlib.util.find_spec("flwr") is not None
