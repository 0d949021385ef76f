"""One normaliser for every filter that keeps validation and test texts out of training: the transfer
set, augmented texts and the de-duplication across the labelled splits all compare texts through it.

    from pipeline.data.normalize import LeakGuard, clean, near_key, normalize, similarity

    clean("  Profit   rose. ")          -> "Profit rose."      the stored form of a text (whitespace only)
    normalize("PROFIT  rose .")          -> "profit rose."      two spellings of one sentence: same key
    near_key("Profit rose 5 %")          -> "profit rose"       also blind to numbers and punctuation
    similarity("Profit rose 5%", "Profit rose 7%") -> 1.0      word-set overlap of the near keys
    guard = LeakGuard({"validation": [...], "test": [...]})     the held-out texts, once
    match = guard.check("PROFIT rose 5 %")  -> Match(kind="exact", split="test", ...) or None
    match.leaks, match.describe(text)        -> True, "'PROFIT rose 5 %' is the same text as a test text ..."
    kept, summary = drop_leaks(candidates, guard)    the texts that may be trained on; counts and examples

`normalize` is deliberately blind to everything a tokenizer might ignore, whatever the model: Unicode
compatibility forms (NFKC: full-width letters, ligatures, non-breaking spaces), case (case-folding),
accents and other combining marks (an uncased WordPiece strips them), invisible format characters
(zero-width spaces, soft hyphens, BOMs), quote and dash variants, runs of whitespace, and whitespace
next to punctuation ("rose ," and "rose," are the same tokens to every tokenizer here). Treating two
spellings of one sentence as one is right for leak detection even for a cased model: a model that
trained on "PROFIT ROSE" has seen "Profit rose".

Near-duplicates are the same sentence with a number or a little punctuation changed, added or removed.
`near_key` also drops every number and all punctuation; `similarity` is the Jaccard overlap of the word
sets of two near keys (1.0: the same words; "Net sales rose" vs "Net sales fell" is 0.5). A text is a
near-duplicate of a held-out text at NEAR_DUPLICATE_SIMILARITY (0.9) or above, and is then dropped
like an exact one; from SIMILAR_SIMILARITY (0.7) up it is counted and shown, but kept.
"""

from __future__ import annotations

import logging
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Near-duplicates at or above this similarity are dropped like exact duplicates. A number changed, added or
# removed scores 1.0 at any length; one word of n changed scores (n-1)/(n+1): 0.90 from 19 words up.
NEAR_DUPLICATE_SIMILARITY = 0.9
# From here up a pair is counted and shown as similar, but kept (one word changed in 6 to 18 words).
SIMILAR_SIMILARITY = 0.7

# Quote and dash variants NFKC leaves apart, mapped to the ASCII character.
_QUOTES_AND_DASHES = str.maketrans({
    **dict.fromkeys("\u2018\u2019\u201a\u201b\u2032\u2035\u00b4\u0060", "'"),
    **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033\u2036\u00ab\u00bb\u300c\u300d", '"'),
    **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63\uff0d", "-"),
})
_DROPPED = ("Mn", "Me", "Cf")  # combining marks, format characters
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # control characters count as whitespace
# Punctuation and symbols ($, %, +): neither letter, digit nor whitespace. Whitespace next to them goes,
# since "rose , 5 %" and "rose, 5%" tokenize alike.
_SPACED_PUNCTUATION = re.compile(r"\s*([^\w\s])\s*")
_PUNCTUATION = re.compile(r"[^\w\s]|_")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def clean(text: Any) -> str:
    """The form a text is stored and trained in: every run of whitespace one space, trimmed (None: "").
    Nothing else changes: the model still sees the user's case, accents and punctuation."""
    return " ".join(str(text).split()) if text is not None else ""


def normalize(text: str) -> str:
    """The key two spellings of one sentence share (see the module docstring): NFKC, quote and dash
    variants unified, case-folded, accents and format characters removed, whitespace collapsed and
    dropped next to punctuation."""
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES_AND_DASHES).casefold()
    if not text.isascii():  # decompose, drop combining marks (accents) and format characters (U+200B, U+00AD)
        text = "".join(char for char in unicodedata.normalize("NFKD", text) if unicodedata.category(char) not in _DROPPED)
        text = unicodedata.normalize("NFC", text)
    text = " ".join(_CONTROL.sub(" ", text).split())
    return _SPACED_PUNCTUATION.sub(r"\1", text)


def near_key(text: str) -> str:
    """`normalize` without numbers and punctuation: equal for the same sentence with its numbers (or a
    little punctuation) changed, added or removed."""
    return " ".join(_PUNCTUATION.sub(" ", _NUMBER.sub(" ", normalize(text))).split())


def _words(text: str) -> frozenset[str]:
    return frozenset(near_key(text).split())


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    shared = len(a & b)
    return shared / (len(a) + len(b) - shared)


def similarity(a: str, b: str) -> float:
    """Jaccard overlap (0..1) of the word sets of the two texts' near keys: 1.0 for the same words in
    any numbers, case, accents and punctuation."""
    return _jaccard(_words(a), _words(b))


@dataclass(frozen=True)
class Match:
    """The held-out text a candidate is closest to, and how close."""

    kind: str  # "exact" (equal after `normalize`), "near" (>= NEAR_DUPLICATE_SIMILARITY) or "similar"
    split: str  # the held-out split of the text matched
    text: str  # the held-out text matched
    similarity: float

    @property
    def leaks(self) -> bool:
        """True when the candidate must not be trained on (an exact or near duplicate)."""
        return self.kind != "similar"

    def describe(self, candidate: str) -> str:
        """One line for logs and manifests: what the candidate is and what it matches."""
        what = {"exact": "the same text as", "near": "a near-duplicate of", "similar": "similar to"}[self.kind]
        return f"{candidate!r} is {what} a {self.split} text (similarity {self.similarity:.2f}): {self.text!r}"

    def as_dict(self, candidate: str) -> dict[str, Any]:
        """The match as a manifest entry."""
        return {"text": candidate, "kind": self.kind, "split": self.split, "matches": self.text,
                "similarity": round(self.similarity, 3), "reason": self.describe(candidate)}


class LeakGuard:
    """Tells whether a candidate text leaks held-out (validation and test) texts into training, and why.

        guard = LeakGuard({"validation": validation_texts, "test": test_texts})
        match = guard.check(candidate)   # None: not even similar to any held-out text
        if match is not None and match.leaks:
            ...  # drop it; match.describe(candidate) says why

    Built once per set of held-out texts (an inverted index of their words); a check scores only the
    held-out texts sharing one of the candidate's rarest words, so thousands of candidates take seconds.
    """

    def __init__(self, held_out: Mapping[str, Iterable[str]]) -> None:
        self._exact: dict[str, tuple[str, str]] = {}
        self._entries: list[tuple[str, str, frozenset[str]]] = []
        self._index: dict[str, list[int]] = {}
        for split, texts in held_out.items():
            for text in texts:
                self._exact.setdefault(normalize(text), (split, text))
                words = _words(text)
                for word in words:
                    self._index.setdefault(word, []).append(len(self._entries))
                self._entries.append((split, text, words))

    def check(self, candidate: str) -> Match | None:
        """The closest held-out text at SIMILAR_SIMILARITY or above (exact matches first), or None."""
        exact = self._exact.get(normalize(candidate))
        if exact is not None:
            return Match("exact", exact[0], exact[1], 1.0)
        words = _words(candidate)
        if not words:
            return None
        # A held-out text with Jaccard >= SIMILAR_SIMILARITY shares at least that share of the candidate's
        # words, so it shares one of any (len - needed + 1) of them: look only at the posting lists of
        # the candidate's rarest words ("prefix filtering"), then score those texts exactly.
        needed = math.ceil(SIMILAR_SIMILARITY * len(words) - 1e-9)
        rarest = sorted(words, key=lambda word: (len(self._index.get(word, ())), word))[: len(words) - needed + 1]
        best: tuple[float, int] | None = None
        for entry in sorted({entry for word in rarest for entry in self._index.get(word, ())}):
            score = _jaccard(words, self._entries[entry][2])
            if score >= SIMILAR_SIMILARITY and (best is None or score > best[0]):
                best = (score, entry)
        if best is None:
            return None
        score, entry = best
        split, text, _ = self._entries[entry]
        return Match("near" if score >= NEAR_DUPLICATE_SIMILARITY else "similar", split, text, score)


def drop_leaks(candidates: Iterable[str], guard: LeakGuard, shown: int = 5) -> tuple[list[str], dict[str, Any]]:
    """The candidates that may be trained on (in order), and a summary for the manifest and metrics:
    how many were dropped as exact and as near duplicates of held-out texts, how many similar ones were
    kept, each per held-out split, and up to `shown` examples of each kind."""
    kept: list[str] = []
    counts: dict[str, Counter[str]] = {kind: Counter() for kind in ("exact", "near", "similar")}
    examples: dict[str, list[dict[str, Any]]] = {kind: [] for kind in counts}
    for text in candidates:
        match = guard.check(text)
        if match is None or not match.leaks:
            kept.append(text)
        if match is not None:
            counts[match.kind][match.split] += 1
            if len(examples[match.kind]) < shown:
                examples[match.kind].append(match.as_dict(text))
    summary = {
        "exact_duplicates_dropped": sum(counts["exact"].values()),
        "near_duplicates_dropped": sum(counts["near"].values()),
        "similar_kept": sum(counts["similar"].values()),
        "by_split": {kind: dict(sorted(counter.items())) for kind, counter in counts.items()},
        "examples": examples,
        "near_duplicate_similarity": NEAR_DUPLICATE_SIMILARITY,
        "similar_similarity": SIMILAR_SIMILARITY,
    }
    return kept, summary


def log_leak_examples(what: str, summary: dict[str, Any]) -> None:
    """Log the examples of a `drop_leaks` summary, one line each: what was dropped or kept, and why."""
    for kind, examples in summary["examples"].items():
        for example in examples:
            log.info("%s: %s %s", what, "kept" if kind == "similar" else "dropped", example["reason"])
