"""The teacher's hidden states and attention maps, token by token, cached once (stage teacher_logits)
for the layers a student's layer terms read, so those terms need no teacher pass per text and epoch
(`teacher_internals: cached`). A BERT-base teacher costs ten times its small student per step on a
CPU: live, the layer terms spend most of a stage's time re-running the teacher on texts it has seen.

Only for students whose tokens line up with the teacher's (`shared` or `mapped`,
pipeline/kd/token_map.py): the cached positions are then the student's positions. On disk, per part
(train, transfer, augmented), all float16:

- `<part>.hidden.npy`: [tokens of all texts, hidden layers, teacher hidden], the texts one after the other;
- `<part>.attention.npy`: [sum over texts of length^2, attention layers, heads], each text's
  (query, key) pairs in row-major order;
- `<part>.offsets.npy` (int64 [texts + 1, 2]): where each text starts in both;
- `internals.json`: the layers (0 is the embedding output; attention layer t is the map of layer t),
  the parts with their text counts and hashes (the texts must be the ones the logits were cached for).

Size: per token (hidden layers x hidden + attention layers x heads x text length) x 2 bytes; for
all-mpnet-base-v2 and a 2-layer student, about 6 KB per token (under 1 GB for 4,000 sentences).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import DataError
from pipeline.io import read_json, sha256_file, write_json

INDEX_FILE = "internals.json"
DTYPE = np.float16


def hidden_layers(layer_map: Sequence[int]) -> list[int]:
    """The teacher layers whose hidden states a layer map reads: the embedding output and the mapped ones."""
    return sorted({0, *layer_map})


def estimated_mb(lengths: Sequence[int], layers: Sequence[int], hidden: int, heads: int) -> float:
    """What the cache of texts with these token counts takes for `layers` (hidden_layers' list): each
    token's hidden states of every layer plus each (query, key) pair of every attention layer's heads."""
    attention_layers = sum(1 for layer in layers if layer > 0)
    values = sum(length * len(layers) * hidden + length * length * attention_layers * heads for length in lengths)
    return values * np.dtype(DTYPE).itemsize / 1e6


class Collector:
    """Gathers the internals of one part batch by batch (unpadded, in the order of the batches)."""

    def __init__(self, layers: Sequence[int]) -> None:
        self.layers = list(layers)
        self.hidden: list[np.ndarray] = []
        self.attention: list[np.ndarray] = []
        self.order: list[int] = []  # position of each text's batch row (set by compute_teacher_outputs)

    def add(self, outputs: Any, mask: torch.Tensor) -> None:
        lengths = mask.sum(dim=1).tolist()
        hidden = torch.stack([outputs.hidden_states[layer] for layer in self.layers], dim=2)  # [B, L, nH, H]
        attention_layers = [layer for layer in self.layers if layer > 0]
        attention = torch.stack([outputs.attentions[layer - 1] for layer in attention_layers], dim=1)  # [B, nA, h, L, L]
        for i, length in enumerate(lengths):
            # Padding on the right (every tokenizer here pads right): the first `length` positions are the text.
            self.hidden.append(hidden[i, :length].to(torch.float16).cpu().numpy())
            pairs = attention[i, :, :, :length, :length].permute(2, 3, 0, 1).reshape(length * length, len(attention_layers), -1)
            self.attention.append(pairs.to(torch.float16).cpu().numpy())


def save(out_dir: Path, collected: dict[str, Collector], texts_sha256: dict[str, str]) -> dict[str, Any]:
    """Write every part's arrays, in text order, and the index; returns the index."""
    index: dict[str, Any] = {"parts": {}}
    for part, collector in collected.items():
        hidden = [collector.hidden[i] for i in collector.order]
        attention = [collector.attention[i] for i in collector.order]
        offsets = np.zeros((len(hidden) + 1, 2), dtype=np.int64)
        offsets[1:, 0] = np.cumsum([len(h) for h in hidden])
        offsets[1:, 1] = np.cumsum([len(a) for a in attention])
        np.save(out_dir / f"{part}.hidden.npy", np.concatenate(hidden).astype(DTYPE), allow_pickle=False)
        np.save(out_dir / f"{part}.attention.npy", np.concatenate(attention).astype(DTYPE), allow_pickle=False)
        np.save(out_dir / f"{part}.offsets.npy", offsets, allow_pickle=False)
        index["layers"] = collector.layers
        # The SHA-256 of each file as written, as the logits cache records them: a changed file is refused.
        files = {name: sha256_file(out_dir / name) for name in part_files(part)}
        index["parts"][part] = {"texts": len(hidden), "texts_sha256": texts_sha256[part], "files": files}
    write_json(out_dir / INDEX_FILE, index)
    return index


def part_files(part: str) -> list[str]:
    return [f"{part}.hidden.npy", f"{part}.attention.npy", f"{part}.offsets.npy"]


@dataclass
class TeacherInternals:
    """What the layer terms read from a live teacher, from the cache: `hidden_states[layer]` and
    `attentions[layer - 1]` for the cached layers."""

    hidden_states: dict[int, torch.Tensor]
    attentions: dict[int, torch.Tensor]

    def to(self, device: Any) -> TeacherInternals:
        return TeacherInternals({k: v.to(device) for k, v in self.hidden_states.items()},
                                {k: v.to(device) for k, v in self.attentions.items()})


def cache_holds(directory: Path, parts: dict[str, list[str]], layer_map: Sequence[int], texts_sha256: Any) -> bool:
    """Whether teacher_logits cached these parts' texts and the layers a layer map reads, by the index
    alone: InternalsStore checks the same and then hashes every cached file, too costly just to learn
    that the cache does not apply."""
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        return False
    index = read_json(index_path)
    if not set(hidden_layers(layer_map)) <= set(index["layers"]):
        return False
    entries = [index["parts"].get(part) for part in parts]
    return all(
        entry is not None and entry["texts"] == len(texts) and entry["texts_sha256"] == texts_sha256(texts)
        for entry, texts in zip(entries, parts.values())
    )


class InternalsStore:
    """The cached internals of some parts, memory-mapped; rows are numbered across the parts in order."""

    def __init__(self, directory: Path, parts: dict[str, list[str]], texts_sha256: Any) -> None:
        index_path = directory / INDEX_FILE
        if not index_path.is_file():
            raise DataError(f"{index_path} not found: the teacher's internals are not cached; re-run teacher_logits")
        index = read_json(index_path)
        self.layers: list[int] = index["layers"]
        self.attention_layers = [layer for layer in self.layers if layer > 0]
        self.first_row: dict[str, int] = {}
        self.hidden: list[np.ndarray] = []
        self.attention: list[np.ndarray] = []
        self.offsets: list[np.ndarray] = []
        for number, (part, texts) in enumerate(parts.items()):
            entry = index["parts"].get(part)
            if entry is None or entry["texts"] != len(texts) or entry["texts_sha256"] != texts_sha256(texts):
                raise DataError(
                    f"{directory}: the cached teacher internals of the {part} texts are missing or belong to other "
                    "texts; re-run the teacher_logits stage (dvc repro teacher_logits)"
                )
            for name in part_files(part):
                path = directory / name
                if not path.is_file() or sha256_file(path) != entry.get("files", {}).get(name):
                    raise DataError(
                        f"{path} is not the file the teacher_logits stage wrote (its SHA-256 differs from "
                        f"the one recorded in {INDEX_FILE}, or it is missing): it was changed or corrupted afterwards; "
                        "rebuild it: dvc repro -f teacher_logits (or python -m stages.teacher_logits)"
                    )
            self.first_row[part] = sum(len(t) for t in list(parts.values())[:number])
            self.hidden.append(np.load(directory / f"{part}.hidden.npy", mmap_mode="r", allow_pickle=False))
            self.attention.append(np.load(directory / f"{part}.attention.npy", mmap_mode="r", allow_pickle=False))
            self.offsets.append(np.load(directory / f"{part}.offsets.npy", allow_pickle=False))
        self.ends = np.cumsum([len(o) - 1 for o in self.offsets])

    def covers(self, layer_map: Sequence[int]) -> bool:
        """Whether the cache holds every layer a layer map reads."""
        return set(hidden_layers(layer_map)) <= set(self.layers)

    def _locate(self, row: int) -> tuple[int, int]:
        part = int(np.searchsorted(self.ends, row, side="right"))
        return part, row - (int(self.ends[part - 1]) if part else 0)

    def __call__(self, rows: torch.Tensor, length: int) -> TeacherInternals:
        """The internals of a batch of rows, zero-padded to the batch's `length` (padding is masked
        out by the terms): hidden [B, length, H] per layer, attention [B, heads, length, length]."""
        batch = len(rows)
        width = self.hidden[0].shape[-1]
        heads = self.attention[0].shape[-1]
        hidden = torch.zeros(batch, length, len(self.layers), width)
        attention = torch.zeros(batch, len(self.attention_layers), heads, length, length)
        for i, row in enumerate(rows.tolist()):
            part, text = self._locate(row)
            (h0, a0), (h1, a1) = self.offsets[part][text], self.offsets[part][text + 1]
            tokens = int(h1 - h0)
            if tokens > length:
                raise DataError(
                    f"a cached text has {tokens} teacher tokens but the student's batch only {length}: the cache "
                    "belongs to another tokenization; re-run the teacher_logits stage"
                )
            hidden[i, :tokens] = torch.from_numpy(np.asarray(self.hidden[part][h0:h1], dtype=np.float32))
            pairs = torch.from_numpy(np.asarray(self.attention[part][a0:a1], dtype=np.float32))
            attention[i, :, :, :tokens, :tokens] = pairs.reshape(tokens, tokens, len(self.attention_layers), heads).permute(2, 3, 0, 1)
        return TeacherInternals(
            hidden_states={layer: hidden[:, :, k] for k, layer in enumerate(self.layers)},
            attentions={layer - 1: attention[:, k] for k, layer in enumerate(self.attention_layers)},
        )
