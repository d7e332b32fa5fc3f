"""The default watermark attack suite and its report (JSON + Markdown + PNG of bits vs strength).

Every attack starts from a fresh copy of the model. Strengths of the ``default`` suite: prune 25/50/75%
of every block weight (and, separately, 50% with the norm scales; and 25/50/75% of the unmerged LoRA
factors themselves); int8/int4 per tensor and per channel,
fp16, bf16; the exact re-parametrisations (norm fold with sign flips, MLP permutation, head permutation,
head rotation, residual-stream rotation, LoRA refactoring with SVD re-extraction);
same-task fine-tuning for 0..1000 steps at the
given learning rate; overwriting with 1, 2 and 4 attacker keys; offset forgery and seed trying.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from attacks.watermark import transforms
from attacks.watermark.ambiguity import AmbiguityResult, offset_forgery, seed_trying
from attacks.watermark.finetune import finetune
from attacks.watermark.overwrite import overwrite
from attacks.watermark.result import AttackResult, logits, measure, task_loss
from fedguard.errors import ConfigError
from fedguard.rng import SecureRNG
from fedguard.watermark.keys import SignKey


@dataclass(frozen=True, kw_only=True)
class SuiteConfig:
    prune: tuple[float, ...] = (0.25, 0.5, 0.75)
    quantise: tuple[str, ...] = ("int8", "int4", "int8-channel", "int4-channel", "fp16", "bf16")
    reparametrise: tuple[str, ...] = ("norm-fold", "mlp-permutation", "head-permutation", "head-rotation",
                                      "residual-rotation", "lora-svd")
    """``residual-rotation`` (GPT-2 and the Llama family; another family is skipped, and said so) is measured
    twice with a base model: as the audit reads it (after Procrustes alignment) and without alignment."""
    finetune_steps: tuple[int, ...] = (0, 50, 200, 1000)
    lr: float = 5e-3
    finetune_params: tuple[str, ...] = ("released", "new-lora", "all")
    """``all`` runs at lr/10 (a full fine-tune at the adapter's lr diverges from the task)."""
    overwrite_keys: tuple[int, ...] = (1, 2, 4)
    overwrite_steps: int = 200
    seed_tries: int = 200


SUITES: dict[str, SuiteConfig] = {
    "default": SuiteConfig(),
    "quick": SuiteConfig(prune=(0.5,), quantise=("int4",), finetune_steps=(0, 20), finetune_params=("released",),
                         overwrite_keys=(1,),
                         overwrite_steps=20, seed_tries=10),
}

_REPARAM: dict[str, Callable[[torch.nn.Module, torch.Generator], None]] = {
    "norm-fold": transforms.fold_norms,
    "mlp-permutation": transforms.permute_mlp,
    "head-permutation": transforms.permute_heads,
    "head-rotation": transforms.rotate_heads,
    "residual-rotation": transforms.rotate_residual,
}


@dataclass
class SuiteReport:
    model: str
    keys: list[str]
    baseline: AttackResult
    results: list[AttackResult] = field(default_factory=list)
    ambiguity: list[AmbiguityResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "keys": self.keys, "baseline": self.baseline.to_json(),
                "results": [r.to_json() for r in self.results],
                "ambiguity": [a.to_json() for a in self.ambiguity], "skipped": self.skipped}


def run_suite(model: torch.nn.Module, keys: Sequence[SignKey], data: torch.Tensor, *,
              base: torch.nn.Module | None = None, config: SuiteConfig | str = "default",
              model_name: str = "<model>", rng: SecureRNG | None = None) -> SuiteReport:
    """Run every attack of ``config`` on copies of ``model``; measure the owners' ``keys`` on each."""
    if isinstance(config, str):
        if config not in SUITES:
            raise ConfigError(f"unknown suite {config!r}; known: {sorted(SUITES)}")
        config = SUITES[config]
    if not keys:
        raise ConfigError("the attack suite needs at least one owner key to measure")
    rng = rng or SecureRNG()
    gen = torch.Generator().manual_seed(int.from_bytes(rng.spawn("transforms").bytes(4), "little"))
    ref_loss = task_loss(model, data)
    ref_logits = logits(model, data)
    report = SuiteReport(model_name, [k.owner or k.key_id for k in keys],
                         measure(model, keys, data, attack="none", strength=0.0, label="as released",
                                 reference_loss=ref_loss, reference_logits=ref_logits))

    def on_copy(attack: str, strength: float, label: str, act: Callable[[torch.nn.Module], Any],
                merge: bool = True, unaligned_too: bool = False) -> None:
        victim = copy.deepcopy(model)
        victim = transforms.merged(victim) if merge else victim
        act(victim)
        report.results.append(measure(victim, keys, data, attack=attack, strength=strength, label=label,
                                      reference_loss=ref_loss, reference_logits=ref_logits, base=base))
        if unaligned_too and base is not None:
            report.results.append(measure(victim, keys, data, attack=attack, strength=strength,
                                          label=f"{label} (read without alignment)", reference_loss=ref_loss,
                                          reference_logits=ref_logits))

    for f in config.prune:
        on_copy("prune (block weights)", f, f"{f:.0%}", partial(transforms.prune, fraction=f))
    if 0.5 in config.prune:
        on_copy("prune (weights + norms)", 0.5, "50%", partial(transforms.prune, fraction=0.5, norms=True))
    if any(hasattr(m, "lora_A") for m in model.modules()):
        for f in config.prune:
            on_copy("prune (LoRA adapter)", f, f"{f:.0%}", partial(transforms.prune_lora, fraction=f), merge=False)
    else:
        report.skipped.append("prune (LoRA adapter): the model has no LoRA adapter")
    for q in config.quantise:
        if q in ("fp16", "bf16"):
            on_copy("quantise (float)", 16.0, q, partial(transforms.quantise, bits=q))
            continue
        bits, _, per = q.removeprefix("int").partition("-")
        on_copy(f"quantise (per {'channel' if per else 'tensor'})", float(bits), q,
                partial(transforms.quantise, bits=int(bits), per_channel=bool(per)))
    for name in config.reparametrise:
        if name == "lora-svd":
            if not any(hasattr(m, "lora_A") for m in model.modules()):
                report.skipped.append("lora-svd: the model has no LoRA adapter")
                continue
            on_copy("re-parametrise", 1.0, name, transforms.refactor_lora, merge=False)
            continue
        if name not in _REPARAM:
            raise ConfigError(f"unknown re-parametrisation {name!r}; known: {sorted(_REPARAM) + ['lora-svd']}")
        try:
            on_copy("re-parametrise", 1.0, name, partial(_call_with, _REPARAM[name], gen),
                    unaligned_too=name == "residual-rotation")
        except ConfigError as err:  # a family the transform does not implement: said, not hidden
            report.skipped.append(f"{name}: {err}")
    if config.finetune_steps:
        for params in config.finetune_params:
            if params not in ("released", "new-lora", "all"):
                raise ConfigError(f"unknown fine-tuning parameters {params!r}; known: released, new-lora, all")
            lr = config.lr / 10 if params == "all" else config.lr
            victim = copy.deepcopy(model) if params != "all" else transforms.merged(copy.deepcopy(model))
            report.results += finetune(victim, keys, data, steps=config.finetune_steps, lr=lr,
                                       params=params)  # type: ignore[arg-type]
    if config.overwrite_keys:
        report.results += overwrite(model, keys, data, attacker_keys=config.overwrite_keys,
                                    steps=config.overwrite_steps, lr=config.lr, rng=rng.spawn("overwrite"))
    if base is None:
        report.skipped.append("ambiguity: no base model given (--base), offsets cannot be recomputed")
    else:
        report.ambiguity.append(offset_forgery(model, base, keys[0], rng=rng.spawn("forgery")))
        report.ambiguity.append(seed_trying(model, base, keys[0], tries=config.seed_tries, rng=rng.spawn("seeds")))
    return report


def render_markdown(report: SuiteReport, plot: str | None = "watermark_attacks.png") -> str:
    b = report.baseline
    lines = ["# Watermark attack suite", "", f"Model: `{report.model}`; owners: {', '.join(report.keys)}; "
             f"as released: fewest bits {b.min_matched}/{b.bits}, {b.claims}/{len(b.owners)} claims, task loss "
             f"{b.task_loss:.4f}.", "",
             "| attack | strength | fewest bits | max p-value | claims | claims (sign-flip test) | Δ task loss "
             "| max abs Δ logits |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report.results:
        lines.append(f"| {r.attack} | {r.label} | {r.min_matched}/{r.bits} | {r.max_p_value:.3g} | "
                     f"{r.claims}/{len(r.owners)} | {r.claims_sign_flip}/{len(r.owners)} | {r.delta_task_loss:+.4f} | "
                     f"{r.function_change:.2g} |")
    if report.ambiguity:
        lines += ["", "| ambiguity attack | strength | bits matched | p-value | bits alone claim | audit |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {a.attack} | {a.label} | {a.matched}/{a.bits} | {a.p_value:.3g} | {a.bits_verdict} | "
                  f"{a.reason} |" for a in report.ambiguity]
    lines += ["", "Claims: binomial count of matched bits at significance 1e-6; the sign-flip column is the "
              "same key under the sign-flip test of sum_j b_j z_j (fedguard.watermark.verify), which a claimant "
              "must choose before looking (`fedguard audit ownership --test`)."]
    if report.skipped:
        lines += ["", "Skipped: " + "; ".join(report.skipped)]
    if plot:
        lines += ["", f"![bits vs attack strength]({plot})"]
    return "\n".join(lines) + "\n"


def _draw(report: SuiteReport) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        families: dict[str, list[AttackResult]] = {}
        for r in report.results:
            families.setdefault(r.attack, []).append(r)
        n = max(1, len(families))
        cols = min(4, n)
        rows = (n + cols - 1) // cols
        for i, (name, rs) in enumerate(families.items()):
            ax = fig.add_subplot(rows, cols, i + 1)
            xs = list(range(len(rs)))
            ax.plot(xs, [r.min_matched / max(r.bits, 1) for r in rs], marker="o", label="fewest bits")
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
            ax.set_xticks(xs)
            ax.set_xticklabels([r.label for r in rs], rotation=30, ha="right", fontsize=6)
            ax.set_ylim(0, 1.05)
            ax.set_title(name, fontsize=7)
            if i % cols == 0:
                ax.set_ylabel("bit agreement (worst owner)", fontsize=7)

    return draw


def write_suite_report(report: SuiteReport, out_dir: str) -> Any:
    from audits.report import write_report

    return write_report(out_dir, "watermark_attacks", report.to_json(), render_markdown(report),
                        {"watermark_attacks.png": _draw(report)}, figsize=(11.0, 7.0))


def _call_with(fn: Callable[[torch.nn.Module, torch.Generator], None], gen: torch.Generator,
               model: torch.nn.Module) -> None:
    fn(model, gen)
