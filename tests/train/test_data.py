"""fedguard_train.data: WordNet parsing, JSONL validation, non-IID partitions, label masking."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedguard.errors import ConfigError
from fedguard_train.config import DataConfig
from fedguard_train.data import (
    IGNORE_INDEX,
    Example,
    collate,
    load_jsonl,
    load_wordnet,
    partition,
    partition_report,
    tokenize,
    train_test_split,
)
from fedguard_train.models import byte_tokenizer

# Lines in WordNet 3.0's own formats (index.<pos>: lemma pos synset_cnt p_cnt [ptr...] sense_cnt
# tagsense_cnt offsets...; data.<pos>: offset lex_filenum ss_type w_cnt word lex_id ... | gloss).
INDEX_NOUN = [
    "  1 This software and database is being provided to you",
    "harbor n 2 1 @ 2 1 08583682 04484580",
    "zebu n 1 1 @ 1 0 02405101",
    "sea_lion n 1 1 @ 1 3 02077923",
]
DATA_NOUN = [
    "  1 This software and database is being provided to you",
    '08583682 15 n 02 harbor 0 harbour 0 001 @ 08583000 n 0000 | a sheltered port where ships can '
    'take on or discharge cargo; "the ship reached the harbor"  ',
    "02405101 05 n 01 zebu 0 001 @ 02403000 n 0000 | domesticated ox having a humped back  ",
]


def _wordnet(root: Path) -> Path:
    root.mkdir()
    (root / "index.noun").write_text("\n".join(INDEX_NOUN) + "\n")
    (root / "data.noun").write_text("\n".join(DATA_NOUN) + "\n")
    for pos in ("verb", "adj", "adv"):
        (root / f"index.{pos}").write_text("")
        (root / f"data.{pos}").write_text("")
    return root


def test_wordnet_pairs_use_the_most_frequent_sense_of_common_lemmas(tmp_path: Path) -> None:
    examples = load_wordnet(_wordnet(tmp_path / "wn"), max_examples=10, seed=0)
    # zebu has no sense-tagged use and sea_lion is not a single word: only harbor qualifies
    assert examples == [Example('Define the noun "harbor".',
                                "a sheltered port where ships can take on or discharge cargo", "noun.location")]


def test_missing_wordnet_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="apt-get install wordnet-base"):
        load_wordnet(tmp_path, max_examples=5, seed=0)


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": 1, "response": "b"}\n')
    with pytest.raises(ConfigError, match=r"d.jsonl:2: a record needs string fields"):
        load_jsonl(path)
    path.write_text('{"prompt": "a", "response": "b", "label": 3}\n')
    with pytest.raises(ConfigError, match=r"d.jsonl:1: unknown field\(s\) \['label'\]"):
        load_jsonl(path)
    path.write_text("not json\n")
    with pytest.raises(ConfigError, match="d.jsonl:1: not valid JSON"):
        load_jsonl(path)


def _examples(n: int = 60) -> list[Example]:
    return [Example(f"p{i}", f"r{i}", f"t{i % 4}") for i in range(n)]


def test_attribute_partition_gives_each_client_its_own_topics() -> None:
    parts = partition(_examples(), 2, "attribute")
    topics = [{e.attribute for e in p} for p in parts]
    assert topics[0].isdisjoint(topics[1])
    assert sum(len(p) for p in parts) == 60
    report = partition_report(parts)
    assert [r["examples"] for r in report] == [len(p) for p in parts]


def test_dirichlet_partition_is_skewed_and_complete() -> None:
    parts = partition(_examples(400), 3, "dirichlet", alpha=0.1, seed=1)
    assert sorted(e.prompt for p in parts for e in p) == sorted(f"p{i}" for i in range(400))
    shares = [[sum(e.attribute == f"t{t}" for e in p) / 100 for t in range(4)] for p in parts]
    assert max(max(s) for s in shares) > 0.8  # alpha=0.1: some client holds most of some topic


def test_a_client_left_without_data_is_named() -> None:
    with pytest.raises(ConfigError, match="needs at least 5 distinct attributes"):
        partition(_examples(), 5, "attribute")
    with pytest.raises(ConfigError, match="client 3 has no training data"):
        partition(_examples(3), 4, "iid")


def test_split_is_disjoint_and_reproducible() -> None:
    train, test = train_test_split(_examples(), 10, seed=4)
    assert len(test) == 10 and not set(train) & set(test)
    assert train_test_split(_examples(), 10, seed=4) == (train, test)


def test_prompt_tokens_are_masked_out_of_the_labels() -> None:
    tok = byte_tokenizer()
    items = tokenize([Example("Say hi", "hi there")], tok, DataConfig(max_response_tokens=40))
    ids, labels = items[0]["input_ids"], items[0]["labels"]
    n_prompt = len(items[0]["prompt_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tok.decode(labels[n_prompt:-1]) == "hi there" and labels[-1] == tok.eos_token_id
    assert ids[n_prompt:] == labels[n_prompt:]
    batch = collate(items + tokenize([Example("x", "y")], tok, DataConfig()), tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert int(batch["attention_mask"][1].sum()) == len(tokenize([Example("x", "y")], tok, DataConfig())[0]["input_ids"])


def test_jsonl_with_invalid_utf8_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    with pytest.raises(ConfigError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        load_jsonl(path)
