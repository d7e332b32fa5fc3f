"""Example-level DP-SGD (Abadi et al., CCS 2016) for the adapters of a ``peft`` model, through Opacus.

One *logical* step: Poisson-sample each of the client's ``N`` examples with probability ``q``; compute
every sampled example's gradient of the trainable adapter parameters (Opacus per-sample gradients:
``"hooks"``, ``"functorch"``, or ``"ghost"`` clipping, Li et al. 2022 / Bu et al. 2023, which computes
only per-sample *norms*); clip each to L2 norm ``C``; sum; add ``N(0, (σC)² I)``; divide by the expected
batch size ``qN``; take the optimizer step. Each logical step is the event
``PoissonSampled(q, Gaussian(σ))``, recorded with the :class:`~fedguard.dp.accountant.PrivacyAccountant`
*before* the update is applied (an over-budget step raises :class:`~fedguard.errors.BudgetExceededError`
and changes nothing).

Traps handled:

* **Gradient accumulation.** A logical batch larger than ``max_physical_batch_size`` is split into
  micro-batches whose clipped per-sample gradients are summed (Opacus' skip-step protocol); noise is
  added once per logical batch and one event is recorded per logical batch — never one per micro-batch,
  never a sampling rate that pretends micro-batches are the sample.
* **Empty Poisson batches** (probable when ``qN`` is small): no forward pass runs; the step still adds
  the noise ``N(0, (σC)²)/(qN)`` and is still accounted, as the analysis of Poisson sampling requires.
* **GPT-2 position ids.** GPT-2 builds ``position_ids`` of shape ``(1, T)``; a per-sample hook on a
  trainable position embedding would then see batch size 1. Batches for GPT-2 models get explicit
  ``(B, T)`` position ids (not with prefix tuning, whose virtual tokens shift the positions).
* **Noise source.** Opacus draws its noise from ``torch.normal`` (a Mersenne Twister unless
  ``secure_mode`` with torchcsprng); here the optimizer's ``add_noise`` draws from
  :class:`~fedguard.rng.SecureRNG` (ChaCha20 + Box–Muller, float64, cast to the parameter dtype).
  Floating-point caveat as in :mod:`fedguard.dp.client_level`.

Adapters: LoRA (``lora_A``/``lora_B`` are ``nn.Linear`` or GPT-2 ``Conv1D``-wrapped linears: supported by
every mode) and prefix tuning (the prefix ``nn.Embedding`` receives a ``(B, P)`` index tensor, so its
per-sample gradient is exact; hooks/functorch only). Any trainable parameter of a module type Opacus
cannot differentiate per sample raises :class:`~fedguard.dp.errors.UnsupportedModelError` naming it.

The loss of one example is the mean token cross-entropy over its label tokens (labels ``-100``
ignored); the batch loss is the mean over examples, matching Opacus' ``loss_reduction="mean"``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from fedguard.checks import int_problem, number_problem
from fedguard.dp.accountant import PrivacyAccountant, validate_delta
from fedguard.dp.calibration import check_sampling_rate
from fedguard.dp.errors import UnsupportedModelError
from fedguard.dp.events import Event, GaussianEvent, PoissonSampledEvent, _store_plain
from fedguard.errors import BudgetExceededError, ConfigError
from fedguard.rng import SecureRNG

GradSampleMode = Literal["hooks", "functorch", "ghost"]
_MODES = ("hooks", "functorch", "ghost")


@dataclass(frozen=True, kw_only=True, slots=True)
class DPSGDConfig:
    """Example-level DP-SGD settings.

    Attributes:
        noise_multiplier: ``σ`` > 0.
        max_grad_norm: per-example clip norm ``C`` > 0.
        sampling_rate: Poisson sampling probability ``q`` in (0, 1] of one *logical* batch.
        dataset_size: ``N``, the client's number of training examples (expected batch = ``qN``).
        max_physical_batch_size: micro-batch size for gradient accumulation (memory bound).
        grad_sample_mode: ``"hooks"``, ``"functorch"`` or ``"ghost"`` (ghost clipping: LoRA only).
    """

    noise_multiplier: float
    max_grad_norm: float
    sampling_rate: float
    dataset_size: int
    max_physical_batch_size: int = 16
    grad_sample_mode: GradSampleMode = "hooks"

    def __post_init__(self) -> None:
        p = [q for q in (
            number_problem("noise_multiplier", self.noise_multiplier, low=0, low_open=True),
            number_problem("max_grad_norm", self.max_grad_norm, low=0, low_open=True),
        ) if q]
        try:
            check_sampling_rate(self.sampling_rate)
        except ConfigError as err:
            p.extend(err.problems)
        p.extend(q for q in (
            int_problem("dataset_size", self.dataset_size, low=1),
            int_problem("max_physical_batch_size", self.max_physical_batch_size, low=1),
        ) if q)
        if self.grad_sample_mode not in _MODES:
            p.append(f"grad_sample_mode must be one of {list(_MODES)}, got {self.grad_sample_mode!r}")
        if p:
            raise ConfigError.collect(p)
        _store_plain(self, "noise_multiplier", "max_grad_norm", "sampling_rate", "dataset_size", "max_physical_batch_size")

    @property
    def expected_batch_size(self) -> float:
        return self.sampling_rate * self.dataset_size

    def step_event(self) -> Event:
        g = GaussianEvent(self.noise_multiplier)
        return g if self.sampling_rate == 1 else PoissonSampledEvent(self.sampling_rate, g)


def poisson_batches(dataset_size: int, sampling_rate: float, steps: int, rng: SecureRNG) -> Iterator[np.ndarray]:
    """``steps`` Poisson samples of ``range(dataset_size)`` (each index kept with probability ``q``)."""
    check_sampling_rate(sampling_rate)
    for _ in range(steps):
        yield np.flatnonzero(rng.uniform01(dataset_size) < sampling_rate)


@dataclass(frozen=True, slots=True)
class StepResult:
    """One logical DP-SGD step: batch size, micro-batches, mean loss (nan if empty), wall time."""

    batch_size: int
    micro_batches: int
    loss: float
    seconds: float


def _secure_noise_mixin(base: type) -> type:
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class _SecureNoise(base):
        fedguard_rng: SecureRNG

        def add_noise(self) -> None:
            params = list(self.params)
            for p in params:
                _check_processed_flag(p.summed_grad)
            std = float(self.noise_multiplier * self.max_grad_norm)
            total = sum(p.summed_grad.numel() for p in params)
            flat = torch.from_numpy(self.fedguard_rng.normal(total, std=std))
            offset = 0
            for p in params:
                n = p.summed_grad.numel()
                noise = flat[offset : offset + n].view_as(p.summed_grad).to(p.summed_grad)
                offset += n
                p.grad = (p.summed_grad + noise).view_as(p)
                _mark_as_processed(p.summed_grad)

    _SecureNoise.__name__ = f"SecureNoise{base.__name__}"
    return _SecureNoise


def _is_gpt2(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    base = getattr(model, "base_model", None)
    config = config or getattr(base, "config", None)
    return getattr(config, "model_type", None) == "gpt2"


def _peft_type(model: torch.nn.Module) -> str | None:
    cfg = getattr(model, "peft_config", None)
    if not cfg:
        return None
    first = next(iter(cfg.values()))
    kind = getattr(first, "peft_type", None)
    return str(getattr(kind, "value", kind))


class PrivateAdapterTrainer:
    """Wraps a (peft) causal LM and its optimizer for example-level DP-SGD on the trainable parameters.

    Args:
        model: the model; only parameters with ``requires_grad`` are trained (the adapters).
        optimizer: a torch optimizer over those parameters (its state is kept).
        config: the :class:`DPSGDConfig`.
        accountant: records one event per logical step and enforces the budget (``None``: no accounting).
        rng: noise source (default: OS-seeded :class:`SecureRNG`).

    Use :meth:`step` with a logical batch (a mapping with ``input_ids``, optional ``attention_mask``,
    ``labels``; all tensors of batch dimension ``B >= 0``), or :meth:`train` over a dataset with Poisson
    batches.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        config: DPSGDConfig,
        *,
        accountant: PrivacyAccountant | None = None,
        rng: SecureRNG | None = None,
    ) -> None:
        if not isinstance(config, DPSGDConfig):
            raise ConfigError(f"config must be a DPSGDConfig, got {type(config).__name__}")
        if accountant is not None:
            validate_delta(accountant.target_delta, config.dataset_size, name="accountant.target_delta")
            accountant.check_supported(config.step_event())
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise UnsupportedModelError("the model has no trainable parameters (did you attach an adapter?)")
        self.peft_type = _peft_type(model)
        if config.grad_sample_mode == "ghost" and self.peft_type not in (None, "LORA"):
            raise UnsupportedModelError(
                f"grad_sample_mode='ghost' supports LoRA adapters only, got peft type {self.peft_type!r}; "
                "use grad_sample_mode='hooks'"
            )
        self._check_supported_modules(model, config.grad_sample_mode)
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

        self.config = config
        self.accountant = accountant
        self.model = model
        self._rng = rng if rng is not None else SecureRNG()
        self._gpt2 = _is_gpt2(model) and self.peft_type != "PREFIX_TUNING"
        mode = config.grad_sample_mode
        if mode == "ghost":
            from opacus.grad_sample import GradSampleModuleFastGradientClipping
            from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

            self.module = GradSampleModuleFastGradientClipping(
                model, batch_first=True, loss_reduction="mean", max_grad_norm=config.max_grad_norm,
                use_ghost_clipping=True,
            )
            cls = _secure_noise_mixin(DPOptimizerFastGradientClipping)
        else:
            from opacus import GradSampleModule

            self.module = GradSampleModule(
                model, batch_first=True, loss_reduction="mean", force_functorch=(mode == "functorch")
            )
            cls = _secure_noise_mixin(DPOptimizer)
        self.optimizer = cls(
            optimizer,
            noise_multiplier=config.noise_multiplier,
            max_grad_norm=config.max_grad_norm,
            expected_batch_size=config.expected_batch_size,
            loss_reduction="mean",
        )
        self.optimizer.fedguard_rng = self._rng
        self._ghost_loss = (
            DPLossFastGradientClipping(
                self.module, self.optimizer, torch.nn.CrossEntropyLoss(reduction="mean"), "mean"
            )
            if mode == "ghost"
            else None
        )
        self.steps_taken = 0

    @staticmethod
    def _check_supported_modules(model: torch.nn.Module, mode: str) -> None:
        from opacus.grad_sample import GradSampleModule

        supported = set(GradSampleModule.GRAD_SAMPLERS)
        for name, module in model.named_modules():
            own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if type(module) in supported or mode == "functorch":
                continue
            raise UnsupportedModelError(
                f"trainable parameter {name}.{own[0]} belongs to {type(module).__name__}, which Opacus cannot "
                f"differentiate per example in mode {mode!r}; freeze it or use grad_sample_mode='functorch'"
            )

    # -- one logical step ----------------------------------------------------------------------------
    def _prepare(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "input_ids" not in batch:
            raise ConfigError(f"batch needs 'input_ids', got keys {sorted(batch)}")
        out = dict(batch)
        if "labels" not in out:
            out["labels"] = out["input_ids"]
        ids = out["input_ids"]
        if self._gpt2 and "position_ids" not in out:
            b, t = ids.shape
            out["position_ids"] = torch.arange(t, device=ids.device).unsqueeze(0).expand(b, t).contiguous()
        return out

    @staticmethod
    def _per_example_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over examples of each example's mean next-token cross-entropy (labels -100 ignored)."""
        shift_logits = logits[:, :-1, :].float()
        shift_labels = labels[:, 1:]
        tok = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
        ).view(shift_labels.shape)
        mask = (shift_labels != -100).to(tok.dtype)
        per_example = (tok * mask).sum(1) / mask.sum(1).clamp(min=1)
        return per_example.mean()

    def _forward_backward(self, micro: dict[str, torch.Tensor]) -> float:
        labels = micro.pop("labels")
        out = self.module(**micro)
        if self._ghost_loss is not None:
            logits = out.logits[:, :-1, :]
            shift_labels = labels[:, 1:].contiguous()
            b, t, v = logits.shape
            loss = self._ghost_loss(logits.reshape(-1, v), shift_labels.reshape(-1), shape=(b, t, v))
            loss.backward()
            return float(loss.detach())
        loss = self._per_example_token_loss(out.logits, labels)
        loss.backward()
        return float(loss.detach())

    def step(self, batch: Mapping[str, torch.Tensor]) -> StepResult:
        """One logical DP-SGD step on a Poisson-sampled batch (``B = 0`` allowed: noise-only step)."""
        start = time.perf_counter()
        event = self.config.step_event()
        if self.accountant is not None and self.accountant.epsilon_budget is not None:
            self.accountant.affordable(event)  # searched once, then cached: per-step checks are O(1)
        if self.accountant is not None and self.accountant.would_exceed(event):
            raise BudgetExceededError(
                f"DP-SGD step {self.steps_taken + 1} would raise epsilon from {self.accountant.epsilon():.4g} to "
                f"{self.accountant.epsilon_if(event):.4g} at delta={self.accountant.target_delta:g}, over the budget "
                f"{self.accountant.epsilon_budget:g}; the model is unchanged"
            )
        prepared = self._prepare(batch)
        size = int(prepared["input_ids"].shape[0])
        self.module.train()
        losses: list[float] = []
        micro_count = 0
        if size == 0:
            self._noise_only_step()
        else:
            chunk = self.config.max_physical_batch_size
            starts = list(range(0, size, chunk))
            for i, s in enumerate(starts):
                micro = {k: v[s : s + chunk] for k, v in prepared.items()}
                losses.append(self._forward_backward(micro) * micro["input_ids"].shape[0])
                last = i == len(starts) - 1
                if not last:
                    self.optimizer.signal_skip_step(do_skip=True)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                micro_count += 1
            if self.accountant is not None:  # record before the release (the parameter update)
                self.accountant.spend(event, label="dp-sgd step")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.steps_taken += 1
        loss = sum(losses) / size if size else math.nan
        return StepResult(size, micro_count, loss, time.perf_counter() - start)

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far according to the accountant (``nan`` without one)."""
        return math.nan if self.accountant is None else self.accountant.epsilon(delta)

    def _noise_only_step(self) -> None:
        if self.accountant is not None:
            self.accountant.spend(self.config.step_event(), label="dp-sgd step")
        params = [p for p in self.optimizer.params]
        std = self.config.noise_multiplier * self.config.max_grad_norm
        total = sum(p.numel() for p in params)
        flat = torch.from_numpy(self._rng.normal(total, std=std))
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = (flat[offset : offset + n].view_as(p).to(p) / self.config.expected_batch_size)
            offset += n
        self.optimizer.original_optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train(self, dataset: Mapping[str, torch.Tensor], steps: int) -> list[StepResult]:
        """``steps`` logical steps with Poisson batches drawn by this trainer's :class:`SecureRNG` from a
        dataset given as equal-length tensors (``input_ids`` etc., first dimension ``dataset_size``)."""
        n = int(dataset["input_ids"].shape[0])
        if n != self.config.dataset_size:
            raise ConfigError(f"dataset has {n} examples, config.dataset_size is {self.config.dataset_size}")
        results = []
        sampler = self._rng.spawn(f"poisson/{self.steps_taken}")
        for idx in poisson_batches(n, self.config.sampling_rate, steps, sampler):
            index = torch.from_numpy(idx.astype(np.int64))
            results.append(self.step({k: v.index_select(0, index) for k, v in dataset.items()}))
        return results

    def unwrap(self) -> torch.nn.Module:
        """The original model (hooks removed)."""
        module: Any = self.module
        if hasattr(module, "_close"):
            module._close()
        return self.model
