"""Signed SecAgg against an active server (issue 12): each attack is played by the server, and refused.

The attacker controls every message between clients: it can rewrite the share request (substitute keys,
replay last round's keys), announce different graph seeds or survivor sets to different clients, and
forge the unmask request. For each attack the victim client must raise :class:`ProtocolViolation` and
reveal nothing; the unsigned protocol is run beside it where the attack *succeeds* there, to show the
test exercises a real attack.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedguard import wire
from fedguard.encoding import ring_sum
from fedguard.errors import ConfigError, MessageError, ProtocolViolation
from fedguard.federation.protocol import AggregateResult, Aggregator, ClientSide, RoundSpec, ServerSide
from fedguard.federation.transport import InProcessTransport
from fedguard.identity import Identity, Roster
from fedguard.rng import SecureRNG
from fedguard.secagg.masking import MaskingAggregator, ShareCommitmentError, shamir
from fedguard.secagg.masking.aggregator import BAD_SHARE
from fedguard.secagg.masking.signed import CONSISTENCY, SignedMaskingAggregator, survivors_body
from fedguard.testing.aggregator_contract import AggregatorContract

IDS = tuple(range(10, 16))
IDENTITIES = {c: Identity.generate(c) for c in range(10, 20)}
ROSTER = Roster.of(IDENTITIES, "test-deployment")


def _signed(**kw: object) -> SignedMaskingAggregator:
    return SignedMaskingAggregator(roster=ROSTER, identities=IDENTITIES, rng=SecureRNG.for_testing("signed"), **kw)


class TestSignedSecAgg(AggregatorContract):
    def make_aggregator(self, n_clients: int) -> Aggregator:
        return _signed()


class TestSignedSecAggPlus(AggregatorContract):
    min_clients = 5
    max_clients = 6

    def make_aggregator(self, n_clients: int) -> Aggregator:
        return _signed(neighbours=4)


def _setup(agg: Aggregator, round_id: int = 7, n: int = 6) -> tuple[RoundSpec, ServerSide, dict[int, ClientSide],
                                                                   dict[int, np.ndarray]]:
    spec = RoundSpec(round_id, IDS[:n], 5, 64)
    rng = SecureRNG.for_testing(f"active/{round_id}")
    xs = {c: rng.ring_elements(5, 64) for c in spec.participants}
    server = agg.server(spec)
    clients = {c: agg.client(spec, c, xs[c]) for c in spec.participants}
    return spec, server, clients, xs


def _step(server: ServerSide, clients: dict[int, ClientSide], outbox: dict[int, bytes]) -> dict[int, bytes] | AggregateResult:
    for c in sorted(outbox):
        server.accept(c, clients[c].handle(outbox[c]))
    step = server.close_stage()
    return step


def _rewrite(payload: bytes, **arrays: np.ndarray) -> bytes:
    msg = wire.decode(payload)
    return wire.encode(wire.Message(kind=msg.kind, round=msg.round, stage=msg.stage, sender=msg.sender,
                                    recipient=msg.recipient, meta=dict(msg.meta), arrays={**msg.arrays, **arrays}))


def _run_to(server: ServerSide, clients: dict[int, ClientSide], stage: str) -> dict[int, bytes]:
    outbox = server.open()
    while server.stage != stage:
        step = _step(server, clients, outbox)
        assert isinstance(step, dict)
        outbox = step
    return outbox


def test_honest_round_is_exact() -> None:
    spec, server, clients, xs = _setup(_signed())
    out = InProcessTransport().run(server, clients)
    np.testing.assert_array_equal(out.result.ring_sum, ring_sum(list(xs.values()), 64))


@pytest.mark.parametrize("signed", [False, True])
def test_key_substitution_is_refused(signed: bool) -> None:
    """The server swaps neighbour 11's masking key in the share request to client 10 for one it made."""
    agg = _signed() if signed else MaskingAggregator(rng=SecureRNG.for_testing("signed"))
    spec, server, clients, _ = _setup(agg)
    share_out = _run_to(server, clients, "share")
    msg = wire.decode(share_out[10])
    nbrs = [int(v) for v in msg.arrays["neighbours"]]
    s_keys = np.array(msg.arrays["s_keys"])
    s_keys[nbrs.index(11)] = np.frombuffer(Identity.generate(99).public_key, dtype=np.uint8)  # any 32 bytes
    forged = _rewrite(share_out[10], s_keys=s_keys)
    if not signed:
        clients[10].handle(forged)  # the unsigned protocol has no way to notice
        return
    before = clients[10].stage
    with pytest.raises(ProtocolViolation, match="client 11 are not signed"):
        clients[10].handle(forged)
    assert clients[10].stage == before
    clients[10].handle(share_out[10])  # the real message is still accepted


def test_keys_replayed_from_another_round_are_refused() -> None:
    agg = _signed()
    _, server6, clients6, _ = _setup(agg, round_id=6)
    old = _run_to(server6, clients6, "share")
    _, server7, clients7, _ = _setup(agg, round_id=7)
    new = _run_to(server7, clients7, "share")
    o = wire.decode(old[10])
    replayed = _rewrite(new[10], c_keys=np.array(o.arrays["c_keys"]), s_keys=np.array(o.arrays["s_keys"]),
                        sigs=np.array(o.arrays["sigs"]))
    with pytest.raises(ProtocolViolation, match="not signed"):
        clients7[10].handle(replayed)


def _unmask_request(spec: RoundSpec, victim: int, survivors: list[int], signed: dict[int, bytes]) -> bytes:
    signers = sorted(signed)
    rows = np.frombuffer(b"".join(signed[c] for c in signers), dtype=np.uint8).reshape(len(signers), 64)
    return wire.encode(wire.Message(kind="masking/signed-unmask-request", round=spec.round_id, stage="unmask",
                                    sender=-1, recipient=victim, arrays={
                                        "survivors": np.array(survivors, dtype=np.int64),
                                        "signers": np.array(signers, dtype=np.int64), "sigs": rows}))


def test_survivor_set_equivocation_is_refused() -> None:
    """Client 15's masked input arrived, but the server tells 13 and 14 that 15 dropped (so that they
    reveal 15's masking key) and the others that it survived (they reveal its self-mask seed): with ``t``
    of each, 15's input is unmasked. The honest clients refuse any set they did not sign, and a set needs
    ``t`` signatures: the server gets ``t`` self-mask shares of 15 but only 2 < t masking-key shares."""
    spec, server, clients, _ = _setup(_signed())
    t = clients[10].params.threshold  # type: ignore[attr-defined]
    outbox = _run_to(server, clients, CONSISTENCY)
    full = sorted(outbox)
    without = [c for c in full if c != 15]
    shown = {c: (without if c in (13, 14) else full) for c in full}
    sig = {c: wire.decode(clients[c].handle(_rewrite(outbox[c], survivors=np.array(shown[c], dtype=np.int64))))
           .blob("sig") for c in full}
    on_full = {c: sig[c] for c in full if shown[c] == full}
    on_without = {c: sig[c] for c in full if shown[c] == without}
    assert len(on_full) >= t > len(on_without)
    for victim in (13, 14):  # shown the full set with its valid signatures: not the set they signed
        with pytest.raises(ProtocolViolation, match="differs from the one I signed"):
            clients[victim].handle(_unmask_request(spec, victim, full, on_full))
        before = clients[victim].stage
        with pytest.raises(ProtocolViolation, match="valid signatures"):  # their own set lacks t signatures
            clients[victim].handle(_unmask_request(spec, victim, without, on_without))
        assert clients[victim].stage == before
    s_shares_of_15 = 0
    for c in on_full:  # the consistent majority reveals: self-mask shares only, never 15's masking key
        reveal = wire.decode(clients[c].handle(_unmask_request(spec, c, full, on_full)))
        assert 15 in [int(v) for v in reveal.arrays["b_owners"]]
        s_shares_of_15 += 15 in [int(v) for v in reveal.arrays["s_owners"]]
    assert s_shares_of_15 == 0


def test_forged_survivor_signatures_are_refused() -> None:
    """The server forges the signatures it lacks (signs with keys it made up)."""
    spec, server, clients, _ = _setup(_signed())
    outbox = _run_to(server, clients, CONSISTENCY)
    full = sorted(outbox)
    real = wire.decode(clients[10].handle(outbox[10])).blob("sig")
    fake = {c: Identity.generate(c).sign("masking/survivors", deployment=ROSTER.deployment, round_id=spec.round_id,
                                         body=survivors_body(clients[10].graph_seed, full))  # type: ignore[attr-defined]
            for c in full if c != 10}
    rows = np.frombuffer(real + b"".join(fake[c] for c in full if c != 10), dtype=np.uint8).reshape(len(full), 64)
    forged = wire.encode(wire.Message(kind="masking/signed-unmask-request", round=spec.round_id, stage="unmask",
                                      sender=-1, recipient=10, arrays={
                                          "survivors": np.array(full, dtype=np.int64),
                                          "signers": np.array(full, dtype=np.int64), "sigs": rows}))
    with pytest.raises(ProtocolViolation, match="only 1 valid signatures.*do not verify"):
        clients[10].handle(forged)


def test_sybil_and_foreign_identities_are_refused() -> None:
    small = Roster.of({c: IDENTITIES[c] for c in IDS[:5]}, "test-deployment")
    with pytest.raises(ConfigError, match="not the one on the roster"):
        SignedMaskingAggregator(roster=small, identities=IDENTITIES)
    agg = SignedMaskingAggregator(roster=small, identities={c: IDENTITIES[c] for c in IDS[:5]})
    with pytest.raises(ConfigError, match=r"participants \[15\] are not on the roster"):
        agg.server(RoundSpec(1, IDS, 5, 64))
    assert not small.verify("masking/keys", round_id=1, client=15, body=b"", signature=bytes(64))
    with pytest.raises(MessageError, match="not on the roster"):
        small.key(15)


def test_a_client_with_a_bad_signature_is_dropped_by_the_server() -> None:
    spec, server, clients, xs = _setup(_signed())

    def corrupt(stage: str, cid: int, reply: bytes) -> bytes:
        if stage == "advertise" and cid == 13:
            return _rewrite(reply, sig=np.zeros(64, dtype=np.uint8))
        return reply

    out = InProcessTransport().run(server, clients, tamper=corrupt)
    assert [(c, s) for c, s, _ in out.rejected] == [(13, "advertise")]
    honest = [c for c in spec.participants if c != 13]
    np.testing.assert_array_equal(out.result.ring_sum, ring_sum([xs[c] for c in honest], 64))


def test_identity_file_is_0600_never_overwritten_and_roster_fingerprints_checked(tmp_path: object) -> None:
    import os
    from pathlib import Path

    path = Path(str(tmp_path)) / "id.key"
    ident = Identity.generate(3)
    ident.save(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert Identity.load(path).public_key == ident.public_key
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        Identity.generate(3).save(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        Identity.load(path)
    roster = Roster.of([ident], "dep")
    text = roster.to_json()
    assert Roster.from_json(text).keys == roster.keys
    other = Identity.generate(3).public_key.hex()
    with pytest.raises(ConfigError, match="fingerprint"):
        Roster.from_json(text.replace(ident.public_key.hex(), other))


# -- malicious clients: bad shares ---------------------------------------------------------------------
def _bad_share_tamper(liars: set[int]) -> object:
    def tamper(stage: str, cid: int, reply: bytes) -> bytes:
        if stage != "unmask" or cid not in liars:
            return reply
        arrays = wire.decode(reply).arrays
        shares = np.array(arrays["b_shares"])
        for row in range(shares.shape[0]):  # lie about every self-mask seed it holds
            value = shamir.decode_value(shares[row].tobytes())
            shares[row] = np.frombuffer(shamir.encode_value((value + 12345) % shamir.PRIME), dtype=np.uint8)
        return _rewrite(reply, b_shares=shares)
    return tamper


@pytest.mark.parametrize("signed", [False, True])
def test_one_bad_share_is_corrected_and_its_holder_named(signed: bool) -> None:
    """n = 6, t = 4: six shares of each secret correct one bad one (Berlekamp–Welch); the round is exact."""
    agg = _signed() if signed else MaskingAggregator()
    spec, server, clients, xs = _setup(agg)
    out = InProcessTransport().run(server, clients, tamper=_bad_share_tamper({12}))  # type: ignore[arg-type]
    np.testing.assert_array_equal(out.result.ring_sum, ring_sum(list(xs.values()), 64))
    assert out.result.dropped[BAD_SHARE] == (12,)
    assert sorted(server.bad_shares[12]) == list(spec.participants)  # type: ignore[attr-defined]


def test_two_bad_shares_among_six_are_detected_and_abort() -> None:
    """Beyond ``e`` bad shares, decoding either fails or lands on another codeword (here: both liars add the
    same offset, which a cubic through the other points can absorb); the commitment check catches both."""
    spec, server, clients, _ = _setup(MaskingAggregator())
    with pytest.raises(ShareCommitmentError, match="cannot be corrected|does not match its commitment"):
        InProcessTransport().run(server, clients, tamper=_bad_share_tamper({11, 12}))  # type: ignore[arg-type]


def test_robust_reconstruct_corrects_up_to_half_the_redundancy() -> None:
    rng = SecureRNG.for_testing("rs")
    for t, m in ((2, 4), (3, 7), (5, 11)):
        secret = rng.randbelow(shamir.PRIME)
        shares = shamir.split(secret, t, list(range(1, m + 1)), rng=rng)
        e = (m - t) // 2
        bad = list(range(0, 2 * e, 2))[:e]
        corrupted = [shamir.Share(s.x, (s.y + 1) % shamir.PRIME) if i in bad else s for i, s in enumerate(shares)]
        value, found = shamir.robust_reconstruct(corrupted, t)
        assert value == secret and found == tuple(shares[i].x for i in bad)
        too_many = [shamir.Share(s.x, (s.y + 1) % shamir.PRIME) if i <= e else s for i, s in enumerate(shares)]
        with pytest.raises(shamir.InconsistentSharesError):
            shamir.robust_reconstruct(too_many, t)


@pytest.mark.parametrize("max_corrupt", [0, 2])
def test_corrupt_double_signers_need_max_corrupt(max_corrupt: int) -> None:
    """Corrupt clients 10 and 11 sign both survivor sets; the server shows set A (14 alive) to 12 and 14, and
    set B (14 dropped) to 13 and 15. Each set then carries 4 signatures: enough when the protocol tolerates
    no corrupt client (n=6: ⌊6/2⌋+1 = 4), so 12 reveals 14's self-mask share and 13 its masking-key share,
    and with the corrupt holders' shares of both the server reaches t=4 of each: 14's input is exposed.
    With ``max_corrupt=2`` a set needs ⌊(6+2)/2⌋+1 = 5 signatures and both honest clients refuse."""
    spec, server, clients, _ = _setup(_signed(max_corrupt=max_corrupt))
    outbox = _run_to(server, clients, CONSISTENCY)
    full = sorted(outbox)
    without = [c for c in full if c != 14]
    shown = {12: full, 14: full, 13: without, 15: without}
    sigs_a, sigs_b = {}, {}
    for c, survivors in shown.items():
        sig = wire.decode(clients[c].handle(_rewrite(outbox[c], survivors=np.array(survivors, dtype=np.int64))))
        (sigs_a if survivors == full else sigs_b)[c] = sig.blob("sig")
    for corrupt in (10, 11):
        for survivors, table in ((full, sigs_a), (without, sigs_b)):
            table[corrupt] = IDENTITIES[corrupt].sign("masking/survivors", deployment=ROSTER.deployment,
                                                      round_id=spec.round_id,
                                                      body=survivors_body(clients[12].graph_seed,  # type: ignore[attr-defined]
                                                                          survivors))
    if max_corrupt == 0:
        b = wire.decode(clients[12].handle(_unmask_request(spec, 12, full, sigs_a)))
        s = wire.decode(clients[13].handle(_unmask_request(spec, 13, without, sigs_b)))
        assert 14 in [int(o) for o in b.arrays["b_owners"]] and 14 in [int(o) for o in s.arrays["s_owners"]]
    else:
        for c, survivors, table in ((12, full, sigs_a), (13, without, sigs_b)):
            with pytest.raises(ProtocolViolation, match="only 4 valid signatures.*5 are needed"):
                clients[c].handle(_unmask_request(spec, c, survivors, table))
