"""Offsite-tuning emulators: the compressed model a server lends to clients instead of its LLM.

Offsite-Tuning (Xiao, Lin, Han 2023, arXiv 2302.04870) and FedOST (FATE-LLM §3.1, Figure 3(d)) split a
decoder of ``L`` blocks ``f = f_{L-1} ∘ … ∘ f_0`` into

* the **adapter**: the first ``a`` and last ``b`` blocks (defaults 2 and 2), which clients train, and
* the **middle** ``f_{L-b-1} ∘ … ∘ f_a``, which the server replaces by an **emulator**: a uniform layer
  drop that keeps ``k = M − round(drop·M)`` of the ``M = L − a − b`` middle blocks at evenly spaced
  positions (``numpy.linspace`` over the middle, rounded).

The emulator model sent to a client is built *from scratch* with ``a + k + b`` blocks and only the
kept blocks' weights (plus embeddings, final norm and head) copied in: no object on the client side
ever holds a dropped block. Optionally the kept middle is **distilled** on public text the server owns:
with ``h_a`` the hidden state entering block ``a`` and ``h_{L-b}`` the full middle's output, the emulated
middle ``g`` minimises the normalised MSE

    NMSE = ‖g(h_a) − h_{L-b}‖² / ‖h_{L-b}‖²      (per sequence, averaged),

one pass over the public text (Offsite-Tuning §3.2 distils the same way, on the Pile). The distilled
blocks are cached on disk under ``$FEDGUARD_CACHE/emulators/`` keyed by the source weights, recipe,
distillation settings and text.

After training, :func:`plug` copies the adapter blocks back into the full model (the "plug-in").
A checkpoint stores the adapter blocks and the :class:`EmulatorRecipe` (never the emulator's weights):
:func:`load_plugged_model` rebuilds the plugged full model from them on the server.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedguard.errors import ConfigError
from fedguard_train.config import ModelConfig
from fedguard_train.models import (
    FAMILIES,
    ModelFamily,
    byte_tokenizer,
    cache_root,
    family_of,
    load_base_model,
)

PUBLIC_CORPUS_DIR = Path("/usr/share/common-licenses")
"""Debian ``base-files``' licence texts: the default public text of distillation (see docs/data.md)."""

# where each family keeps its decoder blocks (an ``nn.ModuleList``)
BLOCK_PATHS: dict[str, str] = {
    "gpt2": "transformer.h",
    "bloom": "transformer.h",
    "llama": "model.layers",
    "qwen2": "model.layers",
    "glm": "model.layers",
    "opt": "model.decoder.layers",
}

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def block_path(family: ModelFamily) -> str:
    if family.name not in BLOCK_PATHS:
        raise ConfigError(f"offsite-tuning does not know where a {family.name} model keeps its decoder blocks")
    return BLOCK_PATHS[family.name]


def decoder_blocks(model: torch.nn.Module, family: ModelFamily) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM of ``family`` (``model.layers``, ``transformer.h``, ...)."""
    module: Any = model
    for part in block_path(family).split("."):
        module = getattr(module, part, None)
        if module is None:
            raise ConfigError(f"a {family.name} model has no {block_path(family)!r}")
    if not isinstance(module, torch.nn.ModuleList):
        raise ConfigError(f"{block_path(family)!r} of a {family.name} model is not a ModuleList")
    return module


def _block_index(name: str, prefix: str) -> tuple[int, str] | None:
    """``(i, rest)`` of a parameter name ``<prefix>.<i>.<rest>``, else None."""
    match = re.fullmatch(re.escape(prefix) + r"\.(\d+)\.(.+)", name)
    return (int(match.group(1)), match.group(2)) if match else None


@dataclass(frozen=True)
class EmulatorRecipe:
    """How an emulator was made from a full model of ``n_layers`` blocks.

    ``kept``: original block indices of the emulator's blocks in order (adapter bottom, kept middle,
    adapter top). ``fingerprint``: SHA-256 of the full model's weights. ``distill``: the distillation
    settings and its final NMSE, or None (layer drop only)."""

    family: str
    n_layers: int
    bottom: int
    top: int
    drop: float
    kept: tuple[int, ...]
    fingerprint: str
    distill: dict[str, Any] | None = None

    @property
    def adapter_blocks(self) -> tuple[int, ...]:
        """Original indices of the adapter blocks."""
        return tuple(range(self.bottom)) + tuple(range(self.n_layers - self.top, self.n_layers))

    @property
    def dropped(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layers) if i not in self.kept)

    def emulator_index(self, original: int) -> int:
        return self.kept.index(original)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["kept"] = list(self.kept)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> EmulatorRecipe:
        try:
            return cls(family=str(raw["family"]), n_layers=int(raw["n_layers"]), bottom=int(raw["bottom"]),
                       top=int(raw["top"]), drop=float(raw["drop"]), kept=tuple(int(i) for i in raw["kept"]),
                       fingerprint=str(raw["fingerprint"]), distill=raw.get("distill"))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"not an emulator recipe: {err}") from err


def plan_blocks(n_layers: int, bottom: int, top: int, drop: float) -> tuple[int, ...]:
    """Original indices kept: ``0..a-1``, ``k`` evenly spaced middle blocks, ``L-b..L-1``.

    :class:`ConfigError` when the adapter leaves no middle to emulate or ``drop`` is outside [0, 1)."""
    problems = []
    if bottom < 0 or top < 0 or bottom + top < 1:
        problems.append(f"ost.bottom and ost.top must be >= 0 with at least one adapter block, got {bottom} and {top}")
    if not 0 <= drop < 1:
        problems.append(f"ost.drop must be in [0, 1), got {drop}")
    if bottom + top >= n_layers:
        problems.append(f"the adapter (ost.bottom={bottom} + ost.top={top} blocks) leaves no middle to emulate in a "
                        f"model of {n_layers} blocks")
    if problems:
        raise ConfigError.collect(problems)
    middle = list(range(bottom, n_layers - top))
    keep = max(1, len(middle) - int(np.floor(drop * len(middle) + 0.5)))  # half rounds up
    positions = np.unique(np.linspace(0, len(middle) - 1, keep).round().astype(int)) if keep > 1 else [len(middle) // 2]
    return tuple(range(bottom)) + tuple(middle[int(p)] for p in positions) + tuple(range(n_layers - top, n_layers))


def fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the model's named tensors (names, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def make_recipe(full: torch.nn.Module, family: ModelFamily, *, bottom: int, top: int, drop: float) -> EmulatorRecipe:
    n_layers = len(decoder_blocks(full, family))
    return EmulatorRecipe(family.name, n_layers, bottom, top, float(drop), plan_blocks(n_layers, bottom, top, drop),
                          fingerprint(full))


def _sub_config(config: Any, kept: Sequence[int]) -> Any:
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = len(kept)  # gpt2/bloom map it to n_layer
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == config.num_hidden_layers:
        cfg.layer_types = [layer_types[i] for i in kept]
    return cfg


def build_emulator(full: torch.nn.Module, recipe: EmulatorRecipe) -> torch.nn.Module:
    """A new model of ``len(recipe.kept)`` blocks holding copies of the kept blocks and the shared
    embeddings/norm/head of ``full`` — and nothing of a dropped block (its tensors are never copied).
    All parameters are frozen; the caller marks the adapter trainable (:func:`mark_adapter`)."""
    from transformers import AutoModelForCausalLM

    family = FAMILIES[recipe.family]
    prefix = block_path(family)
    if len(decoder_blocks(full, family)) != recipe.n_layers:
        raise ConfigError(f"the recipe is for a model of {recipe.n_layers} blocks, this one has "
                          f"{len(decoder_blocks(full, family))}")
    dtype = next(full.parameters()).dtype
    emulator = AutoModelForCausalLM.from_config(_sub_config(full.config, recipe.kept)).to(dtype)
    new_index = {orig: i for i, orig in enumerate(recipe.kept)}
    state: dict[str, torch.Tensor] = {}
    for name, tensor in full.state_dict().items():
        parsed = _block_index(name, prefix)
        if parsed is None:
            state[name] = tensor.detach().clone()
        elif parsed[0] in new_index:
            state[f"{prefix}.{new_index[parsed[0]]}.{parsed[1]}"] = tensor.detach().clone()
    emulator.load_state_dict(state, strict=True)
    emulator.requires_grad_(False)
    emulator.eval()
    return emulator


def mark_adapter(emulator: torch.nn.Module, recipe: EmulatorRecipe) -> list[str]:
    """Make the adapter blocks (and only them) trainable; returns their parameter names."""
    family = FAMILIES[recipe.family]
    blocks = decoder_blocks(emulator, family)
    emulator.requires_grad_(False)
    for original in recipe.adapter_blocks:
        blocks[recipe.emulator_index(original)].requires_grad_(True)
    return [n for n, p in emulator.named_parameters() if p.requires_grad]


def adapter_state(emulator: torch.nn.Module, recipe: EmulatorRecipe) -> dict[str, torch.Tensor]:
    """The adapter blocks' tensors of ``emulator`` under the FULL model's names."""
    family = FAMILIES[recipe.family]
    prefix = block_path(family)
    adapter = set(recipe.adapter_blocks)
    out = {}
    for name, tensor in emulator.state_dict().items():
        parsed = _block_index(name, prefix)
        if parsed is not None and recipe.kept[parsed[0]] in adapter:
            out[f"{prefix}.{recipe.kept[parsed[0]]}.{parsed[1]}"] = tensor.detach().clone()
    return out


def load_adapter_state(full: torch.nn.Module, recipe: EmulatorRecipe, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors (full-model names, :func:`adapter_state`) into ``full`` in place; every adapter
    tensor must be present and nothing else."""
    family = FAMILIES[recipe.family]
    prefix = block_path(family)
    adapter = set(recipe.adapter_blocks)
    own = full.state_dict()
    expected = {n for n in own if (p := _block_index(n, prefix)) is not None and p[0] in adapter}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise ConfigError(f"adapter tensors do not match the recipe's adapter blocks (missing {missing}, "
                          f"unexpected {extra})")
    with torch.no_grad():
        for name, tensor in state.items():
            if own[name].shape != tensor.shape:
                raise ConfigError(f"adapter tensor {name} has shape {tuple(tensor.shape)}, the model's is "
                                  f"{tuple(own[name].shape)}")
            own[name].copy_(tensor)


def plug(full: torch.nn.Module, emulator: torch.nn.Module, recipe: EmulatorRecipe) -> None:
    """The plug-in: the emulator's (trained) adapter blocks replace the full model's."""
    load_adapter_state(full, recipe, adapter_state(emulator, recipe))


def payload(emulator: torch.nn.Module) -> bytes:
    """What the server sends a client once: the emulator's unique tensors (tied weights once) as a
    safetensors file, plus its config as JSON metadata."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in emulator.state_dict().items():  # tied weights (one storage) travel once
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            tensors[name] = tensor.detach().contiguous()
    config: Any = emulator.config
    return save(tensors, metadata={"config": config.to_json_string()})


def emulator_from_payload(data: bytes) -> torch.nn.Module:
    """The client's side of :func:`payload`: an emulator model rebuilt from the bytes alone."""
    from safetensors.torch import load
    from transformers import AutoConfig, AutoModelForCausalLM

    tensors = load(data)
    header_len = int.from_bytes(data[:8], "little")  # safetensors: u64 header size, then the JSON header
    meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    raw = json.loads(meta["config"])
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {n for n in missing if n.endswith(("lm_head.weight", "embed_out.weight"))}
    if set(missing) - tied or unexpected:
        raise ConfigError(f"emulator payload does not fit its config (missing {missing}, unexpected {unexpected})")
    model.requires_grad_(False)
    model.eval()
    return model


# -- public text and distillation ----------------------------------------------------------------------------
def public_texts(source: str = "common-licenses") -> list[str]:
    """The server's public text: ``common-licenses`` (Debian base-files' licence texts, verbatim copying
    permitted) or a path to a ``.txt`` file or a directory of them."""
    path = PUBLIC_CORPUS_DIR if source == "common-licenses" else Path(source)
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.is_symlink()) if path.is_dir() else [path]
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(errors="replace"))
        except OSError as err:
            raise ConfigError(f"public text {str(file)!r} cannot be read: {err.strerror or err}") from err
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ConfigError(f"public text source {source!r} holds no text")
    return texts


def token_ids(texts: Sequence[str], tokenizer: Any, max_tokens: int) -> list[int]:
    """The concatenated texts' token ids (no special tokens), at most ``max_tokens``; tokenises no more
    texts than it needs."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens]


def windows(ids: Sequence[int], seq_len: int) -> list[list[int]]:
    """Consecutive, non-overlapping ``seq_len``-token windows of ``ids`` (a shorter tail is dropped)."""
    return [list(ids[i : i + seq_len]) for i in range(0, len(ids) - seq_len + 1, seq_len)]


def text_chunks(texts: Sequence[str], tokenizer: Any, seq_len: int, max_tokens: int) -> list[list[int]]:
    """Consecutive ``seq_len``-token windows of the concatenated texts, at most ``max_tokens`` in all."""
    return windows(token_ids(texts, tokenizer, max_tokens), seq_len)


def nmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of ``‖pred − target‖² / ‖target‖²`` (Offsite-Tuning's distillation loss)."""
    dims = tuple(range(1, pred.dim()))
    return (((pred - target) ** 2).sum(dim=dims) / (target**2).sum(dim=dims).clamp_min(1e-12)).mean()


def _middle_io(model: torch.nn.Module, ids: torch.Tensor, bottom: int, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states entering the middle (after ``bottom`` blocks) and leaving it (before the top ``top``)."""
    out = model(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states
    return hs[bottom], hs[len(hs) - 1 - top]


def distill(full: torch.nn.Module, emulator: torch.nn.Module, recipe: EmulatorRecipe, chunks: Sequence[list[int]], *,
            batch_size: int, lr: float, seed: int, progress: bool = True) -> float:
    """One epoch of NMSE distillation of the emulator's middle blocks towards the full middle's output
    (the adapter blocks are identical in both and stay frozen). Returns the mean NMSE of the last 10%
    of batches."""
    from tqdm import tqdm

    if not chunks:
        raise ConfigError("the public text is shorter than one distillation window (ost.distill_seq_len)")
    family = FAMILIES[recipe.family]
    blocks = decoder_blocks(emulator, family)
    emulator.requires_grad_(False)
    middle = [blocks[i] for i in range(recipe.bottom, len(recipe.kept) - recipe.top)]
    for block in middle:
        block.requires_grad_(True)
    params = [p for block in middle for p in block.parameters()]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed)).tolist()
    full.eval()
    emulator.train()
    losses: list[float] = []
    bar = tqdm(range(0, len(order), batch_size), desc="distilling emulator", unit="batch", disable=not progress,
               leave=False)
    for start in bar:
        ids = torch.tensor([chunks[i] for i in order[start : start + batch_size]])
        with torch.no_grad():
            _, target = _middle_io(full, ids, recipe.bottom, recipe.top)
        _, pred = _middle_io(emulator, ids, recipe.bottom, recipe.top)
        loss = nmse(pred.float(), target.float())
        if not bool(torch.isfinite(loss)):
            raise ConfigError(f"emulator distillation diverged (NMSE {float(loss)}); lower ost.distill_lr")
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(nmse=f"{losses[-1]:.4f}")
    bar.close()
    emulator.requires_grad_(False)
    emulator.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return float(np.mean(tail))


def middle_nmse(full: torch.nn.Module, emulator: torch.nn.Module, recipe: EmulatorRecipe,
                chunks: Sequence[list[int]], batch_size: int = 4) -> float:
    """Mean NMSE of the emulated middle on ``chunks`` (no training)."""
    values = []
    with torch.no_grad():
        for start in range(0, len(chunks), batch_size):
            ids = torch.tensor(list(chunks[start : start + batch_size]))
            _, target = _middle_io(full, ids, recipe.bottom, recipe.top)
            _, pred = _middle_io(emulator, ids, recipe.bottom, recipe.top)
            values.append(float(nmse(pred.float(), target.float())))
    return float(np.mean(values))


def distilled_emulator(full: torch.nn.Module, recipe: EmulatorRecipe, tokenizer: Any, *, source: str, seq_len: int,
                       max_tokens: int, batch_size: int, lr: float, seed: int, progress: bool = True,
                       cache: Path | None = None) -> tuple[torch.nn.Module, EmulatorRecipe]:
    """The emulator of ``recipe`` with its middle distilled on public text; cached on disk (the kept middle
    blocks only, keyed by the full model's fingerprint, the recipe, the settings and the text)."""
    from safetensors.torch import load_file, save_file

    texts = public_texts(source)
    settings = {"source": source, "seq_len": seq_len, "max_tokens": max_tokens, "batch_size": batch_size, "lr": lr,
                "seed": seed, "text_sha256": hashlib.sha256("\x00".join(texts).encode()).hexdigest()}
    key = hashlib.sha256(json.dumps({"recipe": recipe.to_dict(), **settings}, sort_keys=True).encode()).hexdigest()
    directory = (cache or cache_root() / "emulators") / key[:32]
    emulator = build_emulator(full, recipe)
    family = FAMILIES[recipe.family]
    prefix = block_path(family)
    if (directory / "middle.safetensors").is_file() and (directory / "meta.json").is_file():
        meta = json.loads((directory / "meta.json").read_text())
        missing, unexpected = emulator.load_state_dict(load_file(directory / "middle.safetensors"), strict=False)
        if unexpected:
            raise ConfigError(f"cached emulator {directory} does not fit (unexpected {unexpected[:3]})")
        return emulator, _with_distill(recipe, {**settings, "nmse": meta["nmse"], "nmse_before": meta["nmse_before"],
                                                "cache": key[:32]})
    chunks = text_chunks(texts, tokenizer, seq_len, max_tokens)
    torch.manual_seed(seed)
    before = middle_nmse(full, emulator, recipe, chunks[: max(1, len(chunks) // 10)])
    final = distill(full, emulator, recipe, chunks, batch_size=batch_size, lr=lr, seed=seed, progress=progress)
    middle_ids = set(range(recipe.bottom, len(recipe.kept) - recipe.top))
    tensors = {n: t.detach().contiguous().clone() for n, t in emulator.state_dict().items()
               if (p := _block_index(n, prefix)) is not None and p[0] in middle_ids}
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, tmp / "middle.safetensors")
    (tmp / "meta.json").write_text(json.dumps({"recipe": recipe.to_dict(), "settings": settings, "nmse": final,
                                               "nmse_before": before}, indent=2))
    if not directory.exists():
        os.replace(tmp, directory)
    return emulator, _with_distill(recipe, {**settings, "nmse": final, "nmse_before": before, "cache": key[:32]})


def _with_distill(recipe: EmulatorRecipe, info: dict[str, Any]) -> EmulatorRecipe:
    return EmulatorRecipe(recipe.family, recipe.n_layers, recipe.bottom, recipe.top, recipe.drop, recipe.kept,
                          recipe.fingerprint, info)


# -- server models -----------------------------------------------------------------------------------------
def load_server_model(config: ModelConfig, *, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """The server's full model. Besides what :func:`~fedguard_train.models.load_base_model` loads,
    ``tiny:<family>:<blocks>`` builds a tiny random model with that many blocks (the hub's tiny models
    have 2, too few for a bottom adapter, a middle and a top adapter)."""
    name = config.name_or_path
    parts = name.split(":")
    if len(parts) != 3 or parts[0] != "tiny":
        return load_base_model(config, seed=seed)
    from transformers import AutoModelForCausalLM

    if not parts[2].isdigit() or int(parts[2]) < 1:
        raise ConfigError(f"model.name_or_path {name!r}: the block count after the family must be a positive integer")
    family = family_of(None, parts[1])
    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    cfg = family.tiny_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    cfg.num_hidden_layers = int(parts[2])
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[0]] * int(parts[2])
    model = AutoModelForCausalLM.from_config(cfg).to(getattr(torch, config.dtype))
    model.requires_grad_(False)
    return model, tokenizer


def load_plugged_model(adapter_dir: Path, model_config: ModelConfig, *, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """The server's full model with a checkpoint's adapter blocks plugged in (``adapter_dir``: a
    checkpoint's ``adapter/``, holding the adapter tensors and the emulator recipe). The full model
    must be the one the recipe was made from (its fingerprint is checked)."""
    from safetensors.torch import load_file

    try:
        meta = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        recipe = EmulatorRecipe.from_dict(meta["fedguard_ost"]["recipe"])
        names: dict[str, str] = meta["fedguard_ost"]["names"]
        tensors = load_file(adapter_dir / ADAPTER_FILE)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"{adapter_dir} is not a FedOST adapter checkpoint: {err}") from err
    full, tokenizer = load_server_model(model_config, seed=seed)
    if fingerprint(full) != recipe.fingerprint:
        raise ConfigError(f"the model {model_config.name_or_path!r} is not the one the adapters of {adapter_dir} "
                          f"were trained for (weight fingerprint differs)")
    load_adapter_state(full, recipe, {names[k]: v for k, v in tensors.items() if k in names})
    return full, tokenizer


class EmulatorModel(torch.nn.Module):
    """The client-side model: the emulator with its adapter blocks trainable. ``save_pretrained`` writes the
    adapter blocks and the recipe only (never the emulator's frozen weights)."""

    def __init__(self, emulator: torch.nn.Module, recipe: EmulatorRecipe) -> None:
        super().__init__()
        self.emulator = emulator
        self.recipe = recipe
        self.config = emulator.config
        mark_adapter(emulator, recipe)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.emulator(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.emulator.generate(*args, **kwargs)  # type: ignore[operator]

    def adapter_names(self) -> dict[str, str]:
        """This module's adapter parameter names -> the full model's names."""
        prefix = block_path(FAMILIES[self.recipe.family])
        out = {}
        for name, p in self.named_parameters():
            parsed = _block_index(name.removeprefix("emulator."), prefix)
            if p.requires_grad and parsed is not None:
                out[name] = f"{prefix}.{self.recipe.kept[parsed[0]]}.{parsed[1]}"
        return out

    def save_pretrained(self, directory: str | os.PathLike[str], **_: Any) -> None:
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        params = dict(self.named_parameters())
        names = self.adapter_names()
        save_file({n: params[n].detach().contiguous().clone() for n in names}, path / ADAPTER_FILE,
                  metadata={"format": "pt"})
        (path / ADAPTER_CONFIG).write_text(json.dumps({"fedguard_ost": {"recipe": self.recipe.to_dict(),
                                                                        "names": names}}, indent=2, sort_keys=True))

