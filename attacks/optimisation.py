"""Optimisation-based update inversion on text: LAMP/TAG-style gradient matching with a language prior.

Written from the papers' descriptions: TAG (Deng et al., "TAG: Gradient Attack on Transformer-based
Language Models", EMNLP Findings 2021) and LAMP (Balunović et al., "LAMP: Extracting Text from Gradients
with Language Model Priors", NeurIPS 2022). No code of theirs is used.

The attacker holds the weights ``θ`` the client started from and the gradient ``g* = ∇_θ L(θ; x*)`` it
sent (or, for a local update ``Δ``, the direction ``−Δ``). It searches for a batch ``x`` whose gradient
matches, over every observed tensor ``l``:

    D(x) = Σ_l (1 − cos(g_l(x), g*_l)) / n_tensors  +  α · Σ_l ‖g_l(x) − g*_l‖² / Σ_l ‖g*_l‖²

(LAMP's cos + L2 distance; with ``target="update"`` the scale is unknown and the L2 term compares unit
vectors). Tokens are discrete, so the search alternates two steps (LAMP):

1. **Continuous.** Each position holds a distribution ``p_t = softmax(z_t / T)`` over the vocabulary;
   the model reads the soft embedding ``p_t E`` and is trained to predict the soft next token ``p_{t+1}``
   (cross-entropy ``−Σ p_{t+1} log q_t``, the causal LM loss of the client with one-hot ``p``), so ``g(x)``
   is differentiable in ``z``. Adam minimises ``D + β · L_LM(p)``, where ``L_LM`` is the same causal LM
   loss under the *base model* — the language prior (the model the server broadcast is the attacker's
   natural prior; LAMP uses GPT-2).
2. **Discrete.** Every ``discrete_every`` steps the distributions are projected to tokens (argmax) and
   LAMP's candidate transformations of that sequence are scored by the true discrete objective
   ``D(x) + γ · L_LM(x)`` (one-hot tokens, one ordinary backward pass each): swaps of two tokens, moves of
   a token or a span, and substitutions by a position's next most likely tokens. The best candidate
   replaces the current sequence if it scores lower, and the distributions are reset to it.

The sequence lengths are known to the attacker (LAMP's assumption; fedguard's padding mask travels
nowhere, but the lengths bound the search) and, when ``eos_id`` is given, so is the last token (EOS: every
fedguard example ends with it). Several random restarts run; the one with the lowest discrete objective
wins. The result is scored with :func:`attacks.inversion.score_recovery` (exact recovery, token accuracy,
ROUGE-1/2, chance levels).

Where it fails, as it should: a masked vector (uniform in the ring) or an update drowned in DP noise has no
input whose gradient matches it, so the search returns sequences at chance level; the attack reports
``final_distance`` near 1 (no better than an orthogonal direction). It is expensive: the continuous step
back-propagates through a gradient (double backward) over ``B · T · V`` logits, so it suits tiny models and
short sequences; on a 135M-parameter model and a 32-example multi-step update it is not practical on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from fedguard.errors import ConfigError

Target = Literal["gradient", "update"]


@dataclass(frozen=True, slots=True)
class LampConfig:
    """``steps``: continuous Adam steps per restart at learning rate ``lr``; ``l2_weight`` (α): the L2
    term's weight beside the cosine term; ``prior_weight`` (β): the base model's LM loss in the continuous
    objective; ``discrete_prior_weight`` (γ): the same in the discrete score; ``discrete_every``: steps
    between discrete steps; ``candidates``: random transformations scored per discrete step (besides the
    substitutions); ``temperature`` (T) of the softmax; ``restarts``: random initialisations; ``eos_id``:
    the known last token (``None``: optimised like the others); ``seed``: every random choice;
    ``max_soft_entries``: the largest ``B · T · V`` (soft-token logits) attempted — each costs memory
    several times over (Adam state, the double-backward graph)."""

    steps: int = 300
    lr: float = 0.1
    l2_weight: float = 0.5
    prior_weight: float = 0.02
    discrete_prior_weight: float = 0.02
    discrete_every: int = 50
    candidates: int = 48
    temperature: float = 1.0
    restarts: int = 2
    eos_id: int | None = None
    seed: int = 0
    max_soft_entries: int = 20_000_000

    def __post_init__(self) -> None:
        problems = []
        for name in ("steps", "discrete_every", "restarts", "max_soft_entries"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.candidates < 0:
            problems.append(f"candidates must be >= 0, got {self.candidates}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("l2_weight", "prior_weight", "discrete_prior_weight"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if problems:
            raise ConfigError.collect(problems)


@dataclass(frozen=True, slots=True)
class LampOutcome:
    """The recovered sequences (one per true sequence, in batch order), the final gradient distance ``D``
    (0: a perfect match; about 1: no better than an orthogonal direction) and the LM loss of the result."""

    sequences: tuple[tuple[int, ...], ...]
    final_distance: float
    lm_loss: float
    restarts: int


class _Objective:
    """``D`` and the LM loss for soft or hard batches of fixed lengths, against one observed gradient."""

    def __init__(self, model: torch.nn.Module, observed: Mapping[str, torch.Tensor | np.ndarray],
                 lengths: Sequence[int], *, target: Target, l2_weight: float) -> None:
        params = dict(model.named_parameters())
        missing = [n for n in observed if n not in params]
        if missing:
            raise ConfigError(f"the model has no parameters {missing[:3]} (of {len(missing)}) named in the update")
        if not observed:
            raise ConfigError("the observed gradient/update names no parameter")
        self.model = model
        self.names = list(observed)
        self.params = [params[n] for n in self.names]
        sign = -1.0 if target == "update" else 1.0  # Δ = −η Σ g: the update points against the gradient
        obs: list[torch.Tensor] = []
        for n, param in zip(self.names, self.params):
            v = observed[n]
            t = v.detach().clone() if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))
            t = sign * t.to(dtype=param.dtype).reshape(param.shape)
            if not torch.isfinite(t).all():
                raise ConfigError(f"the observed update of {n} has non-finite values")
            obs.append(t)
        total = float(sum(float((t ** 2).sum()) for t in obs))
        if total == 0.0:
            raise ConfigError("the observed gradient/update is zero: nothing to match")
        self.unit = target == "update"
        self.observed = [t / np.sqrt(total) for t in obs] if self.unit else obs
        self.obs_sq = 1.0 if self.unit else total
        self.l2_weight = l2_weight
        embeddings = model.get_input_embeddings()  # type: ignore[operator]
        if not isinstance(embeddings, torch.nn.Embedding):
            raise ConfigError("lamp needs a model with a token embedding matrix (get_input_embeddings)")
        self.embedding: torch.Tensor = embeddings.weight
        self.lengths = list(lengths)
        width = max(self.lengths)
        self.mask = torch.zeros((len(self.lengths), width), dtype=torch.long)
        for row, length in enumerate(self.lengths):
            self.mask[row, :length] = 1
        # label positions: token t+1 is predicted at t; HF's loss averages over the valid shifted positions
        self.label_mask = self.mask[:, 1:].to(self.embedding.dtype)

    def loss(self, probs: torch.Tensor) -> torch.Tensor:
        """The causal LM loss of the model on the soft batch ``probs`` (B, T, V) (one-hot: the client's)."""
        emb = probs @ self.embedding
        logits = self.model(inputs_embeds=emb, attention_mask=self.mask).logits
        logq = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        per = -(probs[:, 1:].float() * logq).sum(-1)
        return (per * self.label_mask).sum() / self.label_mask.sum().clamp(min=1.0)

    def distance(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        cos = torch.zeros(())
        sq = torch.zeros(())
        norm_sq = sum((g ** 2).sum() for g in grads) if self.unit else torch.ones(())
        scale = torch.sqrt(torch.as_tensor(norm_sq)).clamp(min=1e-30) if self.unit else torch.ones(())
        for g, o in zip(grads, self.observed):
            cos = cos + 1.0 - torch.nn.functional.cosine_similarity(g.reshape(1, -1), o.reshape(1, -1), eps=1e-12)[0]
            sq = sq + ((g / scale - o) ** 2).sum()
        return cos / len(grads) + self.l2_weight * sq / self.obs_sq

    def soft(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(D, L_LM)`` of a soft batch, differentiable in ``probs`` (double backward)."""
        lm = self.loss(probs)
        grads = torch.autograd.grad(lm, self.params, create_graph=True, allow_unused=True)
        grads = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params))
        return self.distance(grads), lm

    def hard(self, seqs: Sequence[Sequence[int]]) -> tuple[float, float]:
        """``(D, L_LM)`` of token sequences (one ordinary backward pass)."""
        probs = self.one_hot(seqs)
        lm = self.loss(probs)
        grads = torch.autograd.grad(lm, self.params, allow_unused=True)
        grads = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params))
        return float(self.distance(grads).detach()), float(lm.detach())

    def one_hot(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        out = torch.zeros((len(self.lengths), self.mask.shape[1], self.embedding.shape[0]), dtype=self.embedding.dtype)
        for row, s in enumerate(seqs):
            out[row, torch.arange(len(s)), torch.tensor(list(s), dtype=torch.long)] = 1.0
        return out


@contextmanager
def _eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` with the plain (eager) attention while the attack needs a double backward: PyTorch's
    fused attention kernels have no second derivative. The model's own setting is restored afterwards."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and hasattr(c, "_attn_implementation")}
    before = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = "eager"
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = before[k]


def _candidates(seqs: list[list[int]], top: np.ndarray, fixed_last: bool, count: int,
                rng: np.random.Generator) -> list[list[list[int]]]:
    """LAMP's discrete transformations of the current batch: substitutions by each position's next most
    likely tokens (``top``: (B, T, k) token ids), and ``count`` random swaps / token moves / span moves."""
    out: list[list[list[int]]] = []
    free = [len(s) - (1 if fixed_last else 0) for s in seqs]
    for row, s in enumerate(seqs):
        for pos in range(free[row]):
            for tok in top[row, pos]:
                if int(tok) != s[pos]:
                    new = [list(x) for x in seqs]
                    new[row][pos] = int(tok)
                    out.append(new)
    rows = [r for r in range(len(seqs)) if free[r] >= 2]
    for _ in range(count if rows else 0):
        row = int(rng.choice(rows))
        n = free[row]
        new = [list(x) for x in seqs]
        s = new[row]
        kind = int(rng.integers(0, 3))
        if kind == 0:  # swap two tokens
            i, j = rng.choice(n, size=2, replace=False)
            s[i], s[j] = s[j], s[i]
        elif kind == 1:  # move one token
            i, j = rng.choice(n, size=2, replace=False)
            tok = s.pop(int(i))
            s.insert(int(j), tok)
        else:  # move a span
            i = int(rng.integers(0, n - 1))
            j = int(rng.integers(i + 1, n))
            span = s[i:j + 1]
            rest = s[:i] + s[j + 1:n]
            at = int(rng.integers(0, len(rest) + 1))
            s[:n] = rest[:at] + span + rest[at:]
        out.append(new)
    return out


class _Search:
    """One restart's state: the logits ``z`` (B, T, V) and the best discrete batch so far."""

    def __init__(self, objective: _Objective, cfg: LampConfig, lengths: Sequence[int], free: torch.Tensor,
                 pinned: torch.Tensor, rng: np.random.Generator, gen: torch.Generator) -> None:
        self.objective, self.cfg, self.lengths = objective, cfg, list(lengths)
        self.free, self.pinned, self.rng, self.gen = free, pinned, rng, gen
        self.logits = torch.randn(tuple(pinned.shape), generator=gen, dtype=pinned.dtype).requires_grad_(True)
        self.current: list[list[int]] | None = None
        self.score = float("inf")

    def probs(self) -> torch.Tensor:
        """``p = softmax(z / T)`` on the free positions; the pinned ones (EOS, padding) fixed."""
        return torch.softmax(self.logits / self.cfg.temperature, dim=-1) * self.free + self.pinned

    def continuous(self, steps: int, bar: Any) -> None:
        """Adam on ``D + β·L_LM`` of the soft batch."""
        opt = torch.optim.Adam([self.logits], lr=self.cfg.lr)
        for _ in range(steps):
            opt.zero_grad()
            d, lm = self.objective.soft(self.probs())
            (d + self.cfg.prior_weight * lm).backward()
            opt.step()
            bar.update(1)

    def discrete(self) -> None:
        """Project to tokens, score LAMP's transformations by ``D + γ·L_LM``, keep the best, and restart the
        continuous search from it."""
        with torch.no_grad():
            top = torch.topk(self.probs(), k=min(3, self.pinned.shape[-1]), dim=-1).indices.numpy()
        projected = [[int(t) for t in top[row, :n, 0]] for row, n in enumerate(self.lengths)]
        pool = [projected] + ([self.current] if self.current is not None else [])
        pool += _candidates(projected, top[:, :, 1:], self.cfg.eos_id is not None, self.cfg.candidates, self.rng)
        for cand in pool:
            d, lm = self.objective.hard(cand)
            score = d + self.cfg.discrete_prior_weight * lm
            if score < self.score:
                self.current, self.score = cand, score
        chosen = self.current if self.current is not None else projected
        with torch.no_grad():
            self.logits.copy_(self.objective.one_hot(chosen) * 4.0 * self.cfg.temperature
                              + 0.01 * torch.randn(tuple(self.logits.shape), generator=self.gen,
                                                   dtype=self.logits.dtype))


def lamp(model: torch.nn.Module, observed: Mapping[str, torch.Tensor | np.ndarray], lengths: Sequence[int], *,
         config: LampConfig | None = None, target: Target = "gradient", progress: bool = False) -> LampOutcome:
    """Recover a batch of ``len(lengths)`` sequences whose gradient matches ``observed``.

    ``observed`` maps parameter names of ``model`` to the gradient (``target="gradient"``: a single-step
    FedSGD reply) or the local update ``θ_k − θ`` (``target="update"``: matched in direction) the server
    received; ``model`` holds the weights the client started from. Deterministic for a given ``seed``."""
    from tqdm import tqdm

    cfg = config or LampConfig()
    if not lengths or min(lengths) < 2:
        raise ConfigError(f"lamp needs sequence lengths >= 2 (the first token is never a label), got {list(lengths)}")
    if target not in ("gradient", "update"):
        raise ConfigError(f"target must be 'gradient' or 'update', got {target!r}")
    objective = _Objective(model, observed, lengths, target=target, l2_weight=cfg.l2_weight)
    vocab = int(objective.embedding.shape[0])
    batch, width = len(lengths), max(lengths)
    if batch * width * vocab > cfg.max_soft_entries:
        raise ConfigError(f"LAMP's soft-token search needs B·T·V = {batch}·{width}·{vocab} = {batch * width * vocab:,} "
                          f"logits, above max_soft_entries = {cfg.max_soft_entries:,}: too large to attempt here")
    if cfg.eos_id is not None and not 0 <= cfg.eos_id < vocab:
        raise ConfigError(f"eos_id {cfg.eos_id} is outside the vocabulary of {vocab}")
    # positions the optimiser may change; the padding and the known last token are pinned
    pinned = torch.zeros((batch, width, vocab), dtype=objective.embedding.dtype)
    free = torch.ones((batch, width, 1), dtype=objective.embedding.dtype)
    for row, n in enumerate(lengths):
        free[row, n - 1 if cfg.eos_id is not None else n:] = 0.0
        if cfg.eos_id is not None:
            pinned[row, n - 1, cfg.eos_id] = 1.0
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    was = model.training
    model.eval()  # the gradient of the model as sent: no dropout
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in objective.params:
        p.requires_grad_(True)
    best: _Search | None = None
    bar = tqdm(total=cfg.restarts * cfg.steps, desc="inversion (LAMP): gradient matching", unit="step",
               disable=not progress)
    try:
        with _eager_attention(model):
            for _ in range(cfg.restarts):
                search = _Search(objective, cfg, lengths, free, pinned, rng, gen)
                done = 0
                while done < cfg.steps:
                    chunk = min(cfg.discrete_every, cfg.steps - done)
                    search.continuous(chunk, bar)
                    done += chunk
                    search.discrete()
                    bar.set_postfix(D=f"{search.score:.3f}")
                if best is None or search.score < best.score:
                    best = search
            if best is None or best.current is None:  # unreachable: steps >= 1 runs a discrete step
                raise ConfigError("lamp ran no step")
            d, lm = objective.hard(best.current)
            sequences = tuple(tuple(s[:n]) for s, n in zip(best.current, lengths))
    finally:
        bar.close()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.zero_grad(set_to_none=True)
        model.train(was)
    return LampOutcome(sequences, d, lm, cfg.restarts)


def observed_gradient(model: torch.nn.Module, batch: Sequence[Sequence[int]], names: Sequence[str] | None = None,
                      *, pad_id: int = 0) -> dict[str, Any]:
    """The single-step gradient the client of a FedSGD round sends, for ``names`` (default: every trainable
    parameter): :func:`attacks.inversion.batch_gradient` over the trainable parameters."""
    from attacks.inversion import batch_gradient

    chosen = list(names) if names is not None else [n for n, p in model.named_parameters() if p.requires_grad]
    return batch_gradient(model, batch, chosen, pad_id=pad_id)
