"""Watermark keys: secret material regenerated from a 256-bit seed, stored apart from the model.

A client's key is small: a 256-bit seed drawn from the operating system's CSPRNG
(:func:`fedguard.rng.random_seed`) plus the public description of *where* the watermark lives. Everything
secret and bulky is a deterministic function of the seed through :class:`fedguard.rng.SecureRNG`
(ChaCha20), so it is never stored densely:

* the signature bits ``b ∈ {±1}^N``                       (stream ``spawn("bits")``),
* the projection of target block ``i``, ``E_i ∈ R^{D_i×N_i}`` with i.i.d. ``N(0, 1/D_i)`` entries
                                                           (stream ``spawn("projection/i")``),
* for a re-parametrisation-invariant norm block, a unit direction ``r_i`` in the output space of the
  linear layer that reads the norm's output                (stream ``spawn("direction/i")``),
* for a backdoor key, the trigger token sequences and their target responses (``spawn("triggers")``).

This fixes three flaws of the reference implementation that the issue names: keys came from the global
torch RNG (so parties could collide), they were stored inside the model checkpoint, and a key could be
applied to any model without a check. Here the seed is 256 bits from ``os.urandom``, the key file is its
own JSON document written with mode ``0600`` (and refused inside a checkpoint directory), it carries a
format version and a SHA-256 checksum over its canonical content (a corrupt or edited file raises
:class:`CorruptKeyError`), and it names every target by module path and shape so that binding it to a
model with other targets raises :class:`~fedguard.errors.KeyMismatchError`.

A sign key's blocks (see :class:`TargetBlock`) are block-diagonal pieces of FedIPR's projection: block
``i`` carries ``N_i`` of the ``N`` bits and reads only its own parameters. That makes the projection
cheap (``Σ D_i N_i`` numbers instead of ``D·N``) and lets an audit report bit agreement per block.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from fedguard.errors import ConfigError, FedGuardError
from fedguard.files import atomic_write
from fedguard.rng import SEED_BYTES, SecureRNG

KEY_FORMAT: Final[str] = "fedguard-watermark-key"
KEY_VERSION: Final[int] = 1
_CHECKPOINT_MARKERS: Final[tuple[str, ...]] = (
    "config.json",
    "adapter_config.json",
    "model.safetensors",
    "adapter_model.safetensors",
    "pytorch_model.bin",
    "adapter_model.bin",
)

BlockKind = Literal["norm", "lora", "prompt"]
Mode = Literal["plain", "invariant", "gram"]
Reference = Literal["initial", "zero"]


class CorruptKeyError(FedGuardError, ValueError):
    """A key file cannot be trusted: not JSON, wrong format or version, missing fields, or its checksum
    does not match its content (truncated, edited, or bit-rotted)."""


@dataclass(frozen=True, slots=True)
class TargetBlock:
    """One block of parameters that carries ``bits`` of a sign watermark.

    Attributes:
        kind: ``"norm"`` (the scale of a LayerNorm/RMSNorm), ``"lora"`` (a LoRA layer's A and B) or
            ``"prompt"`` (a prefix / prompt-embedding parameter).
        module: module path in the *base* model (``transformer.h.0.ln_1``) for norm and LoRA blocks, so
            the same key works on a ``peft`` model and on the merged full model; the parameter's path on
            the ``peft`` model for prompt blocks.
        params: parameter names relative to ``module`` (``("weight",)``, or LoRA's A and B).
        shapes: the shape of each parameter in ``params``.
        consumer: for an invariant norm block, the module path of the linear layer that reads the norm's
            output; ``None`` otherwise.
        consumer_shape: that linear layer's weight shape.
        bits: how many signature bits this block carries.
        scale: ``s_i``, the RMS of the block's feature vector at key generation (1.0 when it was zero):
            the projection is normalised by it so that the margin ``gamma0`` is scale-free.
        offset: ``E_iᵀ φ_i(θ₀) / s_i`` for the reference model θ₀ (``reference="initial"``), or zeros.
    """

    kind: BlockKind
    module: str
    params: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    bits: int
    scale: float = 1.0
    offset: tuple[float, ...] = ()
    consumer: str | None = None
    consumer_shape: tuple[int, ...] | None = None
    directions: int = 1
    """For a gram block: how many secret directions ``u_1..u_m`` the Gram matrix is read along (the block's
    feature is ``vec(G [u_1 … u_m])``, ``m·D`` values; written to the key file only when > 1, so keys and
    commitments made before this field exist read and hash as they did)."""

    @property
    def feature_dim(self) -> int:
        """Length of the block's feature vector: ``D·m`` for a norm block, the parameter count otherwise."""
        if self.kind == "norm":
            return self.shapes[0][0] * self.directions
        return sum(int(np.prod(s)) for s in self.shapes)

    @property
    def label(self) -> str:
        return f"{self.module} ({self.kind})"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "module": self.module,
            "params": list(self.params),
            "shapes": [list(s) for s in self.shapes],
            "bits": self.bits,
            "scale": self.scale,
            "offset": list(self.offset),
            "consumer": self.consumer,
            "consumer_shape": list(self.consumer_shape) if self.consumer_shape is not None else None,
        } | ({"directions": self.directions} if self.directions != 1 else {})

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> TargetBlock:
        kind = raw["kind"]
        if kind not in ("norm", "lora", "prompt"):
            raise CorruptKeyError(f"unknown target block kind {kind!r}")
        cs = raw.get("consumer_shape")
        block = cls(
            kind=kind,
            module=str(raw["module"]),
            params=tuple(str(p) for p in raw["params"]),
            shapes=tuple(tuple(int(d) for d in s) for s in raw["shapes"]),
            bits=int(raw["bits"]),
            scale=float(raw["scale"]),
            offset=tuple(float(v) for v in raw["offset"]),
            consumer=None if raw.get("consumer") is None else str(raw["consumer"]),
            consumer_shape=None if cs is None else tuple(int(d) for d in cs),
            directions=int(raw.get("directions", 1)),
        )
        if block.directions < 1 or (block.directions > 1 and block.kind != "norm"):
            raise CorruptKeyError(f"target block {block.module!r}: directions={block.directions} (>= 1, norm blocks only)")
        if len(block.offset) != block.bits or block.bits < 1 or not block.scale > 0:
            raise CorruptKeyError(f"inconsistent target block {block.module!r}: bits={block.bits}, "
                                  f"{len(block.offset)} offsets, scale={block.scale}")
        return block


def _derive(seed: bytes, label: str) -> SecureRNG:
    return SecureRNG.from_seed(seed).spawn(f"fedguard/watermark/{label}")


def signature_bits(seed: bytes, n: int) -> np.ndarray:
    """The ``n`` secret signature bits ``b ∈ {±1}^n`` of a seed (int8)."""
    raw = np.frombuffer(_derive(seed, "bits").bytes((n + 7) // 8), dtype=np.uint8)
    bits = np.unpackbits(raw, bitorder="little")[:n]
    return (bits.astype(np.int8) * 2 - 1).astype(np.int8)


@functools.lru_cache(maxsize=256)
def projection_matrix(seed: bytes, index: int, rows: int, cols: int) -> np.ndarray:
    """``E_index ∈ R^{rows×cols}`` with i.i.d. ``N(0, 1/rows)`` entries (float64), so that each column has
    expected squared norm 1 and ``Eᵀφ`` keeps the scale of ``φ``'s RMS. (Read-only; recently used
    projections are cached in memory so that generating and then binding a key expands them once.)"""
    draws = _derive(seed, f"projection/{index}").normal(rows * cols, std=1.0 / np.sqrt(rows))
    out = draws.reshape(rows, cols)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=256)
def direction(seed: bytes, index: int, dim: int) -> np.ndarray:
    """A secret unit vector ``r_index ∈ R^dim`` (the reference direction of an invariant norm block)."""
    v = _derive(seed, f"direction/{index}").normal(dim)
    out = v / np.linalg.norm(v)
    out.flags.writeable = False
    return out


def directions(seed: bytes, index: int, dim: int, count: int) -> np.ndarray:
    """``count`` secret unit vectors of ``R^dim`` as the columns of a ``[dim, count]`` matrix; the first is
    :func:`direction` (so a one-direction block reads exactly as before), the others come from their own
    streams. (Read-only.)"""
    if count == 1:
        return direction(seed, index, dim)[:, None]
    cols = [direction(seed, index, dim)]
    for j in range(1, count):
        v = _derive(seed, f"direction/{index}/{j}").normal(dim)
        cols.append(v / np.linalg.norm(v))
    out = np.stack(cols, axis=1)
    out.flags.writeable = False
    return out


@dataclass(frozen=True, slots=True)
class SignKey:
    """A FedIPR sign-watermark key (see the module docstring for what the seed expands to).

    ``mode="invariant"`` extracts bits from features that function-preserving re-parametrisations cannot
    change (:mod:`fedguard.watermark.invariant`); ``reference="initial"`` measures signs relative to the
    starting model (``offset``), ``"zero"`` is FedIPR's original ``sign(Eᵀθ)``.
    """

    seed: bytes = field(repr=False)
    blocks: tuple[TargetBlock, ...]
    mode: Mode = "invariant"
    reference: Reference = "initial"
    gamma0: float = 1.0
    alpha: float = 3e-3
    owner: str = ""
    scheme: Literal["sign"] = "sign"

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.seed, bytes) or len(self.seed) != SEED_BYTES:
            problems.append(f"seed must be {SEED_BYTES} bytes")
        if not self.blocks:
            problems.append("a sign key needs at least one target block")
        if self.mode not in ("plain", "invariant", "gram"):
            problems.append(f"mode must be 'plain', 'invariant' or 'gram', got {self.mode!r}")
        if self.reference not in ("initial", "zero"):
            problems.append(f"reference must be 'initial' or 'zero', got {self.reference!r}")
        if not self.gamma0 > 0:
            problems.append(f"gamma0 must be > 0, got {self.gamma0}")
        if not self.alpha > 0:
            problems.append(f"alpha must be > 0, got {self.alpha}")
        if problems:
            raise ConfigError.collect(problems)

    @property
    def n_bits(self) -> int:
        return sum(b.bits for b in self.blocks)

    @property
    def key_id(self) -> str:
        """A public identifier: the first 16 hex digits of SHA-256 over a domain-separated seed hash."""
        return hashlib.sha256(b"fedguard/watermark/key-id/" + self.seed).hexdigest()[:16]

    def signature(self) -> np.ndarray:
        return signature_bits(self.seed, self.n_bits)

    def block_bit_slices(self) -> list[slice]:
        out, start = [], 0
        for b in self.blocks:
            out.append(slice(start, start + b.bits))
            start += b.bits
        return out

    def payload(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "seed": self.seed.hex(),
            "mode": self.mode,
            "reference": self.reference,
            "gamma0": self.gamma0,
            "alpha": self.alpha,
            "owner": self.owner,
            "blocks": [b.to_json() for b in self.blocks],
        }

    @classmethod
    def from_payload(cls, raw: Mapping[str, Any]) -> SignKey:
        return cls(
            seed=bytes.fromhex(raw["seed"]),
            blocks=tuple(TargetBlock.from_json(b) for b in raw["blocks"]),
            mode=raw["mode"],
            reference=raw["reference"],
            gamma0=float(raw["gamma0"]),
            alpha=float(raw["alpha"]),
            owner=str(raw.get("owner", "")),
        )

    def with_blocks(self, blocks: Sequence[TargetBlock]) -> SignKey:
        return replace(self, blocks=tuple(blocks))


@dataclass(frozen=True, slots=True)
class BackdoorKey:
    """A backdoor (trigger-set) watermark key for a causal LM.

    ``n_triggers`` trigger sequences of ``trigger_len`` tokens, each mapped to a response of
    ``response_len`` tokens, all drawn uniformly from the token ids ``[0, vocab_size)`` minus
    ``excluded`` (special tokens), regenerated from the seed.
    """

    seed: bytes = field(repr=False)
    vocab_size: int
    n_triggers: int = 16
    trigger_len: int = 8
    response_len: int = 4
    excluded: tuple[int, ...] = ()
    owner: str = ""
    scheme: Literal["backdoor"] = "backdoor"

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.seed, bytes) or len(self.seed) != SEED_BYTES:
            problems.append(f"seed must be {SEED_BYTES} bytes")
        for name in ("n_triggers", "trigger_len", "response_len"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size - len(set(self.excluded)) < 2:
            problems.append(f"vocab_size={self.vocab_size} leaves fewer than 2 usable token ids")
        if problems:
            raise ConfigError.collect(problems)

    @property
    def n_bits(self) -> int:
        return self.n_triggers

    @property
    def key_id(self) -> str:
        return hashlib.sha256(b"fedguard/watermark/key-id/" + self.seed).hexdigest()[:16]

    @property
    def alphabet(self) -> np.ndarray:
        excluded = set(self.excluded)
        return np.array([t for t in range(self.vocab_size) if t not in excluded], dtype=np.int64)

    def triggers_and_responses(self) -> tuple[np.ndarray, np.ndarray]:
        """``(triggers [n_triggers, trigger_len], responses [n_triggers, response_len])`` token ids."""
        alphabet = self.alphabet
        rng = _derive(self.seed, "triggers")
        idx = rng.integers_below(self.n_triggers * (self.trigger_len + self.response_len), len(alphabet))
        tokens = alphabet[idx.astype(np.int64)].reshape(self.n_triggers, self.trigger_len + self.response_len)
        return tokens[:, : self.trigger_len].copy(), tokens[:, self.trigger_len :].copy()

    def payload(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "seed": self.seed.hex(),
            "vocab_size": self.vocab_size,
            "n_triggers": self.n_triggers,
            "trigger_len": self.trigger_len,
            "response_len": self.response_len,
            "excluded": sorted(set(self.excluded)),
            "owner": self.owner,
        }

    @classmethod
    def from_payload(cls, raw: Mapping[str, Any]) -> BackdoorKey:
        return cls(
            seed=bytes.fromhex(raw["seed"]),
            vocab_size=int(raw["vocab_size"]),
            n_triggers=int(raw["n_triggers"]),
            trigger_len=int(raw["trigger_len"]),
            response_len=int(raw["response_len"]),
            excluded=tuple(int(t) for t in raw["excluded"]),
            owner=str(raw.get("owner", "")),
        )


WatermarkKey = SignKey | BackdoorKey


def _checksum(payload: Mapping[str, Any]) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def key_to_json(key: WatermarkKey) -> str:
    payload = key.payload()
    doc = {"format": KEY_FORMAT, "version": KEY_VERSION, "key": payload, "checksum": _checksum(payload)}
    return json.dumps(doc, indent=1)


def key_from_json(text: str, *, source: str = "<string>") -> WatermarkKey:
    """Parse a key document; raise :class:`CorruptKeyError` naming ``source`` and what is wrong."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptKeyError(f"key file {source} is not valid JSON: {err}") from err
    if not isinstance(doc, dict) or doc.get("format") != KEY_FORMAT:
        raise CorruptKeyError(f"key file {source} is not a {KEY_FORMAT} document")
    if doc.get("version") != KEY_VERSION:
        raise CorruptKeyError(f"key file {source} has version {doc.get('version')!r}; this fedguard reads "
                              f"version {KEY_VERSION}")
    payload = doc.get("key")
    if not isinstance(payload, dict):
        raise CorruptKeyError(f"key file {source} has no 'key' object")
    expected = _checksum(payload)
    if doc.get("checksum") != expected:
        raise CorruptKeyError(f"key file {source} is corrupt: checksum {str(doc.get('checksum'))[:16]}... does "
                              f"not match its content ({expected[:16]}...)")
    try:
        scheme = payload["scheme"]
        if scheme == "sign":
            return SignKey.from_payload(payload)
        if scheme == "backdoor":
            return BackdoorKey.from_payload(payload)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, FedGuardError):
            raise CorruptKeyError(f"key file {source}: {err}") from err
        raise CorruptKeyError(f"key file {source} is missing or has a malformed field: {err!r}") from err
    raise CorruptKeyError(f"key file {source} has unknown scheme {scheme!r}")


_WEIGHT_MARKERS: Final[tuple[str, ...]] = tuple(m for m in _CHECKPOINT_MARKERS if m != "config.json") + (
    "latest.json",  # the root of a fedguard run's checkpoints/ tree
)


def _looks_like_checkpoint(directory: Path) -> str | None:
    for marker in _CHECKPOINT_MARKERS:
        if (directory / marker).exists():
            return marker
    return None


def _ancestor_checkpoint(directory: Path) -> tuple[Path, str] | None:
    """The nearest strict ancestor of ``directory`` that is a model checkpoint (it holds weights, an
    adapter, a Hugging Face ``config.json`` with a ``model_type``, or a checkpoint tree's ``latest.json``);
    None when there is none. A run directory's own ``config.json`` (the run configuration) is no marker."""
    for parent in directory.parents:
        for marker in _WEIGHT_MARKERS:
            if (parent / marker).exists():
                return parent, marker
        cfg = parent / "config.json"
        if cfg.is_file():
            try:
                doc = json.loads(cfg.read_text())
            except (OSError, ValueError, UnicodeDecodeError):
                continue
            if isinstance(doc, dict) and "model_type" in doc:
                return parent, "config.json (a model configuration)"
    return None


def save_key(key: WatermarkKey, path: str | os.PathLike[str]) -> Path:
    """Write ``key`` to ``path`` atomically with mode ``0600``, never over an existing file.

    Refuses (``ConfigError``) a path anywhere inside a model checkpoint tree (its directory or any
    directory above it is a checkpoint, e.g. ``<checkpoint>/keys/k.key``): a secret key shipped with the
    model it protects proves nothing and leaks the watermark to everyone who gets the model. Refuses an
    existing file too: a key is a client's secret and is never replaced (remove it yourself first).
    """
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"cannot write key {target}: directory {parent} does not exist")
    marker = _looks_like_checkpoint(parent)
    if marker is not None:
        raise ConfigError(f"refusing to write a secret key into {parent}: it is a model checkpoint "
                          f"(it holds {marker}); store keys apart from models")
    above = _ancestor_checkpoint(parent.resolve())
    if above is not None:
        raise ConfigError(f"refusing to write a secret key under {above[0]}: it is a model checkpoint "
                          f"(it holds {above[1]}) and {target} is inside its tree; store keys apart from models")
    if target.exists() or target.is_symlink():
        raise ConfigError(f"refusing to overwrite {target}: it exists and keys are never replaced "
                          f"(move it away first)")
    return atomic_write(target, key_to_json(key), mode=0o600, overwrite=False)


def load_key(path: str | os.PathLike[str]) -> WatermarkKey:
    """Read a key file (see :func:`key_from_json`). A missing file is a ``ConfigError``."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError as err:
        raise ConfigError(f"key file {p} does not exist") from err
    except IsADirectoryError as err:
        raise ConfigError(f"key file {p} is a directory") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorruptKeyError(f"key file {p} is not UTF-8 text: {err}") from err
    return key_from_json(text, source=str(p))
