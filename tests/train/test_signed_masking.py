"""``aggregator: masking-signed`` from a trainer config (issue 12): the roster and identity files are
validated (the files when the config is read, each participant's identity before any client trains), and
an end-to-end FedHomoLLM round on a tiny model in which one client drops after sending its shares gives
the plaintext aggregate over the same survivors bit for bit."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedguard.errors import ConfigError
from fedguard.federation.protocol import ClientSide, ServerSide
from fedguard.federation.transport import InProcessTransport, RoundOutcome, Tamper
from fedguard.identity import Identity, Roster
from fedguard_train.checkpoint import load_latest
from fedguard_train.trainers.homo import FedHomoLLM
from tests.train.conftest import tiny_config

N_CLIENTS = 4


class _Dropping(InProcessTransport):
    """Client ``client`` goes silent from ``stage`` on, in every round (a crash after it sent its shares)."""

    def __init__(self, client: int, stage: str) -> None:
        self.client, self.stage = client, stage
        self.outcomes: list[RoundOutcome] = []

    def run(self, server: ServerSide, clients: Mapping[int, ClientSide], *, drop_at: Mapping[int, str] | None = None,
            tamper: Tamper | None = None) -> RoundOutcome:
        outcome = super().run(server, clients, drop_at={**(drop_at or {}), self.client: self.stage}, tamper=tamper)
        self.outcomes.append(outcome)
        return outcome


def _keys(tmp_path: Path, clients: range) -> tuple[Path, str]:
    keys = tmp_path / "keys"
    keys.mkdir()
    identities = {c: Identity.generate(c) for c in clients}
    for c, ident in identities.items():
        ident.save(keys / f"client-{c}.identity")
    roster = tmp_path / "roster.json"
    Roster.of(identities, "trainer-test").save(roster)
    return roster, str(keys / "client-{client}.identity")


def _config(tmp_path: Path, task: Path, aggregator: str, options: dict[str, Any]) -> Any:
    return tiny_config(tmp_path / aggregator, task, federation={"clients": N_CLIENTS, "rounds": 1,
                                                                 "aggregator": aggregator,
                                                                 "aggregator_options": options},
                       data={"source": "jsonl", "path": str(task), "max_examples": 48, "test_size": 6,
                             "partition": "iid"})


def test_signed_masking_with_a_dropout_gives_the_plaintext_round_over_the_survivors(tmp_path: Path,
                                                                                     task: Path) -> None:
    roster, template = _keys(tmp_path, range(N_CLIENTS))
    vectors = {}
    for name, options, stage in (("plaintext", {}, "input"),
                                 ("masking-signed", {"roster_file": str(roster), "identity_files": template}, "mask")):
        config = _config(tmp_path, task, name, options)
        trainer = FedHomoLLM(config, quiet=True)
        transport = _Dropping(2, stage)
        trainer.transport = transport
        result = trainer.run()
        assert result.history[0]["clients"] == N_CLIENTS - 1
        outcome = transport.outcomes[0]
        assert outcome.result.contributors == (0, 1, 3)
        if name == "masking-signed":  # the signed protocol's stages all ran, the coin flip included
            assert {r.stage for r in outcome.traffic.records} == {"advertise", "coin", "share", "mask",
                                                                  "consistency", "unmask"}
            assert outcome.result.dropped["mask"] == (2,)
        ckpt = load_latest(Path(config.run_dir))
        assert ckpt is not None
        vectors[name] = ckpt.vector
    np.testing.assert_array_equal(vectors["masking-signed"], vectors["plaintext"])


def test_signed_masking_options_are_checked_before_any_client_trains(tmp_path: Path, task: Path) -> None:
    roster, template = _keys(tmp_path, range(N_CLIENTS))
    with pytest.raises(ConfigError, match="roster_file 'nowhere.json' does not exist"):
        _config(tmp_path, task, "masking-signed", {"roster_file": "nowhere.json", "identity_files": template})
    with pytest.raises(ConfigError, match="identity_files must contain"):
        _config(tmp_path, task, "masking-signed", {"roster_file": str(roster), "identity_files": "keys.id"})
    with pytest.raises(ConfigError, match="needs the clients' roster"):
        FedHomoLLM(_config(tmp_path / "a", task, "masking-signed", {"identity_files": template}), quiet=True)
    (tmp_path / "keys" / "client-3.identity").unlink()
    with pytest.raises(ConfigError, match=r"client 3 has no identity file .*client-3\.identity"):
        FedHomoLLM(_config(tmp_path / "b", task, "masking-signed",
                           {"roster_file": str(roster), "identity_files": template}), quiet=True)
    short_roster = tmp_path / "short.json"
    Roster.of({c: Identity.generate(c) for c in range(2)}, "trainer-test").save(short_roster)
    with pytest.raises(ConfigError, match="lists 2 clients; a round of 4 needs"):
        FedHomoLLM(_config(tmp_path / "c", task, "masking-signed",
                           {"roster_file": str(short_roster), "identity_files": template}), quiet=True)
