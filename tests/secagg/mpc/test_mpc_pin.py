"""The client-side key pin of ``aggregator: mpc`` (``party_keys_file``, :mod:`fedguard.secagg.mpc.pin`).

A client that does not start the compute parties seals to the keys of a party-keys file and to nothing
else: the attack it stops is a server that names parties of its own (keys it holds) and reads the shares
sealed to them. Tested: the file format and its refusals, the options' rules, a pinned client whose shares
the real parties sum exactly (the same ring sum as the in-process client), a server naming other parties
refused before anything is sealed, a coordinator whose parties are not the pinned ones refused, and the
party program's long-term key file. (No CrypTen process is started here.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedguard.errors import ConfigError, ProtocolViolation
from fedguard.federation import aggregator_options
from fedguard.federation.protocol import RoundSpec
from fedguard.federation.transport import InProcessTransport
from fedguard.rng import SecureRNG
from fedguard.secagg.mpc import MpcAggregator, MpcOptions, PinnedParties, SimulatedParties
from fedguard.secagg.mpc.pin import PIN_FORMAT, read_party_keys, write_party_keys
from fedguard.secagg.mpc.sharing import open_share


def _pin(tmp_path: Path, parties: SimulatedParties, name: str = "party_keys.json") -> str:
    return str(write_party_keys(tmp_path / name, parties.public_keys))


def test_the_party_keys_file_round_trips_and_is_never_silently_replaced(tmp_path: Path) -> None:
    parties = SimulatedParties(3, rng=SecureRNG.for_testing("pin"))
    path = _pin(tmp_path, parties)
    assert read_party_keys(path) == parties.public_keys == read_party_keys(path, 3)
    data = json.loads(Path(path).read_text())
    assert data["format"] == PIN_FORMAT and data["n_parties"] == 3 and len(data["public_keys"][0]) == 64
    assert write_party_keys(path, parties.public_keys) == Path(path)  # the same keys: left as it is
    others = SimulatedParties(3).public_keys
    with pytest.raises(ConfigError, match="refusing to overwrite the party-keys file .* other keys"):
        write_party_keys(path, others)
    assert read_party_keys(path) == parties.public_keys
    write_party_keys(path, others, overwrite=True)
    assert read_party_keys(path) == others
    with pytest.raises(ConfigError, match="pins 3 parties, the configuration has n_parties=2"):
        read_party_keys(path, 2)


@pytest.mark.parametrize(("content", "message"), [
    (b"\xff\xfe", "is not JSON"),
    (b"[]", "is not a 'fedguard-mpc-party-keys/1' file"),
    (json.dumps({"format": PIN_FORMAT, "n_parties": 3, "public_keys": ["00" * 32] * 2}).encode(), "their number"),
    (json.dumps({"format": PIN_FORMAT, "n_parties": 2, "public_keys": ["00" * 32, "zz" * 32]}).encode(),
     "party 1's key must be 64 hex digits"),
    (json.dumps({"format": PIN_FORMAT, "n_parties": 2, "public_keys": ["00" * 32, "00" * 31]}).encode(),
     "party 1's key must be 64 hex digits"),
    (json.dumps({"format": PIN_FORMAT, "n_parties": 2, "public_keys": ["01" * 32] * 2}).encode(),
     "one key for two parties"),
])
def test_a_malformed_party_keys_file_is_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        read_party_keys(path)
    with pytest.raises(ConfigError, match=message):
        MpcOptions(backend="network", party_keys_file=str(path), n_parties=2)
    with pytest.raises(ConfigError, match="cannot read the party-keys file"):
        read_party_keys(tmp_path / "missing.json")


def test_the_options_take_a_pin_for_network_parties_only(tmp_path: Path) -> None:
    path = _pin(tmp_path, SimulatedParties(3))
    client = aggregator_options("mpc", {"backend": "network", "party_keys_file": path})
    assert isinstance(client, MpcOptions) and client.party_keys_file == path and client.listen is None
    with pytest.raises(ConfigError, match="party_keys_file pins the long-term keys of parties started elsewhere"):
        MpcOptions(party_keys_file=path)  # crypten parties draw fresh keys at each start
    with pytest.raises(ConfigError, match="pins 3 parties, the configuration has n_parties=2"):
        MpcOptions(backend="network", party_keys_file=path, n_parties=2)
    with pytest.raises(ConfigError, match="listen and control_key_file go together"):
        MpcOptions(backend="network", party_keys_file=path, listen="127.0.0.1:1")
    with pytest.raises(ConfigError, match="needs listen='HOST:PORT' and control_key_file .*or party_keys_file"):
        MpcOptions(backend="network")
    # a client's configuration builds no coordinator: it says so instead of waiting for parties
    with pytest.raises(ConfigError, match="only pins the compute parties .* MpcAggregator.for_client"):
        MpcAggregator(client)
    with pytest.raises(ConfigError, match="must pin their public keys: set aggregator_options.party_keys_file"):
        MpcAggregator.for_client({"backend": "simulated"})


def test_a_pinned_client_seals_to_the_pinned_parties_and_they_sum_exactly(tmp_path: Path) -> None:
    """Clients built from the pin only (no party, no server object shared) give the parties the same ring
    sum as clients built beside the parties; the client's aggregator itself cannot aggregate."""
    parties = SimulatedParties(3, rng=SecureRNG.for_testing("parties"))
    server = MpcAggregator(parties=parties)
    client = MpcAggregator.for_client(backend="network", party_keys_file=_pin(tmp_path, parties))
    assert isinstance(client.parties, PinnedParties) and client.parties.public_keys == parties.public_keys
    spec = RoundSpec(4, (0, 1, 2), vector_length=33, ring_bits=32)
    xs = {c: SecureRNG.for_testing(f"x{c}").ring_elements(33, 32) for c in spec.participants}
    out = InProcessTransport().run(server.server(spec), {c: client.client(spec, c, xs[c]) for c in xs}).result
    expected = (xs[0] + xs[1] + xs[2]) & np.uint64(0xFFFFFFFF)
    assert out.contributors == (0, 1, 2) and np.array_equal(out.ring_sum, expected)
    with pytest.raises(ConfigError, match="cannot aggregate"):
        client.parties.aggregate(None)  # type: ignore[arg-type]


def test_a_client_refuses_a_server_that_names_other_parties(tmp_path: Path) -> None:
    """The attack: a server runs parties of its own (it holds their keys) and asks the clients for shares.
    A client pinned to the real parties refuses the request (ProtocolViolation, before sealing anything);
    a client that took the keys from the server would have handed it its input."""
    real = SimulatedParties(3)
    rogue = SimulatedParties(3, rng=SecureRNG.for_testing("rogue"))  # the server holds all three keys
    client = MpcAggregator.for_client(backend="network", party_keys_file=_pin(tmp_path, real))
    spec = RoundSpec(1, (0, 1), vector_length=9, ring_bits=64)
    x = SecureRNG.for_testing("victim").ring_elements(9, 64)
    server = MpcAggregator(parties=rogue).server(spec)
    request = server.open()[0]
    with pytest.raises(ProtocolViolation, match="names other compute parties than the ones this client trusts"):
        client.client(spec, 0, x).handle(request)
    # what the pin prevents: a client given the rogue keys seals its input to them, and the server reads it
    naive = MpcAggregator(parties=PinnedParties(rogue.public_keys)).client(spec, 0, x)
    from fedguard.secagg.mpc.sharing import SealedShares
    from fedguard.wire import decode

    reply = decode(naive.handle(request))
    sealed = SealedShares(reply.blob("epk"), tuple(reply.blob(f"ct{k}") for k in range(3)))
    shares = [open_share(sealed, k, rogue._keys[k], round_id=1, client_id=0, length=9) for k in range(3)]
    assert all(s is not None for s in shares)
    assert np.array_equal(sum(shares[1:], shares[0]), x)  # type: ignore[arg-type]


def test_a_coordinator_refuses_parties_that_are_not_the_pinned_ones(tmp_path: Path) -> None:
    pinned = SimulatedParties(3)
    path = _pin(tmp_path, pinned)
    options = {"backend": "network", "party_keys_file": path}
    assert MpcAggregator(options, parties=pinned).parties is pinned  # the pinned parties: accepted
    with pytest.raises(ConfigError, match=r"the compute parties \[0, 1, 2\] hold other public keys"):
        MpcAggregator(options, parties=SimulatedParties(3))
    with pytest.raises(ConfigError, match="2 parties connected, the party-keys file pins 3"):
        MpcAggregator({**options, "n_parties": 3}, parties=SimulatedParties(2))


def test_a_partys_long_term_key_file_is_private_and_gives_the_pinned_key(tmp_path: Path) -> None:
    from fedguard.secagg.mpc.network import main, read_party_key, write_party_key
    from fedguard.secagg.mpc.sharing import public_key_bytes

    public = write_party_key(tmp_path / "party0.key")
    assert oct((tmp_path / "party0.key").stat().st_mode & 0o777) == "0o600"
    assert public_key_bytes(read_party_key(tmp_path / "party0.key")) == public
    with pytest.raises(FileExistsError):
        write_party_key(tmp_path / "party0.key")  # a key is never overwritten
    (tmp_path / "party0.key").chmod(0o640)
    with pytest.raises(ConfigError, match="readable by others"):
        read_party_key(tmp_path / "party0.key")
    # the command line: party-keygen prints the public key, pin writes the file the clients get
    assert main(["party-keygen", "--out", str(tmp_path / "party1.key")]) == 0
    public1 = public_key_bytes(read_party_key(tmp_path / "party1.key"))
    assert main(["pin", "--out", str(tmp_path / "pin.json"), public.hex(), public1.hex()]) == 0
    assert read_party_keys(tmp_path / "pin.json") == (public, public1)
    with pytest.raises(ConfigError, match="public keys must be hex"):
        main(["pin", "--out", str(tmp_path / "pin2.json"), "xyz", public.hex()])
