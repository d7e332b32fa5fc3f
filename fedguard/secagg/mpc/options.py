"""Options of ``aggregator: mpc``: a light module (no CrypTen, no cryptography imported).

The default backend is ``crypten``: real CrypTen party processes. ``simulated`` keeps every party in the
calling process, which protects nothing against that process; it exists for tests and simulations and
has to be asked for by name.

>>> MpcOptions().backend
'crypten'
>>> MpcOptions(backend="in-process")
Traceback (most recent call last):
...
fedguard.errors.ConfigError: backend 'in-process' was renamed: use backend='simulated' (parties in this process, no protection) or 'crypten' (real CrypTen party processes, the default)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final, Literal

from fedguard.checks import int_problem, number_problem
from fedguard.federation.protocol import AggregatorOptions
from fedguard.secagg.identity_files import (
    identity_files_problem,
    missing_identity_files,
    normalise_identity_files,
)
from fedguard.secagg.mpc.pin import party_keys_problem

__all__ = ["BACKENDS", "Backend", "MpcOptions", "NormAction"]

Backend = Literal["crypten", "simulated", "network"]
BACKENDS: Final[tuple[str, ...]] = ("crypten", "simulated", "network")
NormAction = Literal["exclude", "clip"]
MAX_SIMULATED_PARTIES: Final[int] = 16


@dataclass(frozen=True, kw_only=True)
class MpcOptions(AggregatorOptions):
    """Options of :class:`~fedguard.secagg.mpc.aggregator.MpcAggregator`.

    The fixed-point encoding the norm check reads ``q`` and ``s`` from is the round's
    (:attr:`fedguard.federation.protocol.RoundSpec.fixed_point`), not an option. Compute parties built by
    the caller are a runtime argument of the aggregator (``parties=``), not an option.

    Attributes:
        backend: ``"crypten"`` (default: :class:`~fedguard.secagg.mpc.parties.CryptenParties` processes on
            this machine, owned by the aggregator; call ``close()``), ``"network"`` (parties on other hosts
            running ``python -m fedguard.secagg.mpc.network``; the aggregator listens on ``listen`` and
            waits for them) or ``"simulated"`` (:class:`~fedguard.secagg.mpc.parties.SimulatedParties`: every
            party in this process, no CrypTen, **no protection**: tests and simulations only).
        n_parties: ``K`` (2 or 3 for CrypTen and network parties; up to 16 simulated).
        min_clients: the fewest clients whose inputs the parties will reveal a sum of (default 2). A "sum"
            over one client *is* that client's update, so values below 2 are refused unless
            ``allow_single_client=True`` says the caller accepts that.
        allow_single_client: the explicit opt-in for ``min_clients=1`` (e.g. a simulation with one client);
            with it a round in which only one client's shares survive reveals that client's update.
        norm_bound: ``B``, the largest accepted L2 norm of a client's (dequantised, unweighted) update;
            ``None`` switches the check off. Needs the round's fixed-point spec and parties with the norm
            check (not ``simulated``).
        norm_action: what happens to an over-bound update: ``"exclude"`` (default) leaves it out of the
            sum; ``"clip"`` scales it into the bound under MPC (a factor from a public ladder, at most one
            ladder step, <= 5.3%, below the exact clip; :mod:`fedguard.secagg.mpc.norm`) and excludes only
            updates more than ``2^clip_halvings`` times over the bound.
        clip_halvings: ``H`` for ``norm_action="clip"`` (default 4: updates up to 16x the bound are clipped).
        timeout_s: per-round timeout of parties built here.
        startup_timeout_s: how long parties built here may take to start (``"crypten"``) or to connect
            (``"network"``).
        listen: ``"HOST:PORT"`` the coordinator listens on (``backend="network"`` only).
        control_key_file: the 32-byte control key file shared with the parties (``backend="network"`` only).
        roster_file: the deployment's client roster (``fedguard roster add``). Parties built here
            (``"crypten"``, ``"simulated"``) then accept only shares signed by a rostered client, each round
            once; remote parties need their own copy (``party --roster FILE``). Needs ``identity_files``.
        identity_files: where the signing identities of the clients this process plays are (a path template
            with ``{client}`` or a mapping ``{client id: path}``); each client signs its share for every
            party. Needs ``roster_file``.
        party_keys_file: the compute parties' public keys, pinned (:mod:`fedguard.secagg.mpc.pin`: a JSON file
            written by whoever starts the parties and handed to the clients at set-up, like a TLS root
            certificate). A client built with it (:meth:`MpcAggregator.for_client
            <fedguard.secagg.mpc.aggregator.MpcAggregator.for_client>`, what a Flower worker builds) seals
            only to these keys and refuses a request naming other parties; a coordinator built with it
            refuses parties that connect with other keys. ``backend="network"`` only (parties started here
            draw fresh keys at each start, so there is nothing to pin); with it, ``listen`` and
            ``control_key_file`` may be left out by a configuration that is only a client's.
    """

    removed: ClassVar[dict[str, str]] = {
        "encoding": "the fixed-point encoding now travels with each round (RoundSpec.fixed_point; in the "
                       "trainer: federation.clip and federation.value_bits)",
    }


    backend: Backend = "crypten"
    n_parties: int = 3
    min_clients: int = 2
    allow_single_client: bool = False
    norm_bound: float | None = None
    norm_action: NormAction = "exclude"
    clip_halvings: int = 4
    timeout_s: float = 30.0
    startup_timeout_s: float = 300.0
    listen: str | None = None
    control_key_file: str | None = None
    roster_file: str | None = None
    identity_files: str | Mapping[Any, str] | None = None
    party_keys_file: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "identity_files", normalise_identity_files(self.identity_files))
        super().__post_init__()

    @property
    def simulated(self) -> bool:
        return self.backend == "simulated"

    def _problems(self) -> list[str]:
        problems: list[str] = []
        if self.backend == "in-process":  # the name before the default became real parties
            problems.append("backend 'in-process' was renamed: use backend='simulated' (parties in this process, "
                            "no protection) or 'crypten' (real CrypTen party processes, the default)")
        elif self.backend not in BACKENDS:
            problems.append(f"backend must be 'crypten', 'simulated' or 'network', got {self.backend!r}")
        high = MAX_SIMULATED_PARTIES if self.backend == "simulated" else 3
        problems += [p for p in (
            int_problem("n_parties", self.n_parties, low=2, high=high),
            int_problem("min_clients", self.min_clients, low=1),
            number_problem("norm_bound", self.norm_bound, low=0.0, low_open=True, optional=True),
            number_problem("timeout_s", self.timeout_s, low=0.0, low_open=True),
            number_problem("startup_timeout_s", self.startup_timeout_s, low=0.0, low_open=True),
        ) if p]
        if not isinstance(self.allow_single_client, bool):
            problems.append(f"allow_single_client must be a bool, got {self.allow_single_client!r}")
        elif self.min_clients == 1 and not self.allow_single_client:
            problems.append(
                f"min_clients={self.min_clients} lets the parties reveal a lone client's update (a sum over one "
                "client is that client's input): use min_clients >= 2, or set allow_single_client=True to accept that"
            )
        if self.norm_action not in ("exclude", "clip"):
            problems.append(f"norm_action must be 'exclude' or 'clip', got {self.norm_action!r}")
        elif self.norm_action == "clip":
            if self.norm_bound is None:
                problems.append("norm_action='clip' needs norm_bound")
            if int_problem("clip_halvings", self.clip_halvings, low=1, high=16):
                problems.append(f"norm_action='clip' needs clip_halvings >= 1 (at most 16), got {self.clip_halvings!r}")
        elif (problem := int_problem("clip_halvings", self.clip_halvings, low=0, high=16)) is not None:
            problems.append(problem)
        if self.backend == "simulated" and self.norm_bound is not None:
            problems.append("norm_bound runs under MPC: use backend='crypten' or 'network' "
                            "(simulated parties only add shares)")
        for name in ("listen", "control_key_file"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                problems.append(f"{name} must be a non-empty string or None, got {value!r}")
        if self.backend == "network" and (self.listen is None) != (self.control_key_file is None):
            problems.append("listen and control_key_file go together (the coordinator's address and the control "
                            "key it shares with the parties)")
        elif self.backend == "network" and self.listen is None and self.party_keys_file is None:
            problems.append("backend='network' needs listen='HOST:PORT' and control_key_file (a coordinator), or "
                            "party_keys_file (a client, which only seals to the pinned parties)")
        if self.party_keys_file is not None:
            if self.backend != "network":
                problems.append(f"party_keys_file pins the long-term keys of parties started elsewhere (backend="
                                f"'network'); backend={self.backend!r} parties draw fresh keys at each start")
            problem = party_keys_problem(self.party_keys_file, self.n_parties if isinstance(self.n_parties, int)
                                         else None)
            if problem is not None:
                problems.append(problem)
        if self.backend != "network" and (self.listen is not None or self.control_key_file is not None):
            problems.append("listen and control_key_file apply to backend='network' only")
        if (self.roster_file is None) != (self.identity_files is None):
            problems.append("roster_file and identity_files go together: the parties check the clients' "
                            "signatures against the roster, and the clients sign with their identities")
        if self.roster_file is not None and (not isinstance(self.roster_file, str)
                                             or not Path(self.roster_file).is_file()):
            problems.append(f"roster_file {self.roster_file!r} does not exist (create it with `fedguard roster add`)")
        if self.identity_files is not None:
            problem = identity_files_problem(self.identity_files) or missing_identity_files(self.identity_files)
            if problem:
                problems.append(problem)
        return problems
