"""How a student's tokens line up with its teacher's: the same tokenizer, the same pieces under other
ids, or other pieces altogether. Which one decides what KD can compare.

- `shared`: the student reads text with the teacher's tokenizer (init `teacher`/`random`, or a
  pretrained init with an identical tokenizer): every term works token by token.
- `mapped`: the student keeps its own tokenizer, which cuts every training text into the very pieces
  the teacher's does, only under other ids (all-MiniLM-L6-v2's BERT WordPiece and all-mpnet-base-v2's
  MPNet hold the same 30,522 pieces, MPNet's shifted by five specials in front, and [CLS]/<s> name
  the same role). The student's ids are mapped to the teacher's through a lookup table and the
  teacher runs on the student's own positions: per-token hidden-state and attention KD work exactly
  as with a shared tokenizer.
- `pooled`: the pieces differ (another vocabulary, casing or normalisation): token positions do not
  correspond, so the hidden-state term compares mean-pooled sentence states read from the
  teacher_logits cache and the attention term is skipped.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.models import RELOAD_PROBE

# How many training texts `same_tokenizer` encodes with both tokenizers (enough to catch another
# casing, normalisation or splitting rule; cheap for any tokenizer).
TOKENIZER_SAMPLE = 256
# Special tokens matched by role, not by name ([CLS] in one vocabulary, <s> in the other).
SPECIAL_ROLES = ("cls_token", "sep_token", "pad_token", "unk_token", "mask_token", "bos_token", "eos_token")


def same_tokenizer(
    first: PreTrainedTokenizerBase, second: PreTrainedTokenizerBase, texts: list[str], max_length: int
) -> bool:
    """True when the two tokenizers have the same vocabulary (token -> id) and give the very same ids
    for a sample of `texts` (the first TOKENIZER_SAMPLE, and the probe sentences): a student with
    such a tokenizer can read the teacher's token ids. Another casing or normalisation with the same
    vocabulary counts as different."""
    if first.get_vocab() != second.get_vocab():
        return False
    sample = list(texts[:TOKENIZER_SAMPLE]) + RELOAD_PROBE
    encode = {"truncation": True, "max_length": max_length}
    return first(sample, **encode)["input_ids"] == second(sample, **encode)["input_ids"]


def _role_map(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> dict[int, int]:
    """Student special-token id -> the teacher's id of the token with the same role ([CLS] -> <s>)."""
    roles: dict[int, int] = {}
    for role in SPECIAL_ROLES:
        s, t = getattr(student, role, None), getattr(teacher, role, None)
        if s is not None and t is not None:
            roles[student.convert_tokens_to_ids(s)] = teacher.convert_tokens_to_ids(t)
    return roles


def id_map(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> torch.Tensor:
    """A lookup table: student id -> teacher id of the same piece (special tokens by role; -1 where
    the teacher has no such piece)."""
    teacher_vocab = teacher.get_vocab()
    table = torch.full((max(len(student), max(student.get_vocab().values()) + 1),), -1, dtype=torch.long)
    for piece, sid in student.get_vocab().items():
        if piece in teacher_vocab:
            table[sid] = teacher_vocab[piece]
    for sid, tid in _role_map(student, teacher).items():
        table[sid] = tid
    return table


@dataclass(frozen=True)
class Alignment:
    """Which KD path a student takes (see the module docstring) and the evidence for it."""

    kind: Literal["shared", "mapped", "pooled"]
    table: torch.Tensor | None = None  # mapped: student id -> teacher id
    texts_checked: int = 0
    texts_cut_differently: int = 0
    example: str | None = None  # the first text cut into other pieces, for the log

    @property
    def token_level(self) -> bool:
        """Token positions correspond: the per-token hidden and attention terms apply."""
        return self.kind != "pooled"

    def describe(self) -> str:
        if self.kind == "shared":
            return "the student reads text with the teacher's tokenizer: token-level KD"
        if self.kind == "mapped":
            return (
                f"the student's tokenizer cuts all {self.texts_checked} training texts into the teacher's pieces "
                "(other ids): ids mapped, token-level KD"
            )
        return (
            f"the student's tokenizer cuts {self.texts_cut_differently} of {self.texts_checked} training texts into "
            f"other pieces than the teacher's (e.g. {self.example!r}): pooled sentence states instead of tokens"
        )

    def teacher_inputs(self, teacher: PreTrainedModel) -> TeacherInputs | None:
        """What turns a student batch into the teacher's inputs (None: the same inputs)."""
        if self.kind != "mapped":
            return None
        return TeacherInputs(self.table, "token_type_ids" in inspect.signature(teacher.forward).parameters)


def align(
    teacher: PreTrainedTokenizerBase,
    student: PreTrainedTokenizerBase | None,
    teacher_texts: Sequence[str],
    student_texts: Sequence[str],
    max_length: int,
) -> Alignment:
    """How `student` (None: it uses the teacher's tokenizer) lines up with `teacher` on the training
    texts, given as each tokenizer reads them (augmented texts carry each one's mask token)."""
    if student is None or same_tokenizer(teacher, student, list(teacher_texts), max_length):
        return Alignment("shared")
    table = id_map(student, teacher)
    encode = {"truncation": True, "max_length": max_length}
    s_ids = student(list(student_texts), **encode)["input_ids"]
    t_ids = teacher(list(teacher_texts), **encode)["input_ids"]
    different, example = 0, None
    for text, s_row, t_row in zip(student_texts, s_ids, t_ids):
        if len(s_row) != len(t_row) or table[torch.tensor(s_row)].tolist() != t_row:
            different += 1
            example = example or text
    kind = "mapped" if student_texts and not different else "pooled"
    return Alignment(kind, table if kind == "mapped" else None, len(student_texts), different, example)


class TeacherInputs:
    """The teacher's inputs for a batch of the student's: ids mapped through the table, the same
    attention mask (positions correspond one to one), token types only if the teacher takes them."""

    def __init__(self, table: torch.Tensor, token_types: bool) -> None:
        self.table = table
        self.token_types = token_types

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = inputs["input_ids"]
        out = {"input_ids": self.table.to(ids.device)[ids], "attention_mask": inputs["attention_mask"]}
        if self.token_types and "token_type_ids" in inputs:
            out["token_type_ids"] = inputs["token_type_ids"]
        return out
