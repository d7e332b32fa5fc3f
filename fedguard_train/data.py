"""Instruction -> response data, a held-out split, and a non-IID partition across clients.

The default dataset is built from WordNet 3.0 as shipped by Debian's ``wordnet-base`` package
(``/usr/share/wordnet``; licence: the WordNet 3.0 licence, permissive, see ``docs/data.md``): for each
common English lemma (one used in WordNet's sense-tagged concordance) its most frequent sense becomes

    prompt   = 'Define the noun "harbor".'
    response = 'a sheltered port where ships can take on or discharge cargo'

Each pair carries a natural attribute, the sense's *lexicographer file* (``noun.artifact``,
``verb.motion``, ``adj.all``, ...: a topic), and the non-IID partition gives each client its own topics
(``partition: attribute``), or draws per-topic client shares from Dir(alpha) (``partition: dirichlet``).
Users can bring their own ``{"prompt", "response"[, "attribute"]}`` JSONL instead.

Labels mask the prompt tokens (-100), so the loss and perplexity cover response tokens only.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedguard.errors import ConfigError
from fedguard_train.config import DataConfig

WORDNET_ROOT = Path("/usr/share/wordnet")
WORDNET_INSTALL = "apt-get install wordnet-base   (`make install` does this where it runs as root)"
IGNORE_INDEX = -100

# WordNet 3.0's lexicographer files, by number (lexnames(5WN)).
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}


@dataclass(frozen=True, slots=True)
class Example:
    prompt: str
    response: str
    attribute: str = ""


def _parse_data_line(line: str) -> tuple[int, str, str] | None:
    """(lex file number, first lemma, definition) of one ``data.<pos>`` line (None for header lines)."""
    if line.startswith("  ") or "|" not in line:
        return None
    head, gloss = line.split("|", 1)
    fields = head.split()
    lexfile = int(fields[1])
    definition = gloss.strip().split('; "', 1)[0].split(';', 1)[0].strip().strip('"').strip()
    return lexfile, fields[4], definition


def load_wordnet(root: Path = WORDNET_ROOT, *, max_examples: int, seed: int) -> list[Example]:
    """Define-the-word pairs from WordNet, one per common lemma (its most frequent sense)."""
    if not (root / "data.noun").is_file():
        raise ConfigError(f"WordNet is not installed at {root}; install it with: {WORDNET_INSTALL}, or set "
                          "data.source: jsonl with your own data")
    examples = []
    for pos, pos_word in _POS.items():
        data_path, index_path = root / f"data.{pos}", root / f"index.{pos}"
        offsets: dict[int, str] = {}
        with index_path.open(encoding="latin-1") as index:
            for line in index:
                if line.startswith("  "):
                    continue
                parts = line.split()
                lemma, p_cnt = parts[0], int(parts[3])
                tagsense_cnt = int(parts[5 + p_cnt])
                if tagsense_cnt < 1 or not lemma.isalpha() or len(lemma) < 3:
                    continue
                first_offset = int(parts[6 + p_cnt])
                offsets.setdefault(first_offset, lemma)
        with data_path.open(encoding="latin-1") as data:
            for line in data:
                offset = line[:8]
                if not offset.isdigit() or int(offset) not in offsets:
                    continue
                parsed = _parse_data_line(line)
                if parsed is None or not parsed[2] or len(parsed[2].split()) > 20:
                    continue
                lexfile, _, definition = parsed
                lemma = offsets[int(offset)]
                examples.append(Example(f'Define the {pos_word} "{lemma}".', definition, LEXNAMES[lexfile]))
    examples.sort(key=lambda e: (e.attribute, e.prompt))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(examples))[:max_examples]
    return [examples[i] for i in sorted(order)]


def load_jsonl(path: str | Path, *, max_examples: int | None = None) -> list[Example]:
    """``{"prompt": str, "response": str[, "attribute": str]}`` per line; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file {str(path)!r} does not exist")
    out = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError(f"{path}:{number}: not valid UTF-8 (byte {err.start + 1} of the line: "
                                  f"{raw[err.start:err.start + 1]!r})") from err
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not isinstance(
                record.get("response"), str
            ):
                raise ConfigError(f"{path}:{number}: a record needs string fields 'prompt' and 'response'")
            extra = set(record) - {"prompt", "response", "attribute"}
            if extra:
                raise ConfigError(f"{path}:{number}: unknown field(s) {sorted(extra)}")
            out.append(Example(record["prompt"], record["response"], str(record.get("attribute", ""))))
    if not out:
        raise ConfigError(f"data file {str(path)!r} holds no records")
    return out[:max_examples] if max_examples else out


def load_examples(config: DataConfig, *, seed: int) -> list[Example]:
    if config.source == "jsonl":
        return load_jsonl(config.path or "", max_examples=config.max_examples)
    return load_wordnet(max_examples=config.max_examples, seed=seed)


def train_test_split(examples: Sequence[Example], test_size: int, *, seed: int) -> tuple[list[Example], list[Example]]:
    """A held-out test split of ``test_size`` examples, stratified by nothing (uniform), fixed by ``seed``."""
    if not 1 <= test_size < len(examples):
        raise ConfigError(f"test_size must be in [1, {len(examples)}) for {len(examples)} examples, got {test_size}")
    order = np.random.default_rng(seed).permutation(len(examples))
    test = [examples[i] for i in sorted(order[:test_size])]
    train = [examples[i] for i in sorted(order[test_size:])]
    return train, test


def partition(examples: Sequence[Example], n_clients: int, method: str, *, alpha: float = 0.5,
              seed: int = 0) -> list[list[Example]]:
    """Split training examples across clients.

    * ``attribute``: whole attribute groups (topics) go to clients, largest group first to the client
      with the fewest examples so far: every client sees its own topics only.
    * ``dirichlet``: for each attribute, client shares ~ Dir(alpha) (small alpha: more skew).
    * ``iid``: a uniform shuffle.

    Raises :class:`ConfigError` naming the client when one is left without data.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[Example]] = [[] for _ in range(n_clients)]
    groups: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        groups[ex.attribute].append(ex)
    if method == "attribute":
        if len(groups) < n_clients:
            raise ConfigError(f"partition 'attribute' needs at least {n_clients} distinct attributes, got "
                              f"{len(groups)}; use 'dirichlet' or 'iid'")
        for name in sorted(groups, key=lambda g: (-len(groups[g]), g)):
            target = min(range(n_clients), key=lambda c: (len(parts[c]), c))
            parts[target].extend(groups[name])
    elif method == "dirichlet":
        for name in sorted(groups):
            members = groups[name]
            shares = rng.dirichlet([alpha] * n_clients)
            owners = rng.choice(n_clients, size=len(members), p=shares)
            for ex, owner in zip(members, owners):
                parts[int(owner)].append(ex)
    elif method == "iid":
        for i, idx in enumerate(rng.permutation(len(examples))):
            parts[i % n_clients].append(examples[int(idx)])
    else:
        raise ConfigError(f"partition must be 'attribute', 'dirichlet' or 'iid', got {method!r}")
    empty = [c for c, p in enumerate(parts) if not p]
    if empty:
        raise ConfigError(f"client {empty[0]} has no training data after the {method!r} partition of "
                          f"{len(examples)} examples; use more examples, fewer clients or another partition")
    return parts


def partition_report(parts: Sequence[Sequence[Example]]) -> list[dict[str, Any]]:
    """Per client: example count and its most common attributes (shown before training)."""
    report = []
    for client, items in enumerate(parts):
        counts = Counter(ex.attribute for ex in items)
        report.append({"client": client, "examples": len(items), "attributes": len(counts),
                       "top": ", ".join(f"{a} ({n})" for a, n in counts.most_common(3))})
    return report


def format_prompt(tokenizer: Any, prompt: str) -> str:
    """The model's chat template when it has one, else a plain instruction template."""
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True))
    return f"### Instruction:\n{prompt}\n### Response:\n"


def tokenize(examples: Sequence[Example], tokenizer: Any, config: DataConfig) -> list[dict[str, list[int]]]:
    """Token ids and labels per example; prompt tokens are masked out of the labels."""
    eos = tokenizer.eos_token_id
    out = []
    for ex in examples:
        prompt_ids = tokenizer(format_prompt(tokenizer, ex.prompt), add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(ex.response, add_special_tokens=False)["input_ids"]
        prompt_ids = prompt_ids[-config.max_prompt_tokens:]
        response_ids = response_ids[: config.max_response_tokens - 1] + [eos]
        out.append({"input_ids": prompt_ids + response_ids,
                    "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
                    "prompt_ids": prompt_ids})
    return out


def collate(items: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch for training / perplexity (padding is masked in attention and labels)."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        ids[row, :n] = torch.tensor(it["input_ids"])
        labels[row, :n] = torch.tensor(it["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
