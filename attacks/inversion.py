"""Update inversion on text: recover a client's training tokens from the gradient or update it sends.

A DAGER-style exact attack (Petrov et al., "DAGER: Exact Gradient Inversion for Large Language Models",
NeurIPS 2024), written from the paper's description. The key fact: for a linear layer ``y = W x`` applied
to the rows ``x_1..x_n`` (one per token of the batch), the weight gradient is

    ∇W = Σ_t δ_t x_tᵀ          (nn.Linear; GPT-2's Conv1D stores the transpose)

so its row space (in the layer's input space) lies in ``span{x_t}``, of rank ``<= n``. When ``n`` is
below the input width ``d``, a candidate input ``x`` belongs to the batch (generically) iff it lies in
that span, which is cheap to test: ``dist(x) = ‖x − V Vᵀ x‖ / ‖x‖`` with ``V`` an orthonormal basis of
the row space (SVD). The attack:

1. **Layer 1 (token filter).** The first block's projection sees ``x = norm(e_v + p_i)`` (GPT-2: learned
   positions) or ``x = norm(e_v)`` (RoPE models: Llama, SmolLM2): compute it for every vocabulary token
   ``v`` (and position ``i``), keep those within ``tau`` of the span of the first block's gradient.
2. **Layer 2 (sequence reconstruction).** The second block's projection input at position ``i`` depends
   only on tokens ``0..i`` (causal attention). Grow prefixes left to right: extend each prefix by each
   surviving token, keep the extension iff its second-block input at the new position is in the span of
   the second block's gradient; a prefix no extension passes is a recovered sequence.

The last position of a sequence is invisible (its logits carry no loss, and causal attention sends
its key and value nowhere else), so its token cannot be recovered; fedguard's data ends every example
with EOS, which the attacker knows: ``InversionConfig.eos_id`` appends it.

What breaks it, and the attack reports it (``informative=False``, with random guesses as the recovery
so the metrics read as chance): the span is full rank (``n >= d``: too many tokens, or a masked vector,
which is uniformly random), or the layer's update is not a sum of rank-one input outer products any
more (multi-step Adam updates rescale coordinates). LoRA: the ``A`` matrix's gradient row space is an
``r``-dimensional subspace of the span (rank ``<= r``), so with more than ``r`` tokens true inputs are
no longer inside it; and at the first round ``B = 0`` makes ``∇A = 0``.

Metrics against the client's true batch: exact-recovery rate (a true sequence appears verbatim),
token accuracy (positional matches of the best recovered sequence), ROUGE-1/2 F1 (``rouge-score`` over
token ids, or over decoded text when a tokenizer is given); the chance level is the same metrics for
uniformly random sequences of the true lengths, matched best-of-k as the recovery is (k = the number
of sequences the attack returned).

The optimisation-based attack (LAMP/TAG with the base model as a language prior) is
:mod:`attacks.optimisation`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedguard.errors import ConfigError

PROJECTIONS: tuple[str, ...] = ("h.{i}.attn.c_attn", "layers.{i}.self_attn.v_proj", "h.{i}.self_attention.query_key_value",
                                "decoder.layers.{i}.self_attn.v_proj")
"""Which projection of block ``i`` the attack reads, per family: GPT-2, Llama/Qwen2/SmolLM2, BLOOM, OPT. Values,
not queries, where they are separate: the query at position 0 attends to itself alone (a softmax over one
score is constant), so the query gradient never contains the first token's input; the value's does."""


class _Stop(Exception):
    """Raised by a pre-hook to end a forward pass once the wanted layer input is captured."""


@dataclass(frozen=True, slots=True)
class InversionConfig:
    """``rank_tol``: singular values below ``rank_tol · s_max`` are noise; ``tau``: span-distance cut-off
    (layer 1 and layer 2); ``max_len``: longest sequence tried; ``max_prefixes``: cap on live prefixes;
    ``max_rank_share``: a span of rank above this share of the input width is uninformative;
    ``eos_id``: appended to each recovered sequence (the invisible last token), ``None``: nothing;
    ``vocab_chunk``: candidate tokens per forward pass; ``seed``: the random guesses' seed."""

    rank_tol: float = 1e-5
    tau: float = 1e-2
    max_len: int = 32
    max_prefixes: int = 4096
    max_rank_share: float = 0.95
    eos_id: int | None = None
    vocab_chunk: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.rank_tol < 1:
            problems.append(f"rank_tol must be in (0, 1), got {self.rank_tol}")
        if not 0 < self.tau < 1:
            problems.append(f"tau must be in (0, 1), got {self.tau}")
        for name in ("max_len", "max_prefixes", "vocab_chunk"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.max_rank_share <= 1:
            problems.append(f"max_rank_share must be in (0, 1], got {self.max_rank_share}")
        if problems:
            raise ConfigError.collect(problems)


def projection(model: torch.nn.Module, block: int) -> tuple[str, torch.nn.Module]:
    """The (outermost) module through which block ``block`` first projects its input, and its name."""
    suffixes = tuple(p.format(i=block) for p in PROJECTIONS)
    found = [(name, mod) for name, mod in model.named_modules()
             if any(name == s or name.endswith("." + s) for s in suffixes)]
    if not found:
        raise ConfigError(f"no first projection of block {block} found (supported: {', '.join(PROJECTIONS)})")
    return min(found, key=lambda nm: len(nm[0]))


def input_rows(module: torch.nn.Module, gradient: torch.Tensor | np.ndarray, *, lora: bool) -> np.ndarray:
    """Orient a weight gradient/update of ``module`` as rows in its input space: ``(k, d_in)``."""
    g = np.asarray(gradient.detach().cpu() if isinstance(gradient, torch.Tensor) else gradient, dtype=np.float64)
    if lora:  # lora_A: nn.Linear(d_in, r), weight (r, d_in)
        return g
    if type(module).__name__ == "Conv1D":  # GPT-2: weight (d_in, d_out), y = x W
        return g.T
    return g  # nn.Linear: weight (d_out, d_in)


def row_space(rows: np.ndarray, rank_tol: float, noise_std: float = 0.0) -> np.ndarray:
    """An orthonormal basis ``(d_in, r)`` of the row space of ``rows``: singular values above
    ``rank_tol·s_max`` and above ``3·noise_std·(√k + √d)``, three times the largest singular value of a
    ``k × d`` matrix of i.i.d. noise of that standard deviation (e.g. the public quantisation step)."""
    if not np.all(np.isfinite(rows)):
        raise ConfigError("the gradient/update has non-finite values")
    # torch's SVD (it honours torch.set_num_threads; numpy's BLAS threads stall on a loaded machine)
    _, s_t, vt_t = torch.linalg.svd(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float64)), full_matrices=False)
    s, vt = s_t.numpy(), vt_t.numpy()
    if s.size == 0 or s[0] == 0:
        return np.zeros((rows.shape[1], 0))
    floor = 3.0 * noise_std * (np.sqrt(rows.shape[0]) + np.sqrt(rows.shape[1]))
    r = int(((s > rank_tol * s[0]) & (s > floor)).sum())
    return np.asarray(vt[:r].T, dtype=np.float64)


def span_distance(x: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """``‖x − V Vᵀ x‖ / ‖x‖`` for each row of ``x``."""
    x = np.asarray(x, dtype=np.float64)
    residual = x - (x @ basis) @ basis.T
    return np.asarray(np.linalg.norm(residual, axis=-1) / np.maximum(np.linalg.norm(x, axis=-1), 1e-30))


@torch.no_grad()
def layer_inputs(model: torch.nn.Module, module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The inputs ``(n, T, d_in)`` of ``module`` when ``model`` reads ``ids`` (the pass stops there)."""
    captured: list[torch.Tensor] = []

    def hook(_: torch.nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0].detach().double())
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    was = model.training
    model.eval()
    try:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except _Stop:
        pass
    finally:
        handle.remove()
        model.train(was)
    if not captured:
        raise ConfigError("the projection module was not reached by a forward pass")
    return captured[0]


@dataclass(frozen=True, slots=True)
class InversionOutcome:
    """What the attack recovered from one gradient/update."""

    sequences: tuple[tuple[int, ...], ...]
    informative: bool
    rank: tuple[int, int]
    candidates_per_position: tuple[int, ...]
    reason: str = ""


def _lora_param(module: torch.nn.Module) -> torch.nn.Parameter | None:
    lora_a = getattr(module, "lora_A", None)
    if lora_a is None or not len(lora_a):
        return None
    return next(iter(lora_a.values())).weight


def target_parameters(model: torch.nn.Module) -> tuple[str, str, bool]:
    """Names of the two parameters whose gradients/updates the attack reads (blocks 0 and 1) and whether
    they are LoRA ``A`` matrices."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    lora = False
    for block in (0, 1):
        _, mod = projection(model, block)
        a = _lora_param(mod)
        if a is not None:
            lora = True
            out.append(names[id(a)])
        else:
            w = getattr(mod, "weight", None)
            if w is None or id(w) not in names:
                raise ConfigError(f"block {block}'s projection has no weight parameter")
            out.append(names[id(w)])
    return out[0], out[1], lora


def dager(model: torch.nn.Module, updates: Mapping[str, torch.Tensor | np.ndarray], *,
          config: InversionConfig | None = None, vocab: Sequence[int] | None = None,
          lengths_hint: Sequence[int] | None = None, noise_std: float = 0.0,
          progress: bool = False) -> InversionOutcome:
    """Recover token sequences from the gradients/updates of the first two blocks' input projections.

    ``updates`` maps parameter names (as :func:`target_parameters` names them) to their gradient or update;
    ``model`` holds the weights the client started from (``θ_r``, the server knows them). ``vocab``:
    candidate tokens (default all). ``lengths_hint``: lengths for random guesses when uninformative.
    ``noise_std``: per-entry noise the server knows is in the update (the fixed-point step ``1/s`` over
    √12·weight for stochastic rounding), so that it is not mistaken for signal (:func:`row_space`)."""
    from tqdm import tqdm

    cfg = config or InversionConfig()
    name0, name1, lora = target_parameters(model)
    missing = [n for n in (name0, name1) if n not in updates]
    if missing:
        raise ConfigError(f"updates lack {missing}")
    _, mod0 = projection(model, 0)
    _, mod1 = projection(model, 1)
    basis0 = row_space(input_rows(mod0, updates[name0], lora=lora), cfg.rank_tol, noise_std)
    basis1 = row_space(input_rows(mod1, updates[name1], lora=lora), cfg.rank_tol, noise_std)
    d0, d1 = basis0.shape[0], basis1.shape[0]
    rank = (basis0.shape[1], basis1.shape[1])
    n_vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    tokens = np.asarray(list(vocab) if vocab is not None else range(n_vocab), dtype=np.int64)
    rng = np.random.default_rng(cfg.seed)

    def guess(reason: str) -> InversionOutcome:
        lengths = list(lengths_hint or [cfg.max_len])
        seqs = tuple(tuple(int(t) for t in rng.choice(tokens, size=n)) for n in lengths)
        return InversionOutcome(seqs, False, rank, (), reason)

    if rank[0] == 0 or rank[1] == 0:
        return guess("the update of the first layers is zero (e.g. LoRA B = 0 at the first round)")
    if rank[0] > cfg.max_rank_share * d0 or rank[1] > cfg.max_rank_share * d1:
        return guess(f"no low-rank structure: rank {rank[0]}/{d0} and {rank[1]}/{d1} (too many tokens, "
                     f"or a masked/noised vector)")

    # layer 1: which tokens (at which positions) are in the span
    probe = layer_inputs(model, mod0, torch.tensor([[int(tokens[0])] * 2], dtype=torch.long))
    positional = not torch.allclose(probe[0, 0], probe[0, 1], atol=1e-6)
    width = cfg.max_len if positional else 1
    passing = np.zeros((width, tokens.size), dtype=bool)
    bar = tqdm(total=tokens.size, desc="inversion: token filter", unit="tok", disable=not progress)
    for start in range(0, tokens.size, cfg.vocab_chunk):
        chunk = tokens[start:start + cfg.vocab_chunk]
        ids = torch.tensor(np.repeat(chunk[:, None], width, axis=1), dtype=torch.long)
        x = layer_inputs(model, mod0, ids).numpy()  # (n, width, d)
        dist = span_distance(x.reshape(-1, d0), basis0).reshape(len(chunk), width)
        passing[:, start:start + len(chunk)] = (dist < cfg.tau).T
        bar.update(len(chunk))
    bar.close()
    per_position = tuple(int(passing[i].sum()) for i in range(width))

    # layer 2: grow prefixes
    def candidates(pos: int) -> np.ndarray:
        return tokens[passing[pos if positional else 0]]

    def extend(prefixes: list[tuple[int, ...]], pos: int) -> dict[tuple[int, ...], list[tuple[int, ...]]]:
        cand = candidates(pos)
        grown: dict[tuple[int, ...], list[tuple[int, ...]]] = {p: [] for p in prefixes}
        if cand.size == 0:
            return grown
        trials = [(p, (*p, int(v))) for p in prefixes for v in cand]
        for start in range(0, len(trials), cfg.vocab_chunk):
            batch = trials[start:start + cfg.vocab_chunk]
            ids = torch.tensor([t for _, t in batch], dtype=torch.long)
            x = layer_inputs(model, mod1, ids)[:, -1].numpy()
            ok = span_distance(x, basis1) < cfg.tau
            for (p, t), good in zip(batch, ok):
                if good:
                    grown[p].append(t)
        return grown

    live: list[tuple[int, ...]] = [()]
    done: list[tuple[int, ...]] = []
    steps = tqdm(range(cfg.max_len), desc="inversion: sequences", unit="pos", disable=not progress)
    for pos in steps:
        grown = extend(live, pos)
        live = []
        for prefix, children in grown.items():
            if children:
                live.extend(children)
            elif prefix:
                done.append(prefix)
        if not live:
            break
        if len(live) > cfg.max_prefixes:
            return guess(f"more than {cfg.max_prefixes} live prefixes at position {pos}: ambiguous")
    done.extend(p for p in live if p)
    if cfg.eos_id is not None:
        done = [(*p, cfg.eos_id) for p in done]
    if not done:
        return guess("no sequence passed the span checks")
    return InversionOutcome(tuple(dict.fromkeys(done)), True, rank, per_position)


# -- metrics ------------------------------------------------------------------------------------------------

def _text(seq: Sequence[int], decode: Callable[[Sequence[int]], str] | None) -> str:
    return decode(list(seq)) if decode is not None else " ".join(f"t{t}" for t in seq)


@dataclass(frozen=True, slots=True)
class RecoveryScore:
    """Recovery of one true batch: rates over its sequences, the best match of each, and chance levels."""

    exact: float
    token_accuracy: float
    rouge1: float
    rouge2: float
    chance_rouge1: float
    chance_token_accuracy: float
    pairs: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = field(repr=False, default=())

    def to_json(self) -> dict[str, Any]:
        return {"exact": self.exact, "token_accuracy": self.token_accuracy, "rouge1": self.rouge1,
                "rouge2": self.rouge2, "chance_rouge1": self.chance_rouge1,
                "chance_token_accuracy": self.chance_token_accuracy}


def _token_accuracy(true: Sequence[int], guess: Sequence[int]) -> float:
    n = max(len(true), 1)
    return sum(a == b for a, b in zip(true, guess)) / n


def score_recovery(truth: Sequence[Sequence[int]], recovered: Sequence[Sequence[int]], *, vocab_size: int,
                   decode: Callable[[Sequence[int]], str] | None = None, seed: int = 0) -> RecoveryScore:
    """Match each true sequence to the recovered one with the best token accuracy (ROUGE-1 on ties)."""
    from rouge_score import rouge_scorer

    if not truth:
        raise ConfigError("score_recovery needs at least one true sequence")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2"], use_stemmer=False)
    rng = np.random.default_rng(seed)
    exact = acc = r1 = r2 = c1 = cacc = 0.0
    pairs = []
    for true in truth:
        t_text = _text(true, decode)
        best: tuple[float, float, float, tuple[int, ...]] = (-1.0, 0.0, 0.0, ())
        for cand in recovered or [()]:
            s = scorer.score(t_text, _text(cand, decode)) if cand else None
            key = (_token_accuracy(true, cand), s["rouge1"].fmeasure if s else 0.0,
                   s["rouge2"].fmeasure if s else 0.0, tuple(cand))
            if key[:2] > best[:2]:
                best = key
        exact += float(tuple(true) == best[3])
        acc += best[0]
        r1 += best[1]
        r2 += best[2]
        pairs.append((tuple(true), best[3]))
        # chance: the same best-of-k matching against k uniformly random sequences (k = guesses made)
        guesses = [rng.integers(0, vocab_size, size=len(true)).tolist() for _ in range(max(len(recovered), 1))]
        c1 += max(scorer.score(t_text, _text(g, decode))["rouge1"].fmeasure for g in guesses)
        cacc += max(_token_accuracy(true, g) for g in guesses)
    n = len(truth)
    return RecoveryScore(exact / n, acc / n, 100 * r1 / n, 100 * r2 / n, 100 * c1 / n, cacc / n, tuple(pairs))


def batch_gradient(model: torch.nn.Module, batch: Sequence[Sequence[int]], names: Sequence[str], *,
                   pad_id: int = 0) -> dict[str, torch.Tensor]:
    """The gradient a client computes on ``batch`` (causal LM loss on every token, padding masked), for
    the parameters ``names``: what the server sees in a single-step FedSGD round in plaintext."""
    width = max(len(s) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, s in enumerate(batch):
        ids[row, :len(s)] = torch.tensor(list(s))
        labels[row, :len(s)] = torch.tensor(list(s))
        mask[row, :len(s)] = 1
    params = dict(model.named_parameters())
    model.zero_grad(set_to_none=True)
    was = model.training
    model.eval()  # no dropout: the gradient of the model as sent
    try:
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    finally:
        model.train(was)
    out = {}
    for n in names:
        g = params[n].grad
        out[n] = torch.zeros_like(params[n]) if g is None else g.detach().clone()
    model.zero_grad(set_to_none=True)
    return out
