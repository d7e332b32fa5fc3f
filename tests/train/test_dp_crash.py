"""Write-ahead privacy ledger under crashes: the process is killed (``os._exit``, no cleanup) at every step
boundary of a DP round; the ledger on disk must then hold every release the server may have seen, and
``--resume`` must continue from it (the rerun round is accounted again, on top of the crashed attempt).

The attacker: a server that has decoded round 2's sum when the coordinator dies before its checkpoint;
without the write-ahead ledger the resumed run restored round 1's ledger and released round 2 again
with fresh noise, so epsilon was under-reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedguard.dp import PrivacyAccountant
from fedguard_train.privacy import FAULT_POINTS, LEDGER_FILE, hooks_from_config
from fedguard_train.trainers.homo import FedHomoLLM
from tests.train.conftest import tiny_config

pytestmark = [pytest.mark.deepspeed, pytest.mark.multiprocess]

DP = {"clip_norm": 0.5, "noise_multiplier": 1.0, "target_delta": 1e-3}
KILLED = 17

_CHILD = """
import os, sys
from pathlib import Path
from fedguard_train.config import TrainConfig
from fedguard_train.privacy import hooks_from_config, ClientDPHook
from fedguard_train.trainers.homo import FedHomoLLM

raw, point, round_to_kill = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = TrainConfig.from_dict(__import__("json").loads(raw))
hooks = hooks_from_config(config)
seen = {"n": 0}

def fault(at):
    if at == "round_start":
        seen["n"] += 1
    if at == point and seen["n"] == round_to_kill:
        os._exit(KILLED)

for h in hooks:
    if isinstance(h, ClientDPHook):
        h._fault = fault
FedHomoLLM(config, hooks=hooks, quiet=True).run()
""".replace("KILLED", str(KILLED))


def _kill_at(config_dict: dict, point: str, round_id: int) -> int:
    # the child picks its own rendezvous port (this process may hold the one it set for itself)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(config_dict), point, str(round_id)],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, timeout=600, text=True,
                          env=env)
    assert done.returncode == KILLED, done.stderr[-3000:]
    return done.returncode


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_kill_at_every_step_boundary_leaves_a_ledger_with_every_release(tmp_path: Path, task: Path,
                                                                         point: str) -> None:
    config = tiny_config(tmp_path, task, dp=DP, federation={"clients": 2, "rounds": 2})
    assert _kill_at(config.to_dict(), point, 2) == KILLED
    ledger_file = Path(config.run_dir) / LEDGER_FILE
    on_disk = PrivacyAccountant.load(ledger_file)
    # round 1 was released and checkpointed; round 2's sum may have been seen from "released" on, and its
    # write-ahead record is on disk from "ledger_persisted" on (a conservative over-count before release)
    expected_steps = 1 if point == "round_start" else 2
    assert on_disk.steps == expected_steps
    if FAULT_POINTS.index(point) >= FAULT_POINTS.index("released"):
        assert any(e.label.startswith("round 2:") for e in on_disk.ledger)

    result = FedHomoLLM(config, hooks=hooks_from_config(config), quiet=True).run(resume=True)
    final = PrivacyAccountant.load(ledger_file)
    assert final.steps == expected_steps + 1  # round 2 rerun with fresh noise: accounted again
    assert final.extends(on_disk)
    # the round table's epsilon is the accountant's, after the rerun round's event is on disk
    assert result.history[-1]["round"] == 2
    assert result.history[-1]["epsilon"] == final.epsilon()


def test_kill_in_the_first_round_before_any_checkpoint(tmp_path: Path, task: Path) -> None:
    config = tiny_config(tmp_path, task, dp=DP, federation={"clients": 2, "rounds": 1})
    assert _kill_at(config.to_dict(), "released", 1) == KILLED
    ledger_file = Path(config.run_dir) / LEDGER_FILE
    assert PrivacyAccountant.load(ledger_file).steps == 1
    result = FedHomoLLM(config, hooks=hooks_from_config(config), quiet=True).run(resume=True)
    final = PrivacyAccountant.load(ledger_file)
    assert final.steps == 2 and result.history[-1]["epsilon"] == final.epsilon()
