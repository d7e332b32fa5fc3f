"""MPC parties against a server that makes up clients or replays a job (issue 12, part 5).

The attack: the server silences every participant but the victim and submits shares it sealed itself
(zeros) under the silenced participants' ids; the parties "sum" the victim's input with zeros and reveal it.
Sealing needs only the parties' *public* keys, so without client signatures the parties cannot tell. With
a roster at the parties, every share needs its client's Ed25519 signature bound to deployment, round,
client and party: the made-up shares count as invalid, too few remain, nothing is revealed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedguard.errors import ProtocolAbort
from fedguard.federation.protocol import RoundSpec
from fedguard.federation.transport import InProcessTransport
from fedguard.identity import Identity, Roster
from fedguard.rng import SecureRNG
from fedguard.secagg.mpc import MpcAggregator, SimulatedParties
from fedguard.secagg.mpc.parties import AggregationJob
from fedguard.secagg.mpc.sharing import SealedShares, seal

IDS = (20, 21, 22)
IDENTITIES = {c: Identity.generate(c) for c in IDS}
ROSTER = Roster.of(IDENTITIES, "mpc-test")


def _honest_job(agg: MpcAggregator, spec: RoundSpec, xs: dict[int, np.ndarray]) -> dict[int, SealedShares]:
    """Run the clients and capture what the server would hand the parties."""
    captured: dict[int, SealedShares] = {}
    parties = agg.parties
    original = parties.aggregate

    def capture(job: AggregationJob):  # type: ignore[no-untyped-def]
        captured.update(job.inputs)
        return original(job)

    parties.aggregate = capture  # type: ignore[method-assign]
    try:
        InProcessTransport().run(agg.server(spec), {c: agg.client(spec, c, xs[c]) for c in IDS})
    finally:
        parties.aggregate = original  # type: ignore[method-assign]
    return captured


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _made_up(parties: Any, spec: RoundSpec, client: int) -> SealedShares:
    zeros = np.zeros(spec.vector_length, dtype=np.uint64)
    return seal(zeros, parties.public_keys, round_id=spec.round_id, client_id=client, rng=SecureRNG())


@pytest.mark.parametrize("with_roster", [False, True])
def test_made_up_clients_beside_one_victim(with_roster: bool) -> None:
    parties = SimulatedParties(3, roster=ROSTER if with_roster else None)
    agg = MpcAggregator(parties=parties, identities=IDENTITIES, deployment="mpc-test", min_clients=2)
    spec = RoundSpec(3, IDS, 6)
    rng = SecureRNG.for_testing("sybil")
    xs = {c: rng.ring_elements(6, 64) for c in IDS}
    honest = _honest_job(agg, spec, xs)
    attack_spec = RoundSpec(4, IDS, 6)  # a fresh round (the parties serve each round once)
    victim = agg.client(attack_spec, 20, xs[20])
    server = agg.server(attack_spec)
    outbox = server.open()
    server.accept(20, victim.handle(outbox[20]))
    victim_sealed = server._inbox[20]  # the victim's real, accepted message
    sealed_victim = SealedShares(victim_sealed.blob("epk"), tuple(victim_sealed.blob(f"ct{k}") for k in range(3)),
                                 tuple(victim_sealed.blob(f"sig{k}") for k in range(3)))
    job = AggregationJob(attack_spec.round_id, 6, 64, {20: sealed_victim, 21: _made_up(parties, attack_spec, 21),
                                                       22: _made_up(parties, attack_spec, 22)}, min_contributors=2)
    if not with_roster:
        out = parties.aggregate(job)  # the attack works: the "sum" is the victim's input
        np.testing.assert_array_equal(out.ring_sum, xs[20])
        return
    assert len(honest) == 3 and all(len(s.signatures) == 3 and all(s.signatures) for s in honest.values())
    with pytest.raises(ProtocolAbort, match="only 1 client"):
        parties.aggregate(job)


def test_a_replayed_job_for_a_served_round_is_refused() -> None:
    parties = SimulatedParties(3, roster=ROSTER)
    agg = MpcAggregator(parties=parties, identities=IDENTITIES, deployment="mpc-test", min_clients=2)
    spec = RoundSpec(5, IDS, 4)
    rng = SecureRNG.for_testing("replay")
    xs = {c: rng.ring_elements(4, 64) for c in IDS}
    inputs = _honest_job(agg, spec, xs)
    job = AggregationJob(spec.round_id, 4, 64, inputs, min_contributors=2)
    with pytest.raises(ProtocolAbort, match="already served round 5"):
        parties.aggregate(job)  # the same job again (e.g. beside a fake input): refused


def test_unsigned_or_foreign_deployment_shares_are_invalid() -> None:
    parties = SimulatedParties(3, roster=ROSTER)
    other = MpcAggregator(parties=parties, identities=IDENTITIES, deployment="another-deployment", min_clients=2)
    spec = RoundSpec(6, IDS, 4)
    xs = {c: np.zeros(4, dtype=np.uint64) for c in IDS}
    with pytest.raises(ProtocolAbort, match="only 0 client"):
        InProcessTransport().run(other.server(spec), {c: other.client(spec, c, xs[c]) for c in IDS})
    unsigned = MpcAggregator(parties=parties, min_clients=2)
    spec7 = RoundSpec(7, IDS, 4)
    with pytest.raises(ProtocolAbort, match="only 0 client"):
        InProcessTransport().run(unsigned.server(spec7), {c: unsigned.client(spec7, c, xs[c]) for c in IDS})


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_crypten_party_processes_check_signatures_and_serve_each_round_once() -> None:
    from fedguard.encoding import ring_sum
    from fedguard.secagg.mpc.parties import CryptenParties

    with CryptenParties(2, timeout_s=20.0, roster=ROSTER) as parties:
        agg = MpcAggregator(parties=parties, identities=IDENTITIES, deployment="mpc-test", min_clients=2)
        spec = RoundSpec(11, IDS, 4)
        rng = SecureRNG.for_testing("crypten-signed")
        xs = {c: rng.ring_elements(4, 64) for c in IDS}
        inputs = _honest_job(agg, spec, xs)  # a signed round: exact
        out = InProcessTransport().run(agg.server(RoundSpec(12, IDS, 4)),
                                       {c: agg.client(RoundSpec(12, IDS, 4), c, xs[c]) for c in IDS})
        np.testing.assert_array_equal(out.result.ring_sum, ring_sum(list(xs.values()), 64))
        with pytest.raises(ProtocolAbort, match="already served round 11"):
            parties.aggregate(AggregationJob(11, 4, 64, inputs, min_contributors=2))
        unsigned = MpcAggregator(parties=parties, min_clients=2)
        spec13 = RoundSpec(13, IDS, 4)
        with pytest.raises(ProtocolAbort, match="only 0 client"):
            InProcessTransport().run(unsigned.server(spec13), {c: unsigned.client(spec13, c, xs[c]) for c in IDS})
        assert all(parties.alive())


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_remote_party_programs_check_signatures_against_their_roster(tmp_path: Path) -> None:
    """``backend: network``: two party programs (separate OS processes that rendezvous by address on
    127.0.0.1, as across machines) started with ``--roster``: a signed round is exact; made-up clients beside
    a victim, a replayed job and unsigned shares are each refused at the parties, nothing revealed."""
    from fedguard.encoding import ring_sum
    from fedguard.secagg.mpc.network import NetworkParties, read_control_key, write_control_key

    key_file = write_control_key(tmp_path / "control.key")
    roster_file = ROSTER.save(tmp_path / "roster.json")
    parties = NetworkParties(2, listen=("127.0.0.1", 0), control_key=read_control_key(key_file), timeout_s=30.0,
                             startup_timeout_s=120.0)
    host, port = parties.bind()
    rendezvous = f"127.0.0.1:{_free_port()}"
    cmd = [sys.executable, "-m", "fedguard.secagg.mpc.network", "party", "--parties", "2", "--rendezvous",
           rendezvous, "--interface", "lo", "--timeout", "30", "--coordinator", f"{host}:{port}", "--control-key",
           str(key_file), "--roster", str(roster_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([*cmd, "--rank", str(r)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for r in range(2)]
    try:
        parties.start()
        agg = MpcAggregator(parties=parties, identities=IDENTITIES, deployment="mpc-test", min_clients=2)
        rng = SecureRNG.for_testing("network-signed")
        xs = {c: rng.ring_elements(4, 64) for c in IDS}
        spec = RoundSpec(21, IDS, 4)
        inputs = _honest_job(agg, spec, xs)  # a signed round through the remote parties
        assert all(len(s.signatures) == 2 and all(s.signatures) for s in inputs.values())
        spec22 = RoundSpec(22, IDS, 4)
        out = InProcessTransport().run(agg.server(spec22), {c: agg.client(spec22, c, xs[c]) for c in IDS})
        np.testing.assert_array_equal(out.result.ring_sum, ring_sum(list(xs.values()), 64))
        # the server makes up clients 21 and 22 (shares it sealed itself) beside victim 20's real, signed
        # shares of this round: only the victim's count, below min_contributors: refused, nothing revealed
        attack = RoundSpec(23, IDS, 4)
        server = agg.server(attack)
        outbox = server.open()
        server.accept(20, agg.client(attack, 20, xs[20]).handle(outbox[20]))
        real = server._inbox[20]
        victim = SealedShares(real.blob("epk"), tuple(real.blob(f"ct{k}") for k in range(2)),
                              tuple(real.blob(f"sig{k}") for k in range(2)))
        job = AggregationJob(23, 4, 64, {20: victim, 21: _made_up(parties, attack, 21),
                                         22: _made_up(parties, attack, 22)}, min_contributors=2)
        with pytest.raises(ProtocolAbort, match="only 1 client"):
            parties.aggregate(job)
    finally:
        parties.close()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_remote_party_programs_refuse_a_replayed_job_and_unsigned_shares(tmp_path: Path) -> None:
    from fedguard.secagg.mpc.network import NetworkParties, read_control_key, write_control_key

    key_file = write_control_key(tmp_path / "control.key")
    roster_file = ROSTER.save(tmp_path / "roster.json")
    parties = NetworkParties(2, listen=("127.0.0.1", 0), control_key=read_control_key(key_file), timeout_s=30.0,
                             startup_timeout_s=120.0)
    host, port = parties.bind()
    cmd = [sys.executable, "-m", "fedguard.secagg.mpc.network", "party", "--parties", "2", "--rendezvous",
           f"127.0.0.1:{_free_port()}", "--interface", "lo", "--timeout", "30", "--coordinator", f"{host}:{port}",
           "--control-key", str(key_file), "--roster", str(roster_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([*cmd, "--rank", str(r)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for r in range(2)]
    try:
        parties.start()
        agg = MpcAggregator(parties=parties, identities=IDENTITIES, deployment="mpc-test", min_clients=2)
        xs = {c: SecureRNG.for_testing(f"replay-net/{c}").ring_elements(4, 64) for c in IDS}
        spec = RoundSpec(31, IDS, 4)
        inputs = _honest_job(agg, spec, xs)
        with pytest.raises(ProtocolAbort, match="already served round 31"):  # the same job again
            parties.aggregate(AggregationJob(31, 4, 64, inputs, min_contributors=2))
    finally:
        parties.close()  # after an abort the coordinator has closed the channels; the parties stop
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_mpc_from_config_options_signs_and_checks_against_the_roster(tmp_path: Path) -> None:
    """``aggregator: mpc`` with ``roster_file`` and ``identity_files``: the parties built here get the roster,
    the clients sign with their identity files; a round is exact and the made-up-clients attack is refused."""
    from fedguard.errors import ConfigError
    from fedguard.federation.registry import make_aggregator

    roster_file = ROSTER.save(tmp_path / "roster.json")
    for c, ident in IDENTITIES.items():
        ident.save(tmp_path / f"client-{c}.key")
    template = str(tmp_path / "client-{client}.key")
    with pytest.raises(ConfigError, match="roster_file and identity_files go together"):
        make_aggregator("mpc", {"backend": "simulated", "roster_file": str(roster_file)})
    options = {"backend": "simulated", "roster_file": str(roster_file), "identity_files": template}
    with make_aggregator("mpc", options) as agg:
        assert isinstance(agg, MpcAggregator) and agg.parties.roster == ROSTER  # type: ignore[attr-defined]
        spec = RoundSpec(8, IDS, 5)
        agg.check_round(spec)
        xs = {c: SecureRNG.for_testing(f"config/{c}").ring_elements(5, 64) for c in IDS}
        out = InProcessTransport().run(agg.server(spec), {c: agg.client(spec, c, xs[c]) for c in IDS})
        np.testing.assert_array_equal(out.result.ring_sum, sum(xs.values()))
        attack = RoundSpec(9, IDS, 5)
        job = AggregationJob(9, 5, 64, {c: _made_up(agg.parties, attack, c) for c in IDS}, min_contributors=2)
        with pytest.raises(ProtocolAbort, match="only 0 client"):
            agg.parties.aggregate(job)
    (tmp_path / "client-21.key").unlink()
    with make_aggregator("mpc", options) as agg, pytest.raises(ConfigError, match="client 21 has no identity file"):
        agg.check_round(RoundSpec(10, IDS, 5))
