"""The server's public data for FedCoLLM's mutual distillation, disjoint from every client's task data.

FedCoLLM (Fan et al., arXiv 2411.11707) and FedMKT (COLING 2025) distil between the server's LLM and the
clients' small model on an auxiliary dataset the *server* holds: nothing of a client's private data is
needed for it. Sources (``co.public_data``):

* ``common-licenses`` (default): the licence texts of Debian's ``base-files`` package (the corpus FedOST
  distils its emulator on; licence in docs/data.md), cut into windows of ``seq_len`` tokens; every token
  is a label (plain language modelling);
* ``wordnet-disjoint``: "define the word" pairs from WordNet 3.0 (Debian ``wordnet-base``, licence in
  docs/data.md) whose lemma occurs in **none** of the run's examples (clients' training data and the
  held-out test split), in the task's instruction format; labels on the response only (in-domain
  auxiliary data, as in FedCoLLM's experiments, yet no client's example nor any test word);
* a path: a ``.jsonl`` file of ``{"prompt", "response"}`` records (any record whose prompt is one of the
  run's prompts is dropped), or a ``.txt`` file / directory of them (windows as above).

Items are tokenised with the clients' (small model's) tokeniser exactly as :func:`fedguard_train.data.tokenize`
does (``input_ids``, ``labels`` with ``-100`` on prompt tokens); the trainer re-tokenises their text for an
LLM with another tokeniser.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedguard.errors import ConfigError
from fedguard_train.config import DataConfig
from fedguard_train.data import (
    _POS,
    WORDNET_ROOT,
    Example,
    _parse_data_line,
    load_jsonl,
    load_wordnet,
    tokenize,
)

Items = list[dict[str, list[int]]]

_LEMMA = re.compile(r'"([^"]+)"')


def lemma_of(prompt: str) -> str:
    """The quoted word of a "Define the noun "x"." prompt (the whole prompt when nothing is quoted)."""
    found = _LEMMA.search(prompt)
    return (found.group(1) if found else prompt).lower()


def disjoint_pairs(candidates: Sequence[Example], run_examples: Sequence[Example]) -> list[Example]:
    """The candidates whose lemma (or prompt) occurs in none of ``run_examples``."""
    taken = {lemma_of(ex.prompt) for ex in run_examples} | {ex.prompt for ex in run_examples}
    return [ex for ex in candidates if lemma_of(ex.prompt) not in taken and ex.prompt not in taken]


def text_windows(texts: Sequence[str], tokenizer: Any, seq_len: int, count: int) -> Items:
    """``count`` consecutive ``seq_len``-token windows of the concatenated texts, every token a label."""
    from fedguard_train.emulator import text_chunks

    chunks = text_chunks(texts, tokenizer, seq_len, seq_len * count)
    if not chunks:
        raise ConfigError(f"the public text holds fewer than {seq_len} tokens")
    return [{"input_ids": list(c), "labels": list(c)} for c in chunks[:count]]


def load_public(source: str, *, tokenizer: Any, data: DataConfig, run_examples: Sequence[Example], count: int,
                seq_len: int, seed: int) -> Items:
    """At most ``count`` public items of ``source`` (see the module docstring), tokenised for the clients'
    model; :class:`ConfigError` when the source is missing or holds nothing usable."""
    from fedguard_train.emulator import public_texts

    if source == "wordnet-disjoint":
        pool = load_wordnet(max_examples=10**7, seed=seed)
        pairs = disjoint_pairs(pool, run_examples)
    elif source.endswith(".jsonl"):
        pairs = disjoint_pairs(load_jsonl(source), run_examples)
    else:
        if source != "common-licenses" and not Path(source).exists():
            raise ConfigError(f"co.public_data {source!r} is neither 'common-licenses', 'wordnet-disjoint' nor an "
                              f"existing .txt/.jsonl file or directory")
        return text_windows(public_texts(source), tokenizer, seq_len, count)
    if not pairs:
        raise ConfigError(f"co.public_data {source!r} holds no record disjoint from the run's data")
    order = np.random.default_rng(seed).permutation(len(pairs))[:count]
    return tokenize([pairs[i] for i in sorted(order)], tokenizer, data)


def unused_wordnet_pairs(root: Path = WORDNET_ROOT) -> list[Example]:
    """"Define the word" pairs that **no run can draw** with ``data.source: wordnet``, whatever its seed or
    ``max_examples``: :func:`fedguard_train.data.load_wordnet` takes only lemmas with a tagged sense
    (``tagsense_cnt >= 1``) and their first synset; these are the lemmas with *no* tagged sense, each with its
    first synset, keeping only lemmas that are no drawable lemma under any part of speech, synsets that are
    no drawable lemma's first synset, and definitions whose wording is no drawable synset's. Used to heal a layer-dropped model
    (fedguard_train/healing.py) on text of the task's kind without touching any client's or test example."""
    if not (root / "data.noun").is_file():
        raise ConfigError(f"WordNet is not installed at {root}")
    drawable_lemmas: set[str] = set()
    drawable_offsets: set[tuple[str, int]] = set()
    unused: dict[str, dict[int, str]] = {}
    for pos in _POS:
        with (root / f"index.{pos}").open(encoding="latin-1") as index:
            for line in index:
                if line.startswith("  "):
                    continue
                parts = line.split()
                lemma, p_cnt = parts[0], int(parts[3])
                if not lemma.isalpha() or len(lemma) < 3:
                    continue
                first_offset = int(parts[6 + p_cnt])
                if int(parts[5 + p_cnt]) >= 1:
                    drawable_lemmas.add(lemma)
                    drawable_offsets.add((pos, first_offset))
                else:
                    unused.setdefault(pos, {}).setdefault(first_offset, lemma)
    out = []
    drawable_definitions: set[str] = set()
    for pos, pos_word in _POS.items():
        offsets = {o: lem for o, lem in unused.get(pos, {}).items()
                   if (pos, o) not in drawable_offsets and lem not in drawable_lemmas}
        with (root / f"data.{pos}").open(encoding="latin-1") as data:
            for line in data:
                offset = line[:8]
                if not offset.isdigit():
                    continue
                parsed = _parse_data_line(line)
                if parsed is None or not parsed[2]:
                    continue
                if (pos, int(offset)) in drawable_offsets:
                    drawable_definitions.add(parsed[2])
                elif int(offset) in offsets and len(parsed[2].split()) <= 20:
                    out.append(Example(f'Define the {pos_word} "{offsets[int(offset)]}".', parsed[2]))
    # two synsets can share a gloss's wording ("in a ... manner"): keep no drawable definition
    return [ex for ex in out if ex.response not in drawable_definitions]


__all__ = ["disjoint_pairs", "lemma_of", "load_public", "text_windows", "unused_wordnet_pairs"]
