"""A malicious Paillier client: a *valid* encryption of an overfull slot (issue 12).

Paillier ciphertexts hide their plaintext, so the server cannot see that one client encrypted a slot
value beyond the bound; the key holder finds it only after decrypting the sum. The round must abort with
messages that are true: the key holder says it decrypted and refused the sum (and cannot say who), the
server says the key holder may have decrypted and that the server learned nothing.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedguard import wire
from fedguard.errors import ProtocolAbort
from fedguard.federation.transport import InProcessTransport
from fedguard.rng import SecureRNG
from fedguard.secagg.paillier.errors import DecryptionError
from fedguard.secagg.paillier.keys import PaillierPublicKey
from tests.secagg.paillier.test_paillier import _bounded, _inputs, _round, _setup


def test_an_overfull_slot_aborts_with_true_messages() -> None:
    spec = _round(4)
    agg = _bounded(max_clients=8)
    layout = agg.layout(spec)
    server, clients = _setup(agg, spec, _inputs(spec))
    rng = SecureRNG.for_testing("malicious")

    def overfill(stage: str, cid: int, reply: bytes) -> bytes:
        if stage != "input" or cid != 2:
            return reply
        msg = wire.decode(reply)
        public = server.public_key
        assert isinstance(public, PaillierPublicKey)
        # slot 0 holds 4·value_max + 1 > the bound of 4 contributors, yet < 2^slot_bits (no carry)
        plaintexts = [4 * layout.value_max + 1] + [0] * (layout.n_ciphertexts - 1)
        data = public.ciphertexts_to_bytes([public.encrypt(m, rng) for m in plaintexts])
        return wire.encode(wire.Message(kind=msg.kind, round=msg.round, stage=msg.stage, sender=msg.sender,
                                        recipient=msg.recipient, meta=dict(msg.meta),
                                        arrays={"c": np.frombuffer(data, dtype=np.uint8)}))

    transport = InProcessTransport()
    with pytest.raises(ProtocolAbort) as info:
        transport.run(server, clients, tamper=overfill)
    text = str(info.value)
    assert "may have decrypted" in text and "server learned nothing" in text and "nothing decrypted" not in text
    # the key holder saw a sum: DP accounting must keep this round's release (never retract it)
    assert info.value.nothing_revealed is False


def test_the_key_holders_refusal_says_it_decrypted() -> None:
    spec = _round(4)
    agg = _bounded(max_clients=8)
    layout = agg.layout(spec)
    server, clients = _setup(agg, spec, _inputs(spec))
    outbox = server.open()
    for c in sorted(outbox):
        server.accept(c, clients[c].handle(outbox[c]))
    outbox = server.close_stage()
    rng = SecureRNG.for_testing("malicious")
    for c in sorted(outbox):
        reply = clients[c].handle(outbox[c])
        if c == 2:
            msg = wire.decode(reply)
            public = server.public_key
            data = public.ciphertexts_to_bytes([public.encrypt(4 * layout.value_max + 1, rng)]
                                               + [public.encrypt(0, rng) for _ in range(layout.n_ciphertexts - 1)])
            reply = wire.encode(wire.Message(kind=msg.kind, round=msg.round, stage=msg.stage, sender=msg.sender,
                                             recipient=msg.recipient, meta=dict(msg.meta),
                                             arrays={"c": np.frombuffer(data, dtype=np.uint8)}))
        server.accept(c, reply)
    outbox = server.close_stage()
    with pytest.raises(DecryptionError, match="was decrypted and refused") as info:
        clients[0].handle(outbox[0])
    assert "[0, 1, 2, 3]" in str(info.value)
