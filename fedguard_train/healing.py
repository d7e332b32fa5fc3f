"""Healing a layer-dropped model: distil it from the full model it was cut from, once, cached on disk.

FedHeteroLLM's mentee and FedCoLLM's small model are derived from the one pretrained LLM available offline
(SmolLM2-135M) by keeping ``K`` of its ``L`` decoder blocks (evenly spaced, first and last kept:
:func:`fedguard_train.trainers.hetero.drop_layers`). Cut like that, the model is not a language model any
more (SmolLM2 with 8 of 30 blocks: perplexity ~1e7 on plain text). Healing trains the kept blocks and the
final norm (embeddings and the tied head stay frozen) towards the full model — the teacher — on public text:

    ``L = kd_weight · τ² · KL(p_full^τ ‖ p_dropped^τ) + hidden_weight · (1/K) Σ_j NMSE(h_j, H_{k_j + 1})``

* the first term is Hinton et al.'s (2015) logit distillation over the **whole** vocabulary (the teacher
  and the dropped model are on the same machine: nothing is sent, no top-k truncation is needed), averaged
  over every position of every window;
* the second matches the output of the dropped model's ``j``-th block (``h_j``, ``j = 1..K``) to the full
  model's output after the same original block ``k_j`` (``H_{k_j + 1}``): block ``j`` learns to stand in for
  original blocks ``k_{j-1}+1 .. k_j`` (layer-wise distillation, as Offsite-Tuning §3.2 distils its emulator
  and as DistilBERT/TinyBERT match hidden states); ``NMSE(a, b) = ‖a − b‖² / ‖b‖²`` per window
  (:func:`fedguard_train.emulator.nmse`). The last pair is the final hidden state, which with the shared
  head fixes the logits.

**The CPU recipe** (the examples' default): a step's cost is dominated by the vocabulary-sized tensors of the
first term (SmolLM2: 49,152 logits per position, on both models, forward and backward, plus their softmaxes)
and by the full model's forward. ``kd_positions`` > 0 computes the first term on that many positions per
window, drawn afresh each step from the seeded generator (``logits_to_keep``: the head runs only there; the
second term still sees every position) — an unbiased estimate of the mean over positions — and
``teacher_precision: bfloat16`` runs the full model's gradient-free forward under bfloat16 autocast (the
dropped model, its optimiser and the losses stay float32; bfloat16 *training* was measured slower than
float32 here and is not offered). Both are recipe settings: they enter the cache key (their old values
are left out of it, so a healing cached before they existed keeps its key).

Data (``data``): ``common-licenses`` (Debian's licence texts, docs/data.md), ``wordnet-unused`` ("define the
word" pairs in the model's chat format for WordNet lemmas that no run can draw:
:func:`fedguard_train.public_data.unused_wordnet_pairs`) or ``mixed`` (both, alternating windows). The text
is one token stream cut into windows of ``seq_len``; the last tenth of the windows (at least one) is held
out and scores the dropped model before and after healing (perplexity next to the full model's).

The result is cached under ``$FEDGUARD_CACHE/healed/<key>/`` (the kept blocks' and the final norm's
tensors, and ``meta.json`` with the settings, the losses and the held-out scores), keyed by the full
model's weight fingerprint, the kept blocks, every setting and the text's SHA-256; a run that finds it
loads it and trains nothing. Writes go to a temporary directory renamed into place (never a half cache).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedguard.errors import ConfigError
from fedguard_train.config import HealSection
from fedguard_train.models import cache_root, family_of

BLOCKS_FILE = "blocks.safetensors"
META_FILE = "meta.json"


@dataclass(frozen=True)
class HealInfo:
    """What healing did: the cache key, kept blocks, settings, the held-out perplexity of the full model and
    of the dropped model before and after, the mean loss of the first and last tenth of steps, the seconds
    it took (0 when loaded from the cache) and whether it came from the cache."""

    key: str
    kept: tuple[int, ...]
    n_layers: int
    settings: dict[str, Any]
    ppl_full: float
    ppl_before: float
    ppl_after: float
    loss_first: float
    loss_last: float
    seconds: float
    cached: bool
    provenance: str = ""  # where the cached healing was computed, when not by this code on this machine's text

    def describe(self) -> str:
        """One line for reports: what the model is and what healing bought."""
        s = self.settings
        cheap = (f", KD on {s['kd_positions']} of {s['seq_len']} positions" if s.get("kd_positions") else "") + (
            f", teacher forward in {s['teacher_precision']}" if s.get("teacher_precision", "float32") != "float32"
            else "")
        return (f"{len(self.kept)} of {self.n_layers} blocks {list(self.kept)}, healed by distillation from the full "
                f"model ({s['steps']} steps of {s['batch_size']}x{s['seq_len']} tokens of KD + hidden-state NMSE on "
                f"{s['data']} text, lr {s['lr']}{cheap}, cache "
                f"{self.key[:12]}): held-out perplexity {self.ppl_before:,.1f} -> {self.ppl_after:,.1f} "
                f"(full model {self.ppl_full:,.1f})" + (f" [{self.provenance}]" if self.provenance else ""))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["kept"] = list(self.kept)
        return out


def even_blocks(n_layers: int, keep: int) -> tuple[int, ...]:
    """``keep`` of ``n_layers`` block indices, evenly spaced, first and last kept (``drop_layers``' plan)."""
    if keep < 1:
        raise ConfigError(f"the number of kept blocks must be >= 1, got {keep}")
    keep = min(keep, n_layers)
    return tuple(int(i) for i in np.unique(np.linspace(0, n_layers - 1, keep).round().astype(int)))


def heal_stream(data: str, tokenizer: Any, max_tokens: int) -> list[int]:
    """Token ids of the healing text ``data`` (module docstring), at most ``max_tokens``; ``mixed`` alternates
    licence text and WordNet pairs in blocks of 256 tokens."""
    from fedguard_train.data import format_prompt
    from fedguard_train.emulator import public_texts, token_ids
    from fedguard_train.public_data import unused_wordnet_pairs

    def licences() -> list[int]:
        return token_ids(public_texts("common-licenses"), tokenizer, max_tokens)

    def wordnet() -> list[int]:
        pairs = unused_wordnet_pairs()
        order = np.random.default_rng(0).permutation(len(pairs))
        ids: list[int] = []
        eos = tokenizer.eos_token_id
        for i in order:
            ex = pairs[int(i)]
            ids += tokenizer(format_prompt(tokenizer, ex.prompt) + ex.response, add_special_tokens=False)["input_ids"]
            if eos is not None:
                ids.append(int(eos))
            if len(ids) >= max_tokens:
                break
        return ids[:max_tokens]

    if data == "common-licenses":
        return licences()
    if data == "wordnet-unused":
        return wordnet()
    if data != "mixed":
        raise ConfigError(f"healing data must be 'common-licenses', 'wordnet-unused' or 'mixed', got {data!r}")
    a, b = licences(), wordnet()
    out: list[int] = []
    for start in range(0, max(len(a), len(b)), 256):
        out += a[start : start + 256] + b[start : start + 256]
    return out[:max_tokens]


def _trainable(model: torch.nn.Module, family_name: str) -> list[torch.nn.Parameter]:
    """The dropped model's decoder blocks and its other one-dimensional tensors (the final norm's weight and
    bias); embeddings, position embeddings and the tied head (two-dimensional) stay frozen."""
    from fedguard_train.emulator import decoder_blocks

    blocks = decoder_blocks(model, family_of(model, family_name))
    params = list(blocks.parameters())
    seen = {id(p) for p in params}
    params += [p for p in model.parameters() if id(p) not in seen and p.dim() == 1]
    return params


def heal_loss(full_out: Any, small_out: Any, kept: Sequence[int], section: HealSection) -> tuple[torch.Tensor, float,
                                                                                                   float]:
    """The module docstring's loss for one batch; returns (loss, KD part, NMSE part)."""
    from fedguard_train.emulator import nmse

    tau = section.temperature
    kd = torch.zeros(())
    if section.kd_weight > 0:
        log_p = torch.log_softmax(full_out.logits.float() / tau, dim=-1)
        log_q = torch.log_softmax(small_out.logits.float() / tau, dim=-1)
        kd = tau**2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    hidden = torch.zeros(())
    if section.hidden_weight > 0:
        terms = [nmse(small_out.hidden_states[j + 1].float(), full_out.hidden_states[k + 1].float())
                 for j, k in enumerate(kept)]
        hidden = torch.stack(terms).mean()
    loss = section.kd_weight * kd + section.hidden_weight * hidden
    return loss, float(kd.detach()), float(hidden.detach())


@torch.no_grad()
def perplexity(model: torch.nn.Module, chunks: Sequence[list[int]], batch_size: int = 8, device: str = "cpu") -> float:
    """exp(mean next-token NLL) over every position of ``chunks``."""
    total, count = 0.0, 0
    for start in range(0, len(chunks), batch_size):
        ids = torch.tensor(list(chunks[start : start + batch_size]), device=device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return math.exp(total / max(1, count))


def heal(full: torch.nn.Module, small: torch.nn.Module, kept: Sequence[int], train: Sequence[list[int]],
         section: HealSection, *, family_name: str = "auto", progress: bool = True,
         device: str = "cpu") -> list[float]:
    """``section.steps`` AdamW steps of the module docstring's loss on batches of ``train`` windows (cycled in
    a seeded random order); returns the loss per step. ``small`` is left frozen and in eval mode. Both models
    must already be on ``device``."""
    from tqdm import tqdm

    if not train:
        raise ConfigError("the healing text is shorter than one window (heal.seq_len)")
    params = _trainable(small, family_name)
    small.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.AdamW(params, lr=section.lr, weight_decay=0.0)
    warmup = max(1, section.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / section.steps))))
    generator = torch.Generator().manual_seed(section.seed)
    order: list[int] = []
    full.eval()
    small.train()
    bf16 = section.teacher_precision == "bfloat16"
    losses: list[float] = []
    bar = tqdm(range(section.steps), desc="healing the layer-dropped model", unit="step", disable=not progress,
               leave=False)
    for _ in bar:
        if len(order) < section.batch_size:
            order += torch.randperm(len(train), generator=generator).tolist()
        pick, order = order[: section.batch_size], order[section.batch_size :]
        ids = torch.tensor([train[i] for i in pick], device=device)
        extra: dict[str, Any] = {}
        if section.kd_weight == 0:
            extra["logits_to_keep"] = 1  # no logit term: the head's output is not needed
        elif 0 < section.kd_positions < ids.shape[1]:
            positions = torch.randperm(ids.shape[1], generator=generator)[: section.kd_positions].sort().values
            extra["logits_to_keep"] = positions.to(device)
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            full_out = full(input_ids=ids, output_hidden_states=True, **extra)
        small_out = small(input_ids=ids, output_hidden_states=True, **extra)
        loss, _, _ = heal_loss(full_out, small_out, kept, section)
        if not bool(torch.isfinite(loss)):
            raise ConfigError(f"healing diverged (loss {float(loss)}); lower heal.lr")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    small.requires_grad_(False)
    small.eval()
    return losses


_LATER_SETTINGS = {"kd_positions": 0, "teacher_precision": "float32"}
"""Settings added after the first cached healings, with the value that reproduces them: left out of the key
at that value, so a healing cached before they existed keeps its key."""


def _key(fingerprint: str, kept: Sequence[int], section: HealSection, text_sha: str) -> str:
    settings = {k: v for k, v in asdict(section).items() if _LATER_SETTINGS.get(k, object()) != v}
    raw = {"fingerprint": fingerprint, "kept": list(kept), "settings": settings, "text": text_sha, "version": 1}
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()


def healed_model(full: torch.nn.Module, tokenizer: Any, keep: int, section: HealSection, *,
                 family_name: str = "auto", cache: Path | None = None, progress: bool = True,
                 device: str = "cpu") -> tuple[torch.nn.Module, HealInfo]:
    """``full`` with ``keep`` of its blocks (evenly spaced), healed by :func:`heal` — or loaded from the cache
    when this exact recipe was healed before. Returns the frozen model (eval mode, on the CPU) and
    :class:`HealInfo`. ``device``: where healing computes (``cuda`` heals the same recipe faster; the result
    is numerically close to, not bit-identical with, a CPU healing; ``meta.json`` records the device)."""
    from safetensors.torch import load_file, save_file

    from fedguard_train.emulator import EmulatorRecipe, build_emulator, decoder_blocks, fingerprint, windows

    family = family_of(full, family_name)
    n_layers = len(decoder_blocks(full, family))
    kept = even_blocks(n_layers, keep)
    if len(kept) >= n_layers:
        raise ConfigError(f"healing needs a layer-dropped model: {keep} blocks of a {n_layers}-block model drop none")
    full_print = fingerprint(full)
    small = build_emulator(full, EmulatorRecipe(family.name, n_layers, 0, 0, 1 - len(kept) / n_layers, kept,
                                                full_print))
    per_window = section.seq_len
    stream = heal_stream(section.data, tokenizer, per_window * (section.steps * section.batch_size + 64))
    text_sha = hashlib.sha256(np.asarray(stream, dtype=np.int64).tobytes()).hexdigest()
    key = _key(full_print, kept, section, text_sha)
    directory = (cache or cache_root() / "healed") / key[:32]
    trainable_names = _trainable_names(small, family.name)
    if (directory / BLOCKS_FILE).is_file() and (directory / META_FILE).is_file():
        meta = json.loads((directory / META_FILE).read_text())
        tensors = load_file(directory / BLOCKS_FILE)
        if set(tensors) != trainable_names:
            raise ConfigError(f"the healed-model cache {directory} does not fit this model; delete it to heal again")
        small.load_state_dict(tensors, strict=False)
        info = HealInfo(**{**meta["info"], "kept": tuple(meta["info"]["kept"]), "seconds": 0.0, "cached": True,
                           "provenance": str(meta.get("provenance", ""))})
        return small, info
    chunks = windows(stream, per_window)
    held = max(1, len(chunks) // 10)
    train, test = chunks[:-held], chunks[-held:]
    test = test[:32]
    torch.manual_seed(section.seed)
    full_device = next(full.parameters()).device
    full.to(device)
    small.to(device)
    ppl_full, ppl_before = perplexity(full, test, device=device), perplexity(small, test, device=device)
    start = time.perf_counter()
    losses = heal(full, small, kept, train, section, family_name=family.name, progress=progress, device=device)
    seconds = time.perf_counter() - start
    ppl_after = perplexity(small, test, device=device)
    full.to(full_device)
    small.to("cpu")
    tenth = max(1, len(losses) // 10)
    info = HealInfo(key, kept, n_layers, asdict(section), ppl_full, ppl_before, ppl_after,
                    float(np.mean(losses[:tenth])), float(np.mean(losses[-tenth:])), seconds, False)
    tensors = {n: t.detach().contiguous().clone() for n, t in small.state_dict().items() if n in trainable_names}
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / BLOCKS_FILE))
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    (tmp / META_FILE).write_text(json.dumps({"info": info.to_dict(), "losses": losses, "device": where}, indent=2))
    if directory.exists():  # healed concurrently by another process: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, directory)
    return small, info


def _trainable_names(model: torch.nn.Module, family_name: str) -> set[str]:
    ids = {id(p) for p in _trainable(model, family_name)}
    return {n for n, p in model.named_parameters() if id(p) in ids}


__all__ = ["HealInfo", "even_blocks", "heal", "heal_loss", "heal_stream", "healed_model", "perplexity"]
