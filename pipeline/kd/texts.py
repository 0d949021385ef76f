"""The texts a KD student learns from, by part: the labelled training split, the transfer texts
(unlabelled, from `transfer.path`) and the augmented texts (made from both by the augment stage).
The teacher labels every one of them once (stage teacher_logits); only the training split has labels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config.data import AugmentConfig
from pipeline.data.augment import for_tokenizer, load_augmented
from pipeline.data.prepared import Prepared
from pipeline.kd.token_map import Alignment, align

# The parts in the order every cache and dataset lists them.
PARTS = ("train", "transfer", "augmented")
# The parts that were written by people (what `layer_texts: original` keeps).
ORIGINAL = ("train", "transfer")


@dataclass(frozen=True)
class KDTexts:
    train: list[str]
    transfer: list[str]
    augmented: list[str]  # with the tokenizer-neutral mask placeholder (pipeline/data/augment.py)

    def parts(self, which: tuple[str, ...] = PARTS) -> dict[str, list[str]]:
        """The non-empty parts among `which`, in order."""
        return {part: getattr(self, part) for part in PARTS if part in which and getattr(self, part)}

    def read_by(self, tokenizer: Any, which: tuple[str, ...] = PARTS) -> dict[str, list[str]]:
        """The parts as `tokenizer` reads them (augmented texts with its own mask token)."""
        return {
            part: for_tokenizer(texts, tokenizer) if part == "augmented" else texts
            for part, texts in self.parts(which).items()
        }

    def all_read_by(self, tokenizer: Any) -> list[str]:
        """Every text, the parts in order, as `tokenizer` reads them."""
        return [text for texts in self.read_by(tokenizer).values() for text in texts]

    def align(self, teacher: Any, student: Any | None, max_length: int) -> Alignment:
        """How the student's tokens line up with the teacher's on every text it trains on (student
        None: it reads with the teacher's tokenizer)."""
        student_texts = self.all_read_by(student) if student is not None else []
        return align(teacher, student, self.all_read_by(teacher), student_texts, max_length)


def load_kd_texts(prepared: Prepared, augment: AugmentConfig, augmented_dir: Path) -> KDTexts:
    """The training, transfer and (when augmentation is on) augmented texts."""
    augmented = load_augmented(augmented_dir) if augment.enabled else []
    return KDTexts(prepared.texts("train"), prepared.transfer_texts(), augmented)
