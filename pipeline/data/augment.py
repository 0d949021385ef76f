"""Augmented transfer texts, made offline from the training (and transfer) texts only.

Task-specific distillation learns most of what the teacher knows from how the teacher labels texts
the student has not seen with labels (TinyBERT; Tang et al. 2019). Three methods, none needing a
network or another model:

- `mask`: a share of the words replaced by the mask token (the teacher reads a sentence with holes);
- `ngram`: a contiguous run of the sentence's words (a shorter, partial sentence);
- `neighbours`: a share of the words replaced by one of their nearest neighbours in the teacher's
  input-embedding space (whole-word pieces only, case kept), e.g. "rose" -> "climbed".

The teacher labels every text later (stage teacher_logits); the labels of the source texts are
never used. Validation and test texts are never a source, and a made text that equals one of them
after normalisation is dropped and counted (pipeline/data/normalize.py), as are texts equal to one
already kept or to a training or transfer text.

On disk (`paths.augmented`): `augmented.jsonl`, one {"text", "method", "source"} per line (`source`:
the index of the text it was made from, training texts first, then transfer texts), and
`augment.json` with the counts. Masked words are stored as the neutral placeholder `[MASK]`;
`for_tokenizer` turns it into each tokenizer's own mask token.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.normalize import LeakGuard, normalize
from pipeline.errors import DataError
from pipeline.io import read_json, write_json, write_text_atomic

# Placeholder for a masked word in the stored texts; each tokenizer reads it as its own mask token
# (`for_tokenizer`), so the stored texts do not depend on one tokenizer.
MASK = "[MASK]"
TEXTS_FILE = "augmented.jsonl"
INFO_FILE = "augment.json"
METHODS = ("mask", "ngram", "neighbours")
# Words never replaced by neighbours or masked: replacing function words teaches nothing about the task.
STOP_WORDS = frozenset(
    "a an the of to in on at for by with from and or but as is are was were be been it its this that "
    "these those he she they we you i his her their our has have had will would shall should can could "
    "may might not no".split()
)
_WORD = re.compile(r"^(?P<pre>\W*)(?P<core>[A-Za-z][A-Za-z'-]*[A-Za-z]|[A-Za-z])(?P<post>\W*)$")


def words_of(texts: Sequence[str]) -> set[str]:
    """The lower-cased alphabetic words of `texts` (the words neighbours are looked up for)."""
    return {m["core"].lower() for text in texts for word in text.split() if (m := _WORD.match(word))}


@dataclass
class AugmentStats:
    """What augmentation made and dropped, per method, and how long each took."""

    made: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    dropped_heldout: int = 0  # an exact or near duplicate of a validation or test text
    dropped_near_heldout: int = 0  # of those, the near duplicates (pipeline/data/normalize.py)
    dropped_duplicate: int = 0  # equal to a kept, training or transfer text after normalisation
    dropped_cap: int = 0  # beyond max_texts
    heldout_examples: list[str] = field(default_factory=list)  # why the first few were dropped

    def as_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {
            "augment_dropped_heldout": self.dropped_heldout,
            "augment_dropped_near_heldout": self.dropped_near_heldout,
            "augment_dropped_duplicate": self.dropped_duplicate,
            "augment_dropped_cap": self.dropped_cap,
            "augment_texts": sum(self.kept.values()),
        }
        for method in self.made:
            out[f"augment_{method}_made"] = self.made[method]
            out[f"augment_{method}_kept"] = self.kept.get(method, 0)
            out[f"augment_{method}_seconds"] = round(self.seconds.get(method, 0.0), 3)
        return out


def _eligible(words: list[str]) -> list[int]:
    """Indices of words that may be masked or replaced: alphabetic, not a stop word."""
    return [
        i for i, word in enumerate(words)
        if (m := _WORD.match(word)) and m["core"].lower() not in STOP_WORDS and len(m["core"]) > 2
    ]


def _replace_core(word: str, new_core: str) -> str:
    m = _WORD.match(word)
    core = m["core"]
    if core[:1].isupper():
        new_core = new_core[:1].upper() + new_core[1:]
    if core.isupper() and len(core) > 1:
        new_core = new_core.upper()
    return m["pre"] + new_core + m["post"]


def mask_words(words: list[str], ratio: float, rng: random.Random) -> list[str] | None:
    eligible = _eligible(words)
    if not eligible:
        return None
    chosen = rng.sample(eligible, max(1, round(ratio * len(eligible))))
    out = list(words)
    for i in chosen:
        m = _WORD.match(out[i])
        out[i] = m["pre"] + MASK + m["post"]
    return out


def ngram(words: list[str], min_ratio: float, rng: random.Random) -> list[str] | None:
    """A contiguous run of at least `min_ratio` of the words (and at least 3), shorter than the whole."""
    n = len(words)
    shortest = max(3, math.ceil(min_ratio * n))
    if n <= shortest:
        return None
    length = rng.randint(shortest, n - 1)
    start = rng.randint(0, n - length)
    return words[start : start + length]


class Neighbours:
    """Nearest whole-word neighbours in an input-embedding matrix (cosine), for the words of a corpus.

    `vocab` maps token -> row; only lower-case alphabetic whole-word tokens are candidates (no `##`
    continuation pieces, no special or unused tokens)."""

    def __init__(self, embeddings: np.ndarray, vocab: dict[str, int], words: Sequence[str], top_k: int) -> None:
        candidates = sorted(
            (token, row) for token, row in vocab.items()
            if token.isalpha() and token.islower() and len(token) > 1 and row < len(embeddings)
        )
        tokens = [token for token, _ in candidates]
        matrix = embeddings[[row for _, row in candidates]].astype(np.float32)
        matrix /= np.linalg.norm(matrix, axis=1, keepdims=True).clip(1e-12)
        position = {token: i for i, token in enumerate(tokens)}
        wanted = sorted({w.lower() for w in words} & position.keys())
        self.neighbours: dict[str, list[str]] = {}
        for start in range(0, len(wanted), 1024):
            chunk = wanted[start : start + 1024]
            scores = matrix[[position[w] for w in chunk]] @ matrix.T
            best = np.argpartition(-scores, top_k + 1, axis=1)[:, : top_k + 1]
            for word, row, cols in zip(chunk, scores, best):
                ordered = cols[np.argsort(-row[cols])]
                self.neighbours[word] = [tokens[c] for c in ordered if tokens[c] != word][:top_k]

    def replace(self, words: list[str], ratio: float, rng: random.Random) -> list[str] | None:
        eligible = [i for i in _eligible(words) if _WORD.match(words[i])["core"].lower() in self.neighbours]
        if not eligible:
            return None
        chosen = rng.sample(eligible, max(1, round(ratio * len(eligible))))
        out = list(words)
        for i in chosen:
            core = _WORD.match(out[i])["core"].lower()
            out[i] = _replace_core(out[i], rng.choice(self.neighbours[core]))
        return out


def augment(
    sources: list[str],
    *,
    methods: Sequence[str],
    n_per_text: int,
    max_texts: int | None,
    seed: int,
    heldout: LeakGuard,
    existing: Sequence[str],
    neighbours: Neighbours | None = None,
    mask_ratio: float = 0.15,
    replace_ratio: float = 0.3,
    ngram_min_ratio: float = 0.5,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[dict[str, str]], AugmentStats]:
    """Up to `n_per_text` new texts per source (methods taken in turn), at most `max_texts` in all.

    A made text that `heldout` says leaks a validation or test text (the same or a near-duplicate
    sentence, pipeline/data/normalize.py) is dropped and counted apart from one equal (normalised)
    to an `existing` or already-made text. Returns rows {"text", "method", "source"} (source: the
    index of the source text) and the statistics."""
    rng = random.Random(seed)
    stats = AugmentStats(made=dict.fromkeys(methods, 0), kept=dict.fromkeys(methods, 0), seconds=dict.fromkeys(methods, 0.0))
    seen = {normalize(text) for text in existing}
    rows: list[dict[str, str]] = []
    makers = {
        "mask": lambda words: mask_words(words, mask_ratio, rng),
        "ngram": lambda words: ngram(words, ngram_min_ratio, rng),
        "neighbours": lambda words: neighbours.replace(words, replace_ratio, rng) if neighbours else None,
    }
    order = list(range(len(sources)))
    rng.shuffle(order)  # under a cap, every part of the corpus gets its share
    for count, index in enumerate(order):
        words = sources[index].split()
        for k in range(n_per_text):
            method = methods[(index + k) % len(methods)]
            start = time.perf_counter()
            made = makers[method](words)
            stats.seconds[method] += time.perf_counter() - start
            if made is None:
                continue
            text = " ".join(made)
            stats.made[method] += 1
            key = normalize(text)
            leak = heldout.check(text)
            if leak is not None and leak.leaks:
                stats.dropped_heldout += 1
                stats.dropped_near_heldout += leak.kind == "near"
                if len(stats.heldout_examples) < 5:
                    stats.heldout_examples.append(leak.describe(text))
            elif key in seen:
                stats.dropped_duplicate += 1
            elif max_texts is not None and len(rows) >= max_texts:
                stats.dropped_cap += 1
            else:
                seen.add(key)
                rows.append({"text": text, "method": method, "source": index})
                stats.kept[method] += 1
        if progress:
            progress(count + 1)
    return rows, stats


# --------------------------------------------------------------------------- storage


def write_augmented(out_dir: Path, rows: list[dict[str, Any]], stats: AugmentStats, settings: dict[str, Any]) -> None:
    """`augmented.jsonl` and `augment.json` (what was made, kept and dropped, with the settings)."""
    write_text_atomic(out_dir / TEXTS_FILE, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    write_json(out_dir / INFO_FILE, {"texts": len(rows), "settings": settings, **asdict(stats)})


def load_augmented(directory: Path) -> list[str]:
    """The augmented texts, in order (none when augmentation is off)."""
    path = directory / TEXTS_FILE
    if not path.is_file():
        raise DataError(f"{path} not found: run the augment stage (dvc repro augment, or python -m stages.augment)")
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line]
    info = read_json(directory / INFO_FILE)
    if info.get("texts") != len(texts):
        raise DataError(f"{path} has {len(texts)} texts but {INFO_FILE} says {info.get('texts')}: re-run the augment stage")
    return texts


def for_tokenizer(texts: list[str], tokenizer: Any) -> list[str]:
    """Augmented texts as `tokenizer` should read them: the placeholder becomes its mask token (its
    unknown token when it has none)."""
    token = getattr(tokenizer, "mask_token", None) or tokenizer.unk_token
    return texts if token == MASK else [text.replace(MASK, token) for text in texts]
