"""``fedguard keygen identity`` and ``fedguard roster add|show``: files are created 0600, never overwritten,
and a roster entry that disagrees with an existing key is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedguard.cli import main
from fedguard.identity import Identity, Roster


def test_keygen_roster_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key, roster = tmp_path / "c3.key", tmp_path / "roster.json"
    assert main(["keygen", "identity", "--client", "3", "--out", str(key)]) == 0
    assert os.stat(key).st_mode & 0o777 == 0o600
    ident = Identity.load(key)
    assert ident.fingerprint in capsys.readouterr().out
    assert main(["keygen", "identity", "--client", "3", "--out", str(key)]) == 2  # never overwritten
    assert Identity.load(key).public_key == ident.public_key
    assert main(["roster", "add", "--roster", str(roster), "--identity", str(key)]) == 2  # needs --deployment
    assert main(["roster", "add", "--roster", str(roster), "--identity", str(key), "--deployment", "d"]) == 0
    assert Roster.load(roster).keys == {3: ident.public_key}
    other = tmp_path / "other.key"
    Identity.generate(3).save(other)
    assert main(["roster", "add", "--roster", str(roster), "--identity", str(other)]) == 2  # another key for 3
    assert Roster.load(roster).keys == {3: ident.public_key}
    capsys.readouterr()
    assert main(["roster", "show", "--roster", str(roster)]) == 0
    assert ident.fingerprint in capsys.readouterr().out
