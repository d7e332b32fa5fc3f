"""Membership inference against a fine-tuned causal LM: was this example in the training data?

The attacker holds the target model (a run's global model, or the model after one client's captured
update) and, for the reference-based attacks, the public base model and a few shadow fine-tunes it
trains itself. Members are the clients' training examples; non-members a held-out split drawn from the
same distribution (so AUC 0.5 is chance: nothing else tells the two sets apart). Every score is
computed on the response tokens (those with a label), what fine-tuning fits. Larger score = "member".

Scores, for an example ``x`` with target tokens ``x_1..x_T`` and ``ℓ_t = log p_θ(x_t | x_<t)``:

* **loss** (Yeom et al. 2018): ``(1/T) Σ ℓ_t`` (minus the mean NLL).
* **zlib** (Carlini et al., USENIX Security 2021): ``Σ ℓ_t / (8·|zlib(x)|)`` — likelihood over the
  text's compressed size, so that generically easy text is not called a member.
* **min_k** (Min-K%, Shi et al., ICLR 2024): the mean of the ``k`` % smallest ``ℓ_t``.
* **min_k_pp** (Min-K%++, Zhang et al., 2024): the same over ``(ℓ_t − μ_t)/σ_t`` with
  ``μ_t = E_{z∼p_θ(·|x_<t)} log p_θ(z|x_<t)`` and ``σ_t²`` its variance: a token is scored against what
  the model expected at that position (a local maximum of the likelihood for members).
* **ref** (reference-model ratio, Carlini et al. 2021; Mireshghallah et al. 2022): ``(1/T) Σ ℓ_t − (1/T) Σ ℓ^ref_t``
  with the base model as the reference (the natural one: fine-tuning starts there).
* **rmia** (Zarifzadeh et al., ICML 2024): ``Pr_z[ (p_θ(x)/p_ref(x)) / (p_θ(z)/p_ref(z)) ≥ γ ]`` over a
  population ``Z`` of non-member examples disjoint from those scored; ``p(x) = exp((1/T) Σ ℓ_t)`` (the
  per-token geometric mean probability, since whole-sequence probabilities underflow);
  ``p_ref(x)`` is the mean over reference models that did not train on ``x`` (the base model, plus
  the shadow models whose training half left ``x`` out); with the base model alone the offline
  correction ``p_ref = ½((1+a)·p_out + (1−a))`` is applied.
* **lira** (Carlini et al., S&P 2022, online): ``S`` shadow fine-tunes (``S`` even), pairs trained on
  complementary random halves of the scored examples, so each example is IN for ``S/2`` shadows and OUT
  for ``S/2``; ``φ(x) = (1/T) Σ ℓ_t``; score ``= log N(φ_θ(x); μ_in(x), σ_in²) − log N(φ_θ(x); μ_out(x), σ_out²)``
  with per-example means and, when fewer than 4 shadows per side, the global variance (the paper's
  "fixed variance" variant for few shadows).

Metrics and intervals: :mod:`attacks.roc`. Shadow training: :func:`train_shadow` (the attacker's plain
torch loop: LoRA or full fine-tuning with AdamW on its half of the examples).
"""

from __future__ import annotations

import copy
import hashlib
import math
import zlib
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from attacks.roc import FPR_LEVELS, RocSummary, summarize
from fedguard.errors import ConfigError

IGNORE_INDEX = -100
Item = Mapping[str, Sequence[int]]
"""A tokenised example: ``input_ids`` and optionally ``labels`` (``-100`` = not scored); without labels
every token after the first is scored."""

ATTACKS: tuple[str, ...] = ("loss", "zlib", "min_k", "min_k_pp", "ref", "rmia", "lira")


@dataclass(frozen=True, slots=True)
class TokenStats:
    """Per scored token of one example: ``logp`` = ``ℓ_t``, ``mu``/``sigma``: the mean and standard
    deviation of ``log p(z)`` under the model's own next-token distribution (Min-K%++)."""

    logp: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray

    @property
    def mean_logp(self) -> float:
        return float(self.logp.mean())


def _labels(item: Item) -> list[int]:
    ids = list(item["input_ids"])
    labels = item.get("labels")
    return list(labels) if labels is not None else ids


def _scored_labels(item: Item, *, score_first: bool) -> list[int]:
    """``item``'s labels; an item without ``labels`` scores its own tokens, the first one too only with
    ``score_first`` (it has no context to be predicted from)."""
    labels = _labels(item)
    if not score_first and item.get("labels") is None:
        labels = [IGNORE_INDEX, *labels[1:]]
    return labels


def _collate(items: Sequence[Item], pad_id: int, *, score_first: bool) -> dict[str, torch.Tensor]:
    """Right-padded batch (:func:`fedguard_train.data.collate`) of the items' :func:`_scored_labels`."""
    from fedguard_train.data import collate

    rows = [{"input_ids": list(it["input_ids"]), "labels": _scored_labels(it, score_first=score_first)}
            for it in items]
    return collate(rows, pad_id)


def shared_prefix_length(items: Sequence[Item]) -> int:
    """The longest prefix of ``input_ids`` common to every item that ends before every item's first
    prediction: logits at position ``p`` predict token ``p + 1``, so the prefix may reach only up to the
    first scored position minus one. Chat-formatted prompts share their whole template head (28 of ~45
    SmolLM2 tokens on the WordNet task): :func:`token_stats` runs it once."""
    if not items:
        return 0
    first = list(items[0]["input_ids"])
    limit = len(first)
    for it in items:
        ids = it["input_ids"]
        labels = _scored_labels(it, score_first=False)
        scored = next((t for t, lab in enumerate(labels) if t >= 1 and lab != IGNORE_INDEX), len(ids))
        limit = min(limit, scored - 1, len(ids) - 1)
        n = 0
        while n < limit and ids[n] == first[n]:
            n += 1
        limit = n
        if limit <= 0:
            return 0
    return limit


def _cache_of(output: Any) -> Any:
    """The key/value cache of a forward pass (``cache`` in transformers >= 5, ``past_key_values`` before)."""
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else output.past_key_values


@torch.no_grad()
def token_stats(model: torch.nn.Module, items: Sequence[Item], *, pad_id: int = 0, batch_size: int = 16,
                progress: Callable[[int], None] | None = None, share_prefix: bool = True) -> list[TokenStats]:
    """``ℓ_t``, ``μ_t``, ``σ_t`` of every scored token of every item under ``model`` (eval mode, float64).

    Two exact reformulations of the plain batched forward, for speed: items are batched by length (less
    padding; results are returned in the given order), and with ``share_prefix`` the prefix common to every
    item (:func:`shared_prefix_length`) is run once and its key/value cache repeated across each batch (the
    suffix then attends to it as to its own first tokens: causal attention makes the prefix's keys and values
    independent of what follows). Equal to the plain forward up to float rounding (tested)."""
    was = model.training
    model.eval()
    out: list[TokenStats | None] = [None] * len(items)
    prefix = shared_prefix_length(items) if share_prefix else 0
    prefix_cache = None
    if prefix > 0:
        head = torch.tensor([list(items[0]["input_ids"])[:prefix]], dtype=torch.long)
        prefix_cache = _cache_of(model(input_ids=head, use_cache=True))
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    try:
        for start in range(0, len(order), batch_size):
            rows_idx = order[start:start + batch_size]
            chunk = [items[i] for i in rows_idx]
            batch = _collate(chunk, pad_id, score_first=False)
            ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(chunk))
                # logits of positions prefix..W-1; position p predicts the label at p + 1
                logits = model(input_ids=ids[:, prefix:], attention_mask=mask, cache=cache, use_cache=True).logits
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits
            logits, target = logits[:, :-1], labels[:, prefix + 1:]
            for row, index in enumerate(rows_idx):
                sel = target[row] != IGNORE_INDEX
                if not bool(sel.any()):
                    raise ConfigError(f"example {index} has no scored (labelled) token")
                # only the scored positions, in float64 (the vocabulary-wide sums of Min-K%++)
                logprobs = torch.log_softmax(logits[row][sel].double(), dim=-1)
                probs = logprobs.exp()
                mu = (probs * logprobs).sum(-1)
                sigma = ((probs * logprobs.square()).sum(-1) - mu.square()).clamp_min(1e-12).sqrt()
                lp = logprobs.gather(-1, target[row][sel][:, None])[:, 0]
                out[index] = TokenStats(lp.numpy(), mu.numpy(), sigma.numpy())
            if progress is not None:
                progress(len(chunk))
    finally:
        model.train(was)
    return [s for s in out if s is not None]  # every index was filled


def _lowest_mean(values: np.ndarray, k: float) -> float:
    n = max(1, int(math.ceil(k * values.size)))
    return float(np.sort(values)[:n].mean())


def loss_score(s: TokenStats) -> float:
    return s.mean_logp


def zlib_score(s: TokenStats, text: bytes) -> float:
    return float(s.logp.sum()) / (8.0 * len(zlib.compress(text)))


def min_k_score(s: TokenStats, k: float = 0.2) -> float:
    return _lowest_mean(s.logp, k)


def min_k_pp_score(s: TokenStats, k: float = 0.2) -> float:
    return _lowest_mean((s.logp - s.mu) / s.sigma, k)


def rmia_scores(target: np.ndarray, reference: np.ndarray, pop_target: np.ndarray, pop_reference: np.ndarray, *,
                gamma: float = 1.0) -> np.ndarray:
    """RMIA from per-example probabilities (``p_θ`` and ``p_ref`` of the scored examples and of the
    population): the fraction of population points ``z`` that ``x`` dominates by a factor ``γ``."""
    ratio_x = np.log(target) - np.log(reference)
    ratio_z = np.log(pop_target) - np.log(pop_reference)
    return np.asarray((ratio_x[:, None] - ratio_z[None, :] >= math.log(gamma)).mean(axis=1), dtype=np.float64)


def lira_scores(phi: np.ndarray, phi_shadow: np.ndarray, in_mask: np.ndarray, *, fixed_variance: bool | None = None
                ) -> np.ndarray:
    """Online LiRA: ``phi`` (n,) on the target, ``phi_shadow`` (S, n) on the shadows, ``in_mask`` (S, n)
    true where shadow ``s`` trained on example ``i``. Returns the Gaussian log-likelihood ratio."""
    n_in, n_out = in_mask.sum(0), (~in_mask).sum(0)
    if np.any(n_in < 1) or np.any(n_out < 1):
        raise ConfigError("online LiRA needs every example IN at least one shadow and OUT of at least one")
    if fixed_variance is None:
        fixed_variance = bool(min(n_in.min(), n_out.min()) < 4)
    mu_in = (phi_shadow * in_mask).sum(0) / n_in
    mu_out = (phi_shadow * ~in_mask).sum(0) / n_out
    if fixed_variance:
        dev_in = (phi_shadow - mu_in)[in_mask]
        dev_out = (phi_shadow - mu_out)[~in_mask]
        pooled = np.concatenate([dev_in, dev_out])
        spread = float(np.sqrt(np.mean(pooled ** 2))) if pooled.size else 0.0
        if spread == 0.0:  # one shadow per side: the deviations vanish; use the spread of the IN-OUT gaps
            spread = float(np.std(mu_in - mu_out))
        sd_in = sd_out = np.full(phi.shape, max(spread, 1e-6))
    else:
        sd_in = np.sqrt(((phi_shadow - mu_in) ** 2 * in_mask).sum(0) / np.maximum(n_in - 1, 1)) + 1e-6
        sd_out = np.sqrt(((phi_shadow - mu_out) ** 2 * ~in_mask).sum(0) / np.maximum(n_out - 1, 1)) + 1e-6

    def logpdf(x: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
        return np.asarray(-0.5 * ((x - mu) / sd) ** 2 - np.log(sd), dtype=np.float64)

    return logpdf(phi, mu_in, sd_in) - logpdf(phi, mu_out, sd_out)


def shadow_splits(n: int, n_shadows: int, seed: int) -> np.ndarray:
    """``(S, n)`` IN masks: shadow pairs trained on complementary random halves (each example IN for S/2)."""
    if n_shadows < 2 or n_shadows % 2:
        raise ConfigError(f"LiRA needs an even number of shadow models >= 2, got {n_shadows}")
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_shadows, n), dtype=bool)
    for pair in range(n_shadows // 2):
        half = rng.permutation(n)[: n // 2]
        masks[2 * pair, half] = True
        masks[2 * pair + 1] = ~masks[2 * pair]
    return masks


@dataclass(frozen=True, slots=True)
class ShadowRecipe:
    """How the attacker trains each shadow: ``lora_r`` > 0 adds a LoRA adapter of that rank on the
    attention projections (``target_modules``: peft's default for the architecture when ``None``);
    0 trains the parameters of the base that require grad (all of a plain model; the adapter of a peft
    model, as the run did); ``steps`` AdamW steps of ``batch_size`` examples at ``lr``, each batch drawn
    with replacement — or, with ``epochs`` > 0, ``epochs`` passes over a seeded permutation of the items
    (``steps`` is then ignored): every IN example is trained on, as a fedguard client trains on each
    example of its round once."""

    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    lora_r: int = 0
    lora_alpha: int = 32
    target_modules: tuple[str, ...] | None = None
    epochs: int = 0

    def __post_init__(self) -> None:
        problems = [f"{k} must be > 0, got {v}" for k, v in (("steps", self.steps), ("batch_size", self.batch_size),
                                                             ("lr", self.lr)) if not v > 0]
        if self.lora_r < 0:
            problems.append(f"lora_r must be >= 0, got {self.lora_r}")
        if self.epochs < 0:
            problems.append(f"epochs must be >= 0, got {self.epochs}")
        if problems:
            raise ConfigError.collect(problems)


def _shadow_batches(n: int, recipe: ShadowRecipe, gen: torch.Generator) -> list[list[int]]:
    """The index batches of a shadow fine-tune (see :class:`ShadowRecipe`)."""
    size = min(recipe.batch_size, n)
    if recipe.epochs:
        out: list[list[int]] = []
        for _ in range(recipe.epochs):
            order = torch.randperm(n, generator=gen).tolist()
            out.extend(order[i:i + size] for i in range(0, n, size))
        return out
    return [torch.randint(0, n, (size,), generator=gen).tolist() for _ in range(recipe.steps)]


def train_shadow(base: torch.nn.Module, items: Sequence[Item], recipe: ShadowRecipe, *, seed: int,
                 pad_id: int = 0) -> torch.nn.Module:
    """A shadow fine-tune of a copy of ``base`` on ``items`` (the attacker's own, plain torch loop)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    if recipe.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=0.0,
                                                 target_modules=list(recipe.target_modules)
                                                 if recipe.target_modules else None))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for idx in _shadow_batches(len(items), recipe, gen):
        batch = _collate([items[i] for i in idx], pad_id, score_first=True)
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


@dataclass(frozen=True, slots=True)
class MembershipConfig:
    """What the suite runs: ``k`` for Min-K%(++), RMIA's ``gamma`` and offline ``a``, ``shadows`` for
    LiRA (0: LiRA is skipped), the shadow recipe, bootstrap draws and the seed. ``lira_nonmembers`` > 0
    restricts LiRA to every member and the first that many non-members (each shadow then trains on half of
    that set and scores only it, which bounds the shadows' cost when the non-member pool is large; RMIA then
    stays offline, on the base model alone)."""

    k: float = 0.2
    gamma: float = 1.0
    rmia_a: float = 0.3
    shadows: int = 0
    recipe: ShadowRecipe = field(default_factory=ShadowRecipe)
    n_boot: int = 1000
    seed: int = 0
    levels: tuple[float, ...] = FPR_LEVELS
    lira_nonmembers: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.lira_nonmembers < 0 or self.lira_nonmembers == 1:
            problems.append(f"lira_nonmembers must be 0 (all) or >= 2, got {self.lira_nonmembers}")
        if not 0 < self.k <= 1:
            problems.append(f"k must be in (0, 1], got {self.k}")
        if not self.gamma > 0:
            problems.append(f"gamma must be > 0, got {self.gamma}")
        if not 0 <= self.rmia_a <= 1:
            problems.append(f"rmia_a must be in [0, 1], got {self.rmia_a}")
        if self.shadows < 0 or self.shadows % 2:
            problems.append(f"shadows must be 0 or an even number >= 2, got {self.shadows}")
        if problems:
            raise ConfigError.collect(problems)


@dataclass(frozen=True, slots=True)
class MembershipResult:
    """One attack's scores and ROC summary."""

    attack: str
    roc: RocSummary
    member_scores: np.ndarray = field(repr=False)
    nonmember_scores: np.ndarray = field(repr=False)
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"attack": self.attack, **self.roc.to_json(), "note": self.note}


@dataclass(frozen=True, slots=True)
class MembershipReport:
    """Every attack run against one target, with what it was run on."""

    target: str
    results: tuple[MembershipResult, ...]
    n_members: int
    n_nonmembers: int
    n_population: int
    shadows: int
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "n_members": self.n_members, "n_nonmembers": self.n_nonmembers,
                "n_population": self.n_population, "shadows": self.shadows, "notes": list(self.notes),
                "results": [r.to_json() for r in self.results]}


def items_digest(items: Sequence[Item]) -> str:
    """A digest of tokenised items (their ids and labels, in order): the key of a reference-stats cache."""
    h = hashlib.sha256()
    for it in items:
        h.update(np.asarray(list(it["input_ids"]), dtype=np.int64).tobytes() + b"|")
        h.update(np.asarray(_labels(it), dtype=np.int64).tobytes() + b";")
    return h.hexdigest()


def run_membership(target: torch.nn.Module, members: Sequence[Item], nonmembers: Sequence[Item], *,
                   reference: torch.nn.Module | None = None, population: Sequence[Item] = (),
                   texts: Mapping[str, Sequence[bytes]] | None = None, config: MembershipConfig | None = None,
                   pad_id: int = 0, target_name: str = "target", progress: bool = False,
                   stats_cache: MutableMapping[tuple[str, str], list[TokenStats]] | None = None,
                   reference_key: str | None = None) -> MembershipReport:
    """Run every applicable attack. ``reference``: the base model (``ref``, ``rmia``, and the model LiRA's
    shadows start from); ``population``: non-member examples disjoint from ``nonmembers`` (RMIA);
    ``texts``: ``{"members": [...], "nonmembers": [...]}`` raw bytes for zlib (token ids otherwise).
    ``stats_cache`` with ``reference_key`` (a name of the reference's weights): the reference's token
    statistics are looked up by ``(reference_key, items_digest(items))`` and stored there, so audits of
    several runs from one base model and data score the reference once."""
    from tqdm import tqdm

    cfg = config or MembershipConfig()
    if len(members) < 2 or len(nonmembers) < 2:
        raise ConfigError(f"need at least 2 members and 2 non-members, got {len(members)} and {len(nonmembers)}")
    if cfg.shadows and reference is None:
        raise ConfigError("LiRA's shadow models start from the base model: pass reference=")
    everything = list(members) + list(nonmembers)
    n_m = len(members)
    lira_idx = np.arange(len(everything))
    if 0 < cfg.lira_nonmembers < len(nonmembers):
        lira_idx = np.r_[np.arange(n_m), n_m + np.arange(cfg.lira_nonmembers)]
    subset = lira_idx.size < len(everything)
    shadow_pop = 0 if subset else len(population)
    total = len(everything) * (1 + (reference is not None)) + len(population) * (1 + (reference is not None)) + (
        cfg.shadows * (lira_idx.size + shadow_pop) if reference is not None else 0)
    bar = tqdm(total=total, desc="membership inference", unit="ex", disable=not progress)
    notes: list[str] = []

    def stats(model: torch.nn.Module, items: Sequence[Item]) -> list[TokenStats]:
        return token_stats(model, items, pad_id=pad_id, progress=bar.update) if items else []

    def ref_stats(model: torch.nn.Module, items: Sequence[Item]) -> list[TokenStats]:
        if stats_cache is None or reference_key is None or not items:
            return stats(model, items)
        key = (reference_key, items_digest(items))
        if key in stats_cache:
            bar.update(len(items))
        else:
            stats_cache[key] = stats(model, items)
        return stats_cache[key]

    tgt = stats(target, everything)
    raw: dict[str, np.ndarray] = {}
    note: dict[str, str] = {}
    raw["loss"] = np.array([loss_score(s) for s in tgt])
    if texts is not None:
        blobs = list(texts["members"]) + list(texts["nonmembers"])
    else:
        blobs = [np.asarray(list(it["input_ids"]), dtype=np.int64).tobytes() for it in everything]
        note["zlib"] = "compressed token ids (no text given)"
    raw["zlib"] = np.array([zlib_score(s, b) for s, b in zip(tgt, blobs)])
    raw["min_k"] = np.array([min_k_score(s, cfg.k) for s in tgt])
    raw["min_k_pp"] = np.array([min_k_pp_score(s, cfg.k) for s in tgt])
    phi = raw["loss"]
    pop_t = np.exp([s.mean_logp for s in stats(target, population)]) if population else np.zeros(0)
    if reference is not None:
        ref = ref_stats(reference, everything)
        phi_ref = np.array([s.mean_logp for s in ref])
        raw["ref"] = phi - phi_ref
        pop_r = np.exp([s.mean_logp for s in ref_stats(reference, population)]) if population else np.zeros(0)
        scored = [everything[i] for i in lira_idx]
        masks = shadow_splits(len(scored), cfg.shadows, cfg.seed) if cfg.shadows else np.zeros((0, 0), bool)
        phi_shadow = np.zeros((cfg.shadows, len(scored)))
        pop_shadow = np.zeros((cfg.shadows, shadow_pop))
        for s in range(cfg.shadows):
            chosen = [scored[i] for i in np.nonzero(masks[s])[0]]
            shadow = train_shadow(reference, chosen, cfg.recipe, seed=cfg.seed * 1000 + s, pad_id=pad_id)
            phi_shadow[s] = [t.mean_logp for t in stats(shadow, scored)]
            if shadow_pop:
                pop_shadow[s] = [t.mean_logp for t in stats(shadow, population)]
            del shadow
        if population:
            p_base = np.exp(phi_ref)
            if cfg.shadows and not subset:
                out_sum = (np.exp(phi_shadow) * ~masks).sum(0) + p_base
                p_ref = out_sum / ((~masks).sum(0) + 1)
                pop_ref = (np.exp(pop_shadow).sum(0) + pop_r) / (cfg.shadows + 1)
            else:
                p_ref = 0.5 * ((1 + cfg.rmia_a) * p_base + (1 - cfg.rmia_a))
                pop_ref = 0.5 * ((1 + cfg.rmia_a) * pop_r + (1 - cfg.rmia_a))
                note["rmia"] = f"offline (base model only, a={cfg.rmia_a})"
            raw["rmia"] = rmia_scores(np.exp(phi), p_ref, pop_t, pop_ref, gamma=cfg.gamma)
        else:
            notes.append("rmia skipped: no population examples")
        if cfg.shadows:
            raw["lira"] = lira_scores(phi[lira_idx], phi_shadow, masks)
            note["lira"] = f"online, {cfg.shadows} shadows ({cfg.shadows // 2} IN / {cfg.shadows // 2} OUT per example)"
            if subset:
                note["lira"] += f"; on all {n_m} members and the first {cfg.lira_nonmembers} non-members"
    else:
        notes.append("ref, rmia and lira skipped: no reference (base) model")
    bar.close()
    results = []
    for i, name in enumerate(a for a in ATTACKS if a in raw):
        scores = raw[name]
        summary = summarize(scores[:n_m], scores[n_m:], levels=cfg.levels, n_boot=cfg.n_boot, seed=cfg.seed + i)
        results.append(MembershipResult(name, summary, scores[:n_m], scores[n_m:], note.get(name, "")))
    return MembershipReport(target_name, tuple(results), n_m, len(nonmembers), len(population), cfg.shadows,
                            tuple(notes))
