"""``aggregator: mpc`` over Flower: the compute parties of a deployment and the key pin its clients get.

An MPC client seals its shares to the compute parties' public keys, and must not learn them from the
server (a server that names parties of its own reads every share). In process the aggregator starts the
parties and its clients share its view of their keys; over Flower the clients are separate workers, so
each one pins the keys from a **party-keys file** (:mod:`fedguard.secagg.mpc.pin`) handed to it at set-up,
like the TLS root certificate, and its aggregator is the client-only
:meth:`MpcAggregator.for_client <fedguard.secagg.mpc.aggregator.MpcAggregator.for_client>`: it starts no
party, seals only to the pinned keys and refuses a request naming others (that client's dropout).

What :class:`MpcParties` does for the two backends a Flower deployment accepts:

* ``backend: crypten`` (the default: parties on this machine). The launcher starts them itself, as the
  party programs of :mod:`fedguard.secagg.mpc.network` on ``127.0.0.1`` (the same CrypTen party code the
  ``crypten`` backend forks, started as separate programs), before any client: each party gets a long-term
  X25519 key in ``<run_dir>/flower/mpc/party<k>.key`` (mode 0600, kept across restarts and ``--resume``,
  never overwritten), the deployment a control key, and the clients the pin ``party_keys.json``. The run's
  configuration then says ``backend: network`` with ``listen`` (a loopback port), ``control_key_file`` and
  ``party_keys_file``; the ServerApp's aggregator waits for the parties on that port and refuses any whose
  key differs from the pin (:func:`fedguard.secagg.mpc.parties.check_pinned`). With ``norm_bound`` the
  dealer (CrypTen's trusted third party) runs beside them; with ``roster_file`` every party checks the
  clients' signatures against it. A party exits when the ServerApp that coordinated it is gone (end of
  run, SuperLink restart): :meth:`MpcParties.ensure_running` starts them again, same keys, before every
  submission.
* ``backend: network`` (parties run by other organisations): the configuration must pin them
  (``party_keys_file``, the file their operators publish) and name the coordinator's ``listen`` and
  ``control_key_file``; the launcher starts nothing and hands the clients the configuration as it is.

``backend: simulated`` keeps every party in the server's process: over Flower the clients could only take
the keys from the server, so it is refused.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from fedguard.errors import ConfigError
from fedguard.secagg.mpc.options import MpcOptions

PIN_NAME = "party_keys.json"
CONTROL_KEY_NAME = "control.key"
PARTY_STARTUP_MARGIN_S = 600.0
"""Seconds a party keeps trying to reach the coordinator beyond the deployment's join timeout (the
ServerApp listens only once every client has joined)."""


def party_key_path(directory: Path, rank: int) -> Path:
    return directory / f"party{rank}.key"


class MpcParties:
    """The compute parties of one Flower deployment (see the module doc).

    Args:
        flower: the deployment's processes (:class:`~fedguard_train.flower.launcher.FlowerProcesses`): the
            parties are started, logged and stopped with them.
        options: the run's ``aggregator_options`` (:class:`MpcOptions`).
        directory: where the keys and the pin are kept (``<run_dir>/flower/mpc``).
        connect_timeout: how long a started party keeps trying to reach the ServerApp (seconds).
        cwd: where the parties run (relative paths of the options, e.g. ``roster_file``, are relative to it).
    """

    def __init__(self, flower: Any, options: MpcOptions, directory: Path, *, connect_timeout: float,
                 cwd: Path | None = None) -> None:
        if options.backend == "simulated":
            raise ConfigError("aggregator mpc with backend 'simulated' cannot run over Flower: its parties live in the "
                              "server's process, so the clients could only take their keys from the server. Use "
                              "backend 'crypten' (parties started on this machine) or 'network'")
        if options.backend == "network" and (options.party_keys_file is None or options.listen is None):
            raise ConfigError("aggregator mpc with backend 'network' over Flower needs party_keys_file (the parties' "
                              "public keys, which every client pins) and the coordinator's listen and "
                              "control_key_file")
        self.flower = flower
        self.options = options
        self.dir = Path(directory).absolute()
        self.cwd = cwd
        self.managed = options.backend == "crypten"
        self.connect_timeout = float(connect_timeout)
        self.public_keys: tuple[bytes, ...] = ()
        self._listen = ""

    @property
    def names(self) -> list[str]:
        """The process names of the parties (and dealer) this deployment started."""
        if not self.managed:
            return []
        return [f"mpc-party-{r}" for r in range(self.options.n_parties)] + (
            ["mpc-dealer"] if self.options.norm_bound is not None else [])

    def prepare(self) -> dict[str, Any]:
        """Keys, control key and pin (created if missing, never overwritten); the ``aggregator_options`` the
        run then uses (server and clients: the clients read only the pin from them). No process starts."""
        if not self.managed:
            return self.options.to_dict()
        from fedguard.secagg.mpc.network import write_control_key, write_party_key
        from fedguard.secagg.mpc.pin import write_party_keys
        from fedguard.secagg.mpc.sharing import public_key_bytes
        from fedguard_train.flower.launcher import free_port

        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        keys = []
        for rank in range(self.options.n_parties):
            path = party_key_path(self.dir, rank)
            if path.exists():
                from fedguard.secagg.mpc.network import read_party_key

                keys.append(public_key_bytes(read_party_key(path)))
            else:
                keys.append(write_party_key(path))
        self.public_keys = tuple(keys)
        control = self.dir / CONTROL_KEY_NAME
        if not control.exists():
            write_control_key(control)
        pin = write_party_keys(self.dir / PIN_NAME, self.public_keys)  # refuses a pin with other keys
        self._listen = f"127.0.0.1:{free_port()}"
        return {**self.options.to_dict(), "backend": "network", "listen": self._listen,
                "control_key_file": str(control), "party_keys_file": str(pin)}

    def start(self) -> None:
        """Start the parties (and the dealer with the norm check): they rendezvous with each other over gloo
        on loopback, then keep trying to reach the ServerApp's coordinator for :attr:`connect_timeout` s."""
        if not self.managed:
            return
        if not self._listen:
            raise ConfigError("MpcParties.prepare() first")
        from fedguard_train.flower.launcher import free_port

        o = self.options
        common = ["--parties", str(o.n_parties), "--rendezvous", f"127.0.0.1:{free_port()}", "--interface", "lo",
                  "--timeout", repr(float(o.timeout_s))]
        program = [sys.executable, "-m", "fedguard.secagg.mpc.network"]
        env = self.flower.env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        for rank in range(o.n_parties):
            cmd = [*program, "party", "--rank", str(rank), *common, "--coordinator", self._listen,
                   "--control-key", str(self.dir / CONTROL_KEY_NAME), "--key-file", str(party_key_path(self.dir, rank)),
                   "--startup-timeout", repr(self.connect_timeout)]
            if o.norm_bound is not None:
                cmd.append("--norm-check")
            if o.roster_file is not None:
                cmd += ["--roster", str(o.roster_file)]
            self.flower.spawn(f"mpc-party-{rank}", cmd, env, cwd=self.cwd)
        if o.norm_bound is not None:
            self.flower.spawn("mpc-dealer", [*program, "dealer", *common], env, cwd=self.cwd)

    def running(self) -> bool:
        """Whether every party (and the dealer) this deployment started is still running."""
        procs = self.flower.procs
        return all(name in procs and procs[name].poll() is None for name in self.names)

    def ensure_running(self) -> None:
        """Start the parties again (same keys, a new rendezvous) unless all of them are running: a party
        exits with the ServerApp that coordinated it (at the end of a run)."""
        if not self.managed or self.running():
            return
        self.restart()

    def restart(self) -> None:
        """Stop the parties this deployment started (if still running) and start them again, same keys: after
        a SuperLink restart, whose old ServerApp they may still be connected to for a moment."""
        if not self.managed:
            return
        for name in self.names:
            self.flower.kill(name)
            proc = self.flower.procs.get(name)
            if proc is not None:
                proc.wait(timeout=10)
        self.start()
