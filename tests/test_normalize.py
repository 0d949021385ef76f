"""The one normaliser every leak filter uses (pipeline/data/normalize.py, issue 30 class 1): spellings of
one sentence share a key, different sentences do not, near-duplicates (a number changed) are found,
and the leak guard says which held-out text a candidate matches and why."""

from __future__ import annotations

import random
import string
import time

import pytest

from pipeline.data.normalize import (
    NEAR_DUPLICATE_SIMILARITY,
    SIMILAR_SIMILARITY,
    LeakGuard,
    clean,
    drop_leaks,
    near_key,
    normalize,
    similarity,
)
from tests.helpers import spellings

SENTENCE = ("Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period in 2007 "
            "representing 7.7 % of net sales .")


@pytest.mark.parametrize("name", list(spellings(SENTENCE)))
def test_every_spelling_of_a_sentence_has_its_key(name):
    assert normalize(spellings(SENTENCE)[name]) == normalize(SENTENCE)


def test_quote_and_dash_variants_are_one():
    assert normalize("\u201cNet sales\u201d fell \u2013 sharply \u2014 in Q3") == normalize('"Net sales" fell - sharply - in Q3')
    assert normalize("the company\u2019s outlook") == normalize("the company's outlook")


def test_different_sentences_keep_different_keys():
    keys = {normalize(t) for t in ("Net sales rose.", "Net sales fell.", "Net sales rose 5%.", "Net sales rose 7%.")}
    assert len(keys) == 4, "the exact key keeps numbers and words"


def test_clean_keeps_what_the_model_sees():
    assert clean("  Profit\u00a0ROSE ,\tby 5 %  ") == "Profit ROSE , by 5 %"
    assert clean(None) == ""


def test_near_duplicates_are_the_same_sentence_with_a_number_changed():
    changed = SENTENCE.replace("13.1", "14,2").replace("2007", "2008")
    assert normalize(changed) != normalize(SENTENCE)
    assert near_key(changed) == near_key(SENTENCE)
    assert similarity(changed, SENTENCE) == 1.0
    assert similarity("Net sales rose.", "Net sales fell.") == 0.5
    one_word = SENTENCE.replace("Operating", "Quarterly")  # 1 of 18 distinct words: 17/19
    assert SIMILAR_SIMILARITY <= similarity(one_word, SENTENCE) < NEAR_DUPLICATE_SIMILARITY


def test_the_guard_says_what_a_candidate_matches_and_why():
    guard = LeakGuard({"validation": ["Net sales fell sharply in the quarter."], "test": [SENTENCE]})
    exact = guard.check(spellings(SENTENCE)["upper case, doubled spaces"])
    assert (exact.kind, exact.split, exact.text, exact.leaks) == ("exact", "test", SENTENCE, True)
    near = guard.check(SENTENCE.replace("13.1", "99.9"))
    assert (near.kind, near.split, near.leaks) == ("near", "test", True)
    assert "near-duplicate of a test text (similarity 1.00)" in near.describe("x")
    similar = guard.check(SENTENCE.replace("Operating", "Quarterly"))
    assert (similar.kind, similar.leaks) == ("similar", False)
    assert guard.check("\u201cNET SALES\u201d fell sharply in the quarter").split == "validation"
    assert guard.check("The board proposes a dividend of EUR 0.50 per share.") is None
    assert guard.check("...") is None


def test_drop_leaks_keeps_the_rest_in_order_and_counts_per_split():
    guard = LeakGuard({"validation": ["Net sales fell sharply in the quarter."], "test": [SENTENCE]})
    candidates = [
        "A new text one.", *spellings(SENTENCE).values(), SENTENCE.replace("8.7", "1.2"),
        "NET SALES FELL SHARPLY IN THE QUARTER", SENTENCE.replace("Operating", "Quarterly"), "A new text two.",
    ]
    kept, summary = drop_leaks(candidates, guard, shown=2)
    assert kept == ["A new text one.", SENTENCE.replace("Operating", "Quarterly"), "A new text two."]
    assert summary["exact_duplicates_dropped"] == len(spellings(SENTENCE))
    assert summary["near_duplicates_dropped"] == 2 and summary["similar_kept"] == 1  # the full stop missing: near
    assert summary["by_split"]["near"] == {"test": 1, "validation": 1}
    assert len(summary["examples"]["exact"]) == 2 and summary["examples"]["near"][0]["matches"] == SENTENCE


def test_the_guard_is_deterministic_and_fast():
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(3000)] + ["the", "of", "in"] * 300
    held_out = [" ".join(rng.choices(words, k=18)) for _ in range(1000)]
    candidates = [" ".join(rng.choices(words, k=18)) for _ in range(3000)] + [t.upper() for t in held_out[:20]]
    start = time.perf_counter()
    guard = LeakGuard({"test": held_out})
    first = [guard.check(text) for text in candidates]
    assert time.perf_counter() - start < 20, "thousands of candidates in seconds, not minutes"
    assert sum(1 for match in first if match is not None and match.leaks) == 20
    assert [guard.check(text) for text in candidates] == first
