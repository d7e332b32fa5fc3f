"""Each watermark attack runs on a tiny federated model and is measured; the defended (gram) watermark
keeps every owner's claim where the issue's goal says so (exact re-parametrisations, 50% pruning, int4,
LoRA refactoring), the forged-key and seed-trying claims are refused. Fine-tuning and overwriting do
erase the watermark on this toy (a measured gap, docs/watermark.md): their tests check the measurement."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import pytest
import torch

from attacks.watermark import transforms
from attacks.watermark.ambiguity import offset_forgery, seed_trying
from attacks.watermark.finetune import finetune
from attacks.watermark.overwrite import overwrite
from attacks.watermark.result import logits, measure, task_loss
from attacks.watermark.suite import SUITES, run_suite
from fedguard.errors import ConfigError
from fedguard.rng import SecureRNG
from fedguard.watermark.simulation import SimulationConfig, run_federated, task_data, tiny_gpt2_lora

CFG = SimulationConfig(clients=2, rounds=3, n_layer=2, bits=32, mode="gram")


# tiny models run fastest on one thread (and do not fight xdist's other worker for the 2 cores)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained() -> dict:
    res = run_federated(CFG)
    assert all(d.verdict for d in res.detections[-1])  # every owner claims before any attack
    train, _ = task_data(CFG, SecureRNG.for_testing(CFG.seed))
    base = tiny_gpt2_lora(CFG, SecureRNG.for_testing(CFG.seed).spawn("init").torch_seed()).merge_and_unload()
    matched = [d.matched for d in res.detections[-1]]
    return {"model": res.model, "keys": res.keys, "data": torch.cat(train)[:128], "base": base, "matched": matched}


def _attacked(trained: dict, act, merge: bool = True):
    model = copy.deepcopy(trained["model"])
    ref_loss, ref_logits = task_loss(model, trained["data"]), logits(model, trained["data"])
    model = transforms.merged(model) if merge else model
    act(model)
    return measure(model, trained["keys"], trained["data"], attack="t", strength=1.0, label="t",
                   reference_loss=ref_loss, reference_logits=ref_logits)


@pytest.mark.parametrize("name", ["fold_norms", "permute_mlp", "permute_heads", "rotate_heads"])
def test_exact_reparametrisations_keep_the_function_and_every_gram_claim(trained: dict, name: str) -> None:
    gen = torch.Generator().manual_seed(7)
    r = _attacked(trained, lambda m: getattr(transforms, name)(m, gen))
    assert r.function_change < 1e-4 and abs(r.delta_task_loss) < 1e-5
    assert r.verdict and [o.matched for o in r.owners] == trained["matched"], r  # not one bit moved


def test_the_older_invariant_feature_falls_to_mlp_permutation(trained: dict) -> None:
    """The attack the gram feature answers: with keys in mode 'invariant' (secret direction in the
    consumer's output space) the MLP permutation moves the bits of every ln_2 block."""
    res = run_federated(SimulationConfig(clients=2, rounds=3, n_layer=2, bits=32, mode="invariant"))
    model = transforms.merged(copy.deepcopy(res.model))
    before = measure(model, res.keys, trained["data"], attack="t", strength=0, label="t", reference_loss=0.0)
    transforms.permute_mlp(model, torch.Generator().manual_seed(1))
    after = measure(model, res.keys, trained["data"], attack="t", strength=1, label="t", reference_loss=0.0)
    assert before.verdict and after.min_matched < before.min_matched - 4


def test_lora_refactoring_by_svd_keeps_the_function_and_the_claims(trained: dict) -> None:
    r = _attacked(trained, transforms.refactor_lora, merge=False)
    assert r.function_change < 1e-4 and r.verdict


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_magnitude_pruning_keeps_the_claims(trained: dict, fraction: float) -> None:
    r = _attacked(trained, lambda m: transforms.prune(m, fraction))
    assert r.verdict and r.delta_task_loss > 0  # the attacker paid, the owners keep their claims


@pytest.mark.parametrize(("bits", "per_channel"), [(8, False), (4, False), (4, True), ("fp16", False), ("bf16", False)])
def test_quantisation_keeps_the_claims(trained: dict, bits, per_channel: bool) -> None:
    r = _attacked(trained, lambda m: transforms.quantise(m, bits, per_channel=per_channel))
    assert r.verdict


def test_bad_attack_strengths_are_config_errors(trained: dict) -> None:
    model = transforms.merged(copy.deepcopy(trained["model"]))
    with pytest.raises(ConfigError, match="prune fraction"):
        transforms.prune(model, 1.5)
    with pytest.raises(ConfigError, match="quantisation bits"):
        transforms.quantise(model, 1)
    with pytest.raises(ConfigError, match="no LoRA layers"):
        transforms.refactor_lora(model)
    with pytest.raises(ConfigError, match="step counts"):
        finetune(model, trained["keys"], trained["data"], steps=[], lr=1e-3)


def test_finetuning_is_measured_per_step_count(trained: dict) -> None:
    results = finetune(copy.deepcopy(trained["model"]), trained["keys"], trained["data"], steps=[0, 10, 30])
    assert [r.strength for r in results] == [0.0, 10.0, 30.0]
    assert results[0].verdict and results[0].delta_task_loss == 0.0
    assert results[-1].delta_task_loss < 0  # same-task fine-tuning improves the toy model's loss
    assert all(0 <= r.min_matched <= r.bits for r in results)


def test_overwriting_embeds_the_attackers_keys_and_measures_the_owners(trained: dict) -> None:
    (r,) = overwrite(trained["model"], trained["keys"], trained["data"], attacker_keys=[1], steps=15,
                     rng=SecureRNG.for_testing("attacker"))
    assert r.strength == 1.0 and len(r.owners) == 2 and "attacker bits" in r.label
    assert all(0 <= o.matched <= o.bits for o in r.owners)


def test_forged_offsets_and_seed_trying_are_refused(trained: dict) -> None:
    forged = offset_forgery(trained["model"], trained["base"], trained["keys"][0], rng=SecureRNG.for_testing("f"))
    assert forged.bits_verdict and forged.matched == forged.bits  # the bits alone would claim it
    assert not forged.audit_verdict and "mismatch" in forged.reason
    tried = seed_trying(trained["model"], trained["base"], trained["keys"][0], tries=8, rng=SecureRNG.for_testing("s"))
    assert not tried.audit_verdict and tried.p_value > 1e-6  # 8 tries at 1e-6: P[any claim] <= 8e-6


def test_quick_suite_and_cli_write_json_markdown_and_png(trained: dict, tmp_path: Path) -> None:
    from attacks.watermark.cli import register_cli
    from fedguard.cli import Commands
    from fedguard.watermark.keys import save_key

    report = run_suite(trained["model"], trained["keys"], trained["data"], base=trained["base"], config="quick",
                       rng=SecureRNG.for_testing("suite"))
    attacks = {r.attack for r in report.results}
    assert {"prune (block weights)", "quantise (per tensor)", "re-parametrise"} <= attacks
    assert len(report.ambiguity) == 2 and not any(a.audit_verdict for a in report.ambiguity)
    with pytest.raises(ConfigError, match="unknown suite"):
        run_suite(trained["model"], trained["keys"], trained["data"], config="everything")
    assert "quick" in SUITES
    # the CLI on a saved adapter (its base saved beside it)
    trained["base"].save_pretrained(tmp_path / "base")
    model = copy.deepcopy(trained["model"])
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "keys").mkdir()
    paths = [str(save_key(k, tmp_path / "keys" / f"{k.owner}.key")) for k in trained["keys"]]
    parser = argparse.ArgumentParser(prog="fedguard")
    register_cli(Commands(parser.add_subparsers()))
    args = parser.parse_args(["attack", "watermark", "--model", str(tmp_path / "adapter"), "--key", paths[0],
                              "--key", paths[1], "--suite", "quick", "--out", str(tmp_path / "out")])
    assert args.handler(args) == 0
    doc = json.loads((tmp_path / "out" / "watermark_attacks.json").read_text())
    assert doc["baseline"]["claims"] == 2 and doc["results"] and len(doc["ambiguity"]) == 2
    assert "| re-parametrise |" in (tmp_path / "out" / "watermark_attacks.md").read_text()
    assert (tmp_path / "out" / "watermark_attacks.png").read_bytes()[:4] == b"\x89PNG"


def test_finetuning_a_fresh_lora_on_the_merged_model_leaves_the_original_untouched(trained: dict) -> None:
    before = [p.detach().clone() for p in trained["model"].parameters()]
    results = finetune(trained["model"], trained["keys"], trained["data"], steps=[0, 10], params="new-lora")
    assert results[0].verdict and results[1].label == "10 steps" and "new-lora" in results[1].attack
    assert all(torch.equal(a, b) for a, b in zip(before, trained["model"].parameters(), strict=True))


# --- the Llama family (RMSNorm, GQA, RoPE): same attacks, plus the residual-stream rotation -------------------


@pytest.fixture(scope="module")
def llama() -> dict:
    """A tiny random Llama (GQA: 4 query heads on 2 key-value heads) with LoRA and trainable norms, into
    which two owners embed gram keys until both claim."""
    from peft import LoraConfig, get_peft_model

    from fedguard.watermark import SignWatermark, make_sign_key, prepare_norm_targets
    from tests.models import tiny_llama

    base = tiny_llama(3)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    prepare_norm_targets(model)
    keys = [make_sign_key(model, bits=32, mode="gram", n_clients=2, alpha=0.05, owner=f"owner-{i}",
                          rng=SecureRNG.for_testing(f"llama/{i}")) for i in range(2)]
    marks = [SignWatermark(k, model) for k in keys]
    gen = torch.Generator().manual_seed(0)
    start = torch.randint(0, 64, (128, 1), generator=gen)
    data = (start + torch.arange(16)[None, :] * 5) % 64  # a learnable next-token rule
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(300):
        idx = torch.randint(0, 128, (16,), generator=gen)
        loss = model(input_ids=data[idx], labels=data[idx]).loss + sum(m.loss() for m in marks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 19 and all(m.detect().matched == 32 for m in marks):
            break
    model.eval()
    assert all(m.detect().verdict for m in marks)
    return {"model": model, "keys": keys, "data": data, "base": base,
            "matched": [m.detect().matched for m in marks]}


@pytest.mark.parametrize("name", ["fold_norms", "permute_mlp", "permute_heads", "rotate_heads"])
def test_llama_exact_reparametrisations_keep_the_function_and_every_gram_claim(llama: dict, name: str) -> None:
    model = transforms.merged(copy.deepcopy(llama["model"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_loss, ref_logits = task_loss(model, llama["data"]), logits(model, llama["data"])
    getattr(transforms, name)(model, torch.Generator().manual_seed(11))
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())  # the weights did move
    r = measure(model, llama["keys"], llama["data"], attack="t", strength=1.0, label="t", reference_loss=ref_loss,
                reference_logits=ref_logits)
    assert r.function_change < 1e-4 and abs(r.delta_task_loss) < 1e-5
    assert r.verdict and [o.matched for o in r.owners] == llama["matched"], r


def test_llama_residual_rotation_breaks_the_plain_gram_readout_and_alignment_restores_it(llama: dict) -> None:
    """QuaRot-style: fold the RMSNorm scales, rotate the residual basis. The function is unchanged, the gram
    bits read as before fall to chance; read after Procrustes alignment on the base's embeddings, every bit
    is back (the audit does this whenever it has the base model)."""
    model = transforms.merged(copy.deepcopy(llama["model"]))
    ref_loss, ref_logits = task_loss(model, llama["data"]), logits(model, llama["data"])
    transforms.rotate_residual(model, torch.Generator().manual_seed(5))
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in model.modules() if "RMSNorm" in type(n).__name__)
    plain = measure(model, llama["keys"], llama["data"], attack="t", strength=1.0, label="t", reference_loss=ref_loss,
                    reference_logits=ref_logits)
    assert plain.function_change < 1e-4 and abs(plain.delta_task_loss) < 1e-5
    assert plain.claims == 0 and plain.min_matched <= 24, plain  # the attack works on the unaligned readout
    aligned = measure(model, llama["keys"], llama["data"], attack="t", strength=1.0, label="t",
                      reference_loss=ref_loss, base=llama["base"])
    assert aligned.verdict and [o.matched for o in aligned.owners] == llama["matched"], aligned


def test_alignment_is_the_identity_on_an_unrotated_model_and_refuses_other_vocabularies(llama: dict) -> None:
    from fedguard.errors import KeyMismatchError
    from fedguard.watermark.alignment import residual_alignment
    from tests.models import tiny_llama

    rot = residual_alignment(llama["model"], llama["base"])  # LoRA never trains the embeddings
    assert torch.allclose(rot, torch.eye(rot.shape[0], dtype=torch.float64), atol=1e-10)
    with pytest.raises(KeyMismatchError, match="token embeddings"):
        residual_alignment(llama["model"], tiny_llama(0, vocab=80))


def test_alignment_keeps_the_null_fresh_keys_do_not_claim_a_rotated_model(llama: dict) -> None:
    """Alignment depends on the model and the public base only, never on the key: keys that were not
    embedded still read as coin flips (no claim at 1e-6 among 20 fresh keys)."""
    from fedguard.watermark import make_sign_key

    model = transforms.merged(copy.deepcopy(llama["model"]))
    transforms.rotate_residual(model, torch.Generator().manual_seed(9))
    fresh = [make_sign_key(llama["base"], like=llama["keys"][0], rng=SecureRNG.for_testing(f"null/{i}"))
             for i in range(20)]
    r = measure(model, fresh, llama["data"], attack="t", strength=1.0, label="t", reference_loss=0.0,
                base=llama["base"])
    assert r.claims == 0 and max(o.matched for o in r.owners) < 29


def test_llama_prune_and_quantise_keep_the_claims(llama: dict) -> None:
    for act in (lambda m: transforms.prune(m, 0.5), lambda m: transforms.quantise(m, 4, per_channel=True)):
        model = transforms.merged(copy.deepcopy(llama["model"]))
        act(model)
        r = measure(model, llama["keys"], llama["data"], attack="t", strength=1.0, label="t", reference_loss=0.0)
        assert r.verdict, r


def test_gpt2_residual_rotation_keeps_the_function_and_alignment_restores_every_bit(trained: dict) -> None:
    """GPT-2's LayerNorm subtracts the mean: the rotation keeps the all-ones direction and the norms' β fold
    into the readers' biases. The vocabulary (48) is smaller than the hidden size (64): the position
    embeddings rotate too and complete the anchors that pin the rotation down."""
    model = transforms.merged(copy.deepcopy(trained["model"]))
    ref_loss, ref_logits = task_loss(model, trained["data"]), logits(model, trained["data"])
    transforms.rotate_residual(model, torch.Generator().manual_seed(3))
    plain = measure(model, trained["keys"], trained["data"], attack="t", strength=1.0, label="t",
                    reference_loss=ref_loss, reference_logits=ref_logits)
    assert plain.function_change < 1e-4 and abs(plain.delta_task_loss) < 1e-5
    assert plain.claims == 0, plain
    aligned = measure(model, trained["keys"], trained["data"], attack="t", strength=1.0, label="t",
                      reference_loss=ref_loss, base=trained["base"])
    assert aligned.verdict and [o.matched for o in aligned.owners] == trained["matched"], aligned


def test_quick_suite_runs_on_llama_with_both_residual_rotation_rows(llama: dict) -> None:
    import dataclasses

    config = dataclasses.replace(SUITES["quick"], reparametrise=("norm-fold", "head-rotation", "residual-rotation",
                                                                  "lora-svd"), finetune_params=("released", "new-lora"))
    model = copy.deepcopy(llama["model"])
    report = run_suite(model, llama["keys"], llama["data"][:64], base=llama["base"], config=config,
                       rng=SecureRNG.for_testing("llama-suite"))
    rows = {r.label: r for r in report.results if r.attack == "re-parametrise"}
    assert set(rows) == {"norm-fold", "head-rotation", "residual-rotation",
                         "residual-rotation (read without alignment)", "lora-svd"}
    assert all(rows[n].verdict for n in ("norm-fold", "head-rotation", "residual-rotation", "lora-svd"))
    assert rows["residual-rotation (read without alignment)"].claims == 0
    assert any("new-lora" in r.attack for r in report.results) and not report.skipped


def test_the_attack_cli_runs_on_a_bottleneck_adapter_checkpoint(tmp_path: Path) -> None:
    """A Houlsby adapter saved by fedguard_train.bottleneck (peft cannot load it): the CLI registers its
    loader, the released parameters (adapters + norm scales) are what fine-tuning trains, and the report
    is written."""
    from attacks.watermark.cli import register_cli
    from fedguard.cli import Commands
    from fedguard.watermark import save_key
    from tests.watermark.embedding import watermarked_bottleneck

    _, key = watermarked_bottleneck(tmp_path, "bn-cli", owner="owner")
    (tmp_path / "keys").mkdir()
    path = str(save_key(key, tmp_path / "keys" / "owner.key"))
    parser = argparse.ArgumentParser(prog="fedguard")
    register_cli(Commands(parser.add_subparsers()))
    args = parser.parse_args(["attack", "watermark", "--model", str(tmp_path / "adapter"), "--key", path,
                              "--suite", "quick", "--out", str(tmp_path / "out")])
    assert args.handler(args) == 0
    doc = json.loads((tmp_path / "out" / "watermark_attacks.json").read_text())
    assert doc["baseline"]["claims"] == 1
    tuned = [r for r in doc["results"] if r["attack"].startswith("finetune") and r["label"] == "20 steps"]
    assert tuned and tuned[0]["delta_task_loss"] != 0.0  # the released parameters did train


def test_overwrite_control_is_plain_finetuning_on_the_same_batches_and_prices_on_held_out_data(trained: dict) -> None:
    """``k = 0`` with a shared ``seed`` is exactly the attacker's fine-tuning alone (the anchor that prices
    writing keys), and ``eval_data`` is what the task loss is measured on."""
    held_out = trained["data"][-32:]
    control, four = overwrite(trained["model"], trained["keys"], trained["data"], attacker_keys=[0, 4], steps=12,
                              seed=5, eval_data=held_out, rng=SecureRNG.for_testing("attacker"))
    (plain,) = finetune(copy.deepcopy(trained["model"]), trained["keys"], trained["data"], steps=[12], seed=5,
                        eval_data=held_out)
    assert "control" in control.label and control.strength == 0.0
    assert abs(control.task_loss - plain.task_loss) < 1e-6  # identical training, identical model
    assert [o.matched for o in control.owners] == [o.matched for o in plain.owners]
    assert four.task_loss != control.task_loss  # the 4 keys' regularisers changed the training
    assert abs(control.task_loss - control.delta_task_loss - task_loss(trained["model"], held_out)) < 1e-6
    with pytest.raises(ConfigError, match="attacker's alpha"):
        overwrite(trained["model"], trained["keys"], trained["data"], attacker_keys=[1], alpha=0.0)
    with pytest.raises(ConfigError, match="key counts >= 0"):
        overwrite(trained["model"], trained["keys"], trained["data"], attacker_keys=[-1])


def test_every_attack_result_carries_the_sign_flip_test(trained: dict) -> None:
    r = measure(trained["model"], trained["keys"], trained["data"], attack="none", strength=0.0, label="t",
                reference_loss=0.0)
    assert all(o.sign_flip_p_value <= 1e-6 for o in r.owners) and r.claims_sign_flip == 2
    row = r.to_json()
    assert row["claims_sign_flip"] == 2 and all("sign_flip_p_value" in o for o in row["owners"])


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_pruning_the_lora_factors_themselves_keeps_the_claims(trained: dict, fraction: float) -> None:
    """Issue 14's "prune (LoRA)": magnitude pruning of the released adapter's A and B, unmerged."""
    model = copy.deepcopy(trained["model"])
    ref = task_loss(model, trained["data"])
    assert transforms.prune_lora(model, fraction) > 0
    zeros = [float((m.lora_A["default"].weight == 0).float().mean()) for m in model.modules() if hasattr(m, "lora_A")
             and hasattr(m, "get_base_layer")]
    assert min(zeros) >= fraction - 0.01
    r = measure(model, trained["keys"], trained["data"], attack="t", strength=fraction, label="t", reference_loss=ref)
    assert r.verdict, r
    with pytest.raises(ConfigError, match="no LoRA layers to prune"):
        transforms.prune_lora(transforms.merged(copy.deepcopy(trained["model"])), 0.5)
