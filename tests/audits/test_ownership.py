"""`fedguard keygen watermark` and `fedguard audit ownership` on a tiny saved model: JSON, Markdown, PNG."""

from __future__ import annotations

import argparse
import dataclasses
import json
import stat
from pathlib import Path

import pytest
import torch

from audits.ownership import audit_keys, audit_ownership, render_markdown
from audits.ownership import register_cli as register_audit
from fedguard.cli import Commands
from fedguard.watermark import SignWatermark, load_key
from fedguard.watermark.cli import register_cli as register_keygen
from fedguard.watermark.simulation import SimulationConfig, tiny_gpt2_lora

# tiny models run fastest on one thread (and do not fight xdist's other worker for the 2 cores)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(argv: list[str]) -> int:
    """Parse and dispatch like ``fedguard.cli.main`` with the two watermark plug-ins registered."""
    parser = argparse.ArgumentParser(prog="fedguard")
    commands = Commands(parser.add_subparsers(metavar="COMMAND"))
    register_keygen(commands)
    register_audit(commands)
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("audit")
    model = tiny_gpt2_lora(SimulationConfig(n_layer=2), 0).merge_and_unload()
    model.save_pretrained(root / "start")
    keys = root / "keys"
    keys.mkdir()
    for name in ("alice", "bob"):
        assert run(["keygen", "watermark", "--model", str(root / "start"), "--bits", "32", "--clients", "2",
                    "--owner", name, "--out", str(keys / f"{name}.key")]) == 0
    # Alice embeds her watermark (regulariser only, alpha raised to embed in a few steps); Bob does not.
    alice = load_key(keys / "alice.key")
    wm = SignWatermark(dataclasses.replace(alice, alpha=1.0), model)
    for p in model.parameters():
        p.requires_grad_(False)
    for block in alice.blocks:
        model.get_submodule(block.module).weight.requires_grad_(True)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(300):  # the keys come from os.urandom: embed until every margin holds, whatever the key
        loss = wm.loss()
        if float(loss.detach()) == 0.0:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(root / "final")
    return {"root": root, "keys": keys, "final": root / "final"}


def test_keygen_writes_a_0600_key_bound_to_the_model(workspace) -> None:
    path = workspace["keys"] / "alice.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_key(path)
    assert key.n_bits == 32 and key.owner == "alice" and key.mode == "invariant"


def test_keygen_refuses_an_over_capacity_plan(workspace) -> None:
    from fedguard.watermark import CapacityError

    with pytest.raises(CapacityError, match="over capacity"):
        run(["keygen", "watermark", "--model", str(workspace["root"] / "start"), "--bits", "64", "--clients", "8",
             "--out", str(workspace["keys"] / "greedy.key")])
    assert not (workspace["keys"] / "greedy.key").exists()


def test_audit_reports_the_owner_and_rejects_the_other_claimant(workspace, tmp_path, capsys) -> None:
    keys = workspace["keys"]
    code = run(["audit", "ownership", "--model", str(workspace["final"]), "--base", str(workspace["root"] / "start"),
                "--key", str(keys / "alice.key"), "--key", str(keys / "bob.key"), "--out", str(tmp_path / "report")])
    assert code == 0
    capsys.readouterr()
    on_disk = json.loads((tmp_path / "report" / "ownership.json").read_text())
    alice, bob = on_disk["claimants"]
    assert alice["owner"] == "alice" and alice["verdict"] and alice["matched"] == 32
    assert alice["calibration"]["status"] == "recomputed"
    assert alice["p_value"] == pytest.approx(2.0**-32)
    assert bob["owner"] == "bob" and not bob["verdict"] and bob["p_value"] > 1e-6
    assert len(alice["blocks"]) == 4
    md = (tmp_path / "report" / "ownership.md").read_text()
    assert "| alice |" in md and "ownership claimed" in md and "ownership_agreement.png" in md
    png = (tmp_path / "report" / "ownership_agreement.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # --json prints the same report and writes no files
    assert run(["audit", "ownership", "--model", str(workspace["final"]), "--base", str(workspace["root"] / "start"),
                "--key", str(keys / "alice.key"), "--key", str(keys / "bob.key"), "--json",
                "--out", str(tmp_path / "nothing")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == on_disk and not (tmp_path / "nothing").exists()


def test_a_full_model_without_a_base_is_not_verified(workspace) -> None:
    report = audit_ownership(workspace["final"], [workspace["keys"] / "alice.key"])
    (claim,) = report.claimants
    assert claim.detection.matched == 32 and not claim.claimed
    assert claim.calibration is not None and claim.calibration.status == "unverifiable"


def test_forged_offsets_are_refused_by_recomputation(workspace) -> None:
    """The forgery of the issue: any seed, offsets chosen so every bit matches. It matches 32/32 on the
    owner's model and on the public base model; the audit recomputes the offsets and refuses it."""
    from attacks.watermark.ambiguity import forge_offsets
    from fedguard.rng import SecureRNG
    from fedguard.watermark import make_sign_key
    from fedguard.watermark.loading import load_model

    final = load_model(workspace["final"])
    start = load_model(workspace["root"] / "start")
    honest = make_sign_key(start, bits=32, n_clients=2, owner="mallory", rng=SecureRNG.for_testing("mallory"))
    for target in (final, start):
        forged = forge_offsets(honest, target)
        assert SignWatermark(forged, target).detect().matched == 32  # the bits alone would "prove" it
        report = audit_keys(target, [("forged.key", forged)], base=start)
        (claim,) = report.claimants
        assert claim.detection.verdict and not claim.claimed
        assert claim.calibration is not None and claim.calibration.status == "mismatch"


def test_adapter_without_a_base_is_refused_unless_base_is_given(tmp_path, workspace, monkeypatch) -> None:
    from fedguard.errors import ConfigError

    peft_model = tiny_gpt2_lora(SimulationConfig(n_layer=2), 0)
    peft_model.save_pretrained(tmp_path / "adapter")
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = None
    cfg_path.write_text(json.dumps(cfg))
    # a model in the current directory must not be picked up as the base
    monkeypatch.chdir(workspace["root"] / "start")
    with pytest.raises(ConfigError, match="does not name its base model"):
        audit_ownership(tmp_path / "adapter", [workspace["keys"] / "alice.key"])
    report = audit_ownership(tmp_path / "adapter", [workspace["keys"] / "alice.key"],
                             base=workspace["root"] / "start")
    assert report.claimants[0].calibration is not None


def test_duplicate_owner_labels_are_kept_apart(workspace, tmp_path) -> None:
    from fedguard.rng import SecureRNG
    from fedguard.watermark import make_sign_key

    start = tiny_gpt2_lora(SimulationConfig(n_layer=2), 0).merge_and_unload()
    twins = [(f"k{i}.key", make_sign_key(start, bits=32, owner="acme", rng=SecureRNG.for_testing(f"t{i}")))
             for i in range(2)]
    report = audit_keys(start, twins, base=start)
    a, b = (c.label for c in report.claimants)
    assert a != b and a.startswith("acme (k0.key") and b.startswith("acme (k1.key")
    md = render_markdown(report)
    assert f"| {a} |" in md and f"| {b} |" in md


def test_audit_with_a_key_for_another_model_raises_key_mismatch(workspace, tmp_path) -> None:
    from fedguard.errors import KeyMismatchError

    other = tiny_gpt2_lora(SimulationConfig(n_layer=2, n_embd=32), 0).merge_and_unload()
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(KeyMismatchError, match="shape"):
        audit_ownership(tmp_path / "other", [workspace["keys"] / "alice.key"])


def test_markdown_states_the_decision_rule(workspace) -> None:
    report = audit_ownership(workspace["final"], [workspace["keys"] / "alice.key"], base=workspace["root"] / "start")
    md = render_markdown(report)
    assert "P[X >= matched]" in md and "Significance: 1e-06" in md


def test_audit_reports_whether_a_commitment_predates_the_model(workspace, tmp_path) -> None:
    from datetime import UTC, datetime, timedelta

    from fedguard.watermark.commitment import commit, make_commitment, save_commitment

    keys, base = workspace["keys"], workspace["root"] / "start"
    alice = load_key(keys / "alice.key")
    early = save_commitment(make_commitment(alice, now=datetime.now(UTC) - timedelta(days=1)), tmp_path / "early.json")
    late = save_commitment(make_commitment(alice, now=datetime.now(UTC) + timedelta(days=1)), tmp_path / "late.json")
    statuses = {}
    for name, files in (("early", [early]), ("late", [late]), ("none", [])):
        report = audit_ownership(workspace["final"], [keys / "alice.key"], base=base, commitment_files=files,
                                 require_commitment=True)
        (claim,) = report.claimants
        statuses[name] = (claim.commitment, claim.claimed)
    assert statuses == {"early": ("predates-model", True), "late": ("after-model", False),
                        "none": ("none", False)}
    # a commitment recorded in the model's own run state (the trainer's checkpoint state.json) counts
    run_copy = tmp_path / "ckpt"
    run_copy.mkdir()
    for f in workspace["final"].iterdir():
        (run_copy / f.name).write_bytes(f.read_bytes())
    (run_copy / "state.json").write_text(json.dumps({"round": 3, "hooks": {"watermark": {
        "key_commitments": [commit(alice)]}}}))
    report = audit_ownership(run_copy, [keys / "alice.key"], base=base, require_commitment=True)
    assert report.claimants[0].commitment == "recorded-in-run" and report.claimants[0].claimed
    # a commitment is never replaced
    from fedguard.errors import ConfigError

    with pytest.raises(ConfigError, match="never replaced"):
        save_commitment(make_commitment(alice), early)


def test_the_audit_claims_a_residual_rotated_llama_only_through_alignment(tmp_path) -> None:
    """A thief releases the owner's Llama model with its residual stream rotated (QuaRot-style, function
    unchanged): the audit, which has the base model, undoes the rotation and claims; read without the base
    (no alignment) the same key says nothing."""
    import copy

    from attacks.watermark import transforms
    from fedguard.rng import SecureRNG
    from fedguard.watermark import make_sign_key, save_key
    from tests.models import tiny_llama
    from tests.watermark.embedding import embed_until_margins_hold

    base = tiny_llama(2)
    base.save_pretrained(tmp_path / "base")
    key = make_sign_key(base, bits=32, mode="gram", alpha=1.0, owner="alice", rng=SecureRNG.for_testing("rot"))
    model = copy.deepcopy(base)
    wm = SignWatermark(key, model)
    for p in model.parameters():
        p.requires_grad_(False)
    for block in key.blocks:
        model.get_submodule(block.module).weight.requires_grad_(True)
    embed_until_margins_hold(wm, model)
    transforms.rotate_residual(model, torch.Generator().manual_seed(1))
    model.save_pretrained(tmp_path / "stolen")
    save_key(key, tmp_path / "alice.key")
    report = audit_ownership(tmp_path / "stolen", [tmp_path / "alice.key"], base=tmp_path / "base")
    (claim,) = report.claimants
    assert claim.claimed and claim.detection.matched == 32, claim.reason
    unaligned = SignWatermark(key, model).detect()
    assert not unaligned.verdict and unaligned.matched < 26


def test_the_audit_can_use_the_sign_flip_test_and_says_so(workspace, capsys) -> None:
    """``--test sign-flip``: the owner still claims, the other claimant does not, the report names the test."""
    keys = workspace["keys"]
    assert run(["audit", "ownership", "--model", str(workspace["final"]), "--base", str(workspace["root"] / "start"),
                "--key", str(keys / "alice.key"), "--key", str(keys / "bob.key"), "--json", "--test", "sign-flip"]) == 0
    alice, bob = json.loads(capsys.readouterr().out)["claimants"]
    assert alice["test"] == bob["test"] == "sign-flip"
    assert alice["verdict"] and alice["p_value"] <= 2.0**-32 * 1.0001 and not bob["verdict"]
