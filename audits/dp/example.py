"""Example-level audit of DP-SGD in one training run (Steinke, Nasr, Jagielski, NeurIPS 2023, §6: input-space
canaries, black-box loss scores).

What runs. Client 0 of the configured federation (its model, adapter, tokenizer and partition of the data,
built as the trainer builds them) trains with the real example-level DP-SGD path,
:class:`fedguard.dp.PrivateAdapterTrainer` (Opacus per-example clipping, Gaussian noise from
:class:`~fedguard.rng.SecureRNG`, Poisson batches, one accountant event per logical step). The trainer has
no DP-SGD option of its own yet, so the audit runs this client's local DP-SGD outside the round loop.

Canaries: ``m`` random token sequences (:func:`~audits.dp.canaries.random_token_sequences`), each added
to the client's data with probability ½; score ``loss_base(x_i) − loss_final(x_i)`` (mean next-token
cross-entropy of the whole sequence), higher = more likely in.

Settings default to the run's config: σ = ``dp.noise_multiplier``, per-example clip = ``dp.clip_norm``,
δ = ``dp.target_delta``, expected batch = ``training.batch_size`` (``q = batch / N``), steps =
``federation.rounds × training.local_steps``, learning rate ``training.lr`` (Adam).

What it can see (measured, docs/results.md): on the tiny test models the black-box loss attack is weak —
even noise-free training certifies only ε ≈ 1.2 with 200 canaries — so it catches a missing clip when the
clip norm is small and each canary is seen often (~150 times; training becomes effectively non-private) but
not noise ÷ 10.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from audits.dp.bound import DEFAULT_CONFIDENCE, audit_scores
from audits.dp.breaks import DEFAULT_NOISE_DIVISOR, Break, check_break
from audits.dp.canaries import draw_membership, random_token_sequences
from audits.dp.client import DPAuditResult
from fedguard.checks import check_int, check_number
from fedguard.errors import ConfigError
from fedguard.rng import SecureRNG
from fedguard_train.config import TrainConfig

__all__ = ["ExampleAuditSettings", "audit_example_level", "canary_losses"]

_CLIP_BREAK_NORM = 1e4
"""The ``clip`` break runs Opacus with this clip norm (nothing is clipped) and ``σ·C/1e4`` as its noise
multiplier, so the noise added is still ``N(0, (σC)²)``."""


class _Progress:
    """What the audit tells a progress bar (the trainer's :class:`~fedguard_train.trainers.base.Observer`)."""

    def __init__(self, observer: Any) -> None:
        self.observer = observer

    def start(self, total: int) -> None:
        if self.observer is not None:
            self.observer.start(total)

    def step(self, loss: float) -> None:
        if self.observer is not None:
            self.observer.step(loss)


@dataclass(frozen=True, kw_only=True)
class ExampleAuditSettings:
    """How the example-level audit runs (``None``: from the run's config, see the module doc).

    Attributes:
        canaries: ``m`` canary sequences; ``canary_length``: tokens each.
        noise_multiplier, max_grad_norm, batch_size, steps, lr: DP-SGD's σ, C, expected batch, logical
            steps and Adam's learning rate.
        confidence, guesses: of the bound (:func:`~audits.dp.bound.audit_scores`).
        breaks, noise_divisor: :mod:`audits.dp.breaks` (testing only).
        max_physical_batch_size: Opacus micro-batch size (memory).
    """

    canaries: int = 200
    canary_length: int = 16
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    batch_size: int | None = None
    steps: int | None = None
    lr: float | None = None
    confidence: float = DEFAULT_CONFIDENCE
    guesses: int | None = None
    breaks: Break | None = None
    noise_divisor: float = DEFAULT_NOISE_DIVISOR
    max_physical_batch_size: int = 64

    def __post_init__(self) -> None:
        check_int("canaries", self.canaries, low=2)
        check_int("canary_length", self.canary_length, low=2)
        for name in ("noise_multiplier", "max_grad_norm", "lr"):
            value = getattr(self, name)
            if value is not None:
                check_number(name, value, low=0.0, low_open=True)
        for name in ("batch_size", "steps"):
            value = getattr(self, name)
            if value is not None:
                check_int(name, value, low=1)
        check_number("confidence", self.confidence, low=0.0, high=1.0, low_open=True, high_open=True)
        if self.guesses is not None:
            check_int("guesses", self.guesses, low=1, high=self.canaries)
        check_break(self.breaks)
        check_number("noise_divisor", self.noise_divisor, low=1.0, low_open=True)
        check_int("max_physical_batch_size", self.max_physical_batch_size, low=1)


def canary_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, chunk: int = 64) -> np.ndarray:
    """Each sequence's mean next-token cross-entropy under ``model`` (labels −100 ignored), float64."""
    out = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, int(batch["input_ids"].shape[0]), chunk):
            ids = batch["input_ids"][s:s + chunk]
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"][s:s + chunk]).logits[:, :-1].float()
            labels = batch["labels"][s:s + chunk, 1:]
            tok = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                    ignore_index=-100, reduction="none").view(labels.shape)
            mask = (labels != -100).to(tok.dtype)
            out.append(((tok * mask).sum(1) / mask.sum(1).clamp(min=1)).double().numpy())
    model.train(was_training)
    return np.concatenate(out)


def _client_zero(config: TrainConfig) -> tuple[torch.nn.Module, Any, list[dict[str, list[int]]]]:
    """Client 0's model with its adapter, the tokenizer and client 0's tokenised items, as FedHomoLLM builds them."""
    from fedguard_train.data import load_examples, partition, tokenize, train_test_split
    from fedguard_train.models import attach_adapter, family_of, load_base_model
    from fedguard_train.trainers.base import seed_of

    base, tokenizer = load_base_model(config.model, seed=config.seed)
    family = family_of(base, config.model.family)
    torch.manual_seed(seed_of(config.seed, "adapter-init"))
    model = attach_adapter(base, family, config.adapter)
    examples = load_examples(config.data, seed=config.seed)
    train, _ = train_test_split(examples, config.data.test_size, seed=config.seed)
    parts = partition(train, config.federation.clients, config.data.partition, alpha=config.data.dirichlet_alpha,
                      seed=config.seed)
    return model, tokenizer, tokenize(parts[0], tokenizer, config.data)


def _canary_vocabulary(tokenizer: Any) -> list[int]:
    """Ordinary tokens (no special tokens) to draw canaries from."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return [i for i in range(len(tokenizer)) if i not in special]


def audit_example_level(config: TrainConfig, settings: ExampleAuditSettings, *, rng: SecureRNG | None = None,
                        noise_rng: SecureRNG | None = None, progress: Any = None) -> DPAuditResult:
    """Train client 0 once with DP-SGD and canary examples; bound ε from below (module doc).

    ``rng``: canaries, membership and Poisson batches; ``noise_rng``: the DP noise (both default to OS
    entropy; tests seed them to be repeatable).
    ``progress``: an observer with ``start(total)`` / ``step(loss)`` (e.g. the CLI's progress bar)."""
    from fedguard.dp import DPSGDConfig, PrivacyAccountant, PrivateAdapterTrainer, poisson_batches
    from fedguard_train.data import collate

    start = time.perf_counter()
    dp = config.dp
    if dp is None:
        raise ConfigError("the config has no dp: section: the example-level audit reads sigma, C and delta from it")
    sigma = float(settings.noise_multiplier if settings.noise_multiplier is not None else dp.noise_multiplier)
    clip = float(settings.max_grad_norm if settings.max_grad_norm is not None else dp.clip_norm)
    steps = settings.steps if settings.steps is not None else config.federation.rounds * config.training.local_steps
    lr = float(settings.lr if settings.lr is not None else config.training.lr)
    if sigma <= 0 or not math.isfinite(clip):
        raise ConfigError("the example-level audit needs noise_multiplier > 0 and a finite clip norm")
    rng = rng if rng is not None else SecureRNG()
    model, tokenizer, items = _client_zero(config)
    included = draw_membership(settings.canaries, rng.spawn("membership"))
    tokens = random_token_sequences(settings.canaries, settings.canary_length, _canary_vocabulary(tokenizer),
                                    rng.spawn("tokens"))
    canary_items = [{"input_ids": t.tolist(), "labels": t.tolist()} for t in tokens]
    data = collate(items + [canary_items[i] for i in np.flatnonzero(included)], tokenizer.pad_token_id)
    canary_batch = collate(canary_items, tokenizer.pad_token_id)
    n = int(data["input_ids"].shape[0])
    batch = settings.batch_size if settings.batch_size is not None else config.training.batch_size
    rate = min(1.0, batch / n)
    notes = [f"{settings.canaries} canary sequences of {settings.canary_length} random tokens "
             f"({int(included.sum())} included) beside client 0's {len(items)} examples",
             f"DP-SGD: sigma={sigma:g}, C={clip:g}, q={rate:.4g} (expected batch {batch}), {steps} steps, Adam lr {lr:g}; "
             "client 0's local training outside the round loop (the trainer has no DP-SGD option yet)"]
    honest = DPSGDConfig(noise_multiplier=sigma, max_grad_norm=clip, sampling_rate=rate, dataset_size=n,
                         max_physical_batch_size=settings.max_physical_batch_size)
    run_cfg = honest
    if settings.breaks == "noise":
        run_cfg = replace(honest, noise_multiplier=sigma / settings.noise_divisor)
        notes.append(f"BROKEN on purpose (--break noise): noise divided by {settings.noise_divisor:g}; the accountant "
                     "is unchanged")
    elif settings.breaks == "clip":
        run_cfg = replace(honest, noise_multiplier=sigma * clip / _CLIP_BREAK_NORM, max_grad_norm=_CLIP_BREAK_NORM)
        notes.append("BROKEN on purpose (--break clip): per-example gradients not clipped (noise still sigma*C); "
                     "the accountant is unchanged")
    accountant = PrivacyAccountant(target_delta=dp.target_delta, backend="pld", population=n)
    base_losses = canary_losses(model, canary_batch)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    trainer = PrivateAdapterTrainer(model, optimizer, run_cfg, rng=noise_rng if noise_rng is not None else SecureRNG())
    bar = _Progress(progress)
    bar.start(steps)
    sampler = rng.spawn("poisson")
    for idx in poisson_batches(n, rate, steps, sampler):
        accountant.spend(honest.step_event(), label="dp-sgd step (audited)")  # what the implementation claims
        index = torch.from_numpy(idx.astype(np.int64))
        result = trainer.step({k: v.index_select(0, index) for k, v in data.items()})
        bar.step(result.loss if math.isfinite(result.loss) else 0.0)
    model = trainer.unwrap()
    scores = base_losses - canary_losses(model, canary_batch)
    if not np.all(np.isfinite(scores)):
        raise ConfigError("DP-SGD diverged (non-finite canary losses): lower the learning rate")
    bound = audit_scores(scores, included, delta=dp.target_delta, confidence=settings.confidence,
                         guesses=settings.guesses)
    label = (f"DP-SGD (Opacus), sigma={sigma:g}, C={clip:g}, q={rate:.3g}, {steps} steps")
    return DPAuditResult(
        level="example", mechanism=label, bound=bound, epsilon_accountant=float(accountant.epsilon()),
        delta=dp.target_delta, scores=scores, included=included, breaks=settings.breaks,
        settings={"canaries": settings.canaries, "canary_length": settings.canary_length, "noise_multiplier": sigma,
                  "max_grad_norm": clip, "sampling_rate": rate, "steps": steps, "lr": lr, "dataset_size": n},
        notes=notes, seconds=time.perf_counter() - start)

