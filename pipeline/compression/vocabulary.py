"""Vocabulary trimming: keep the tokens a corpus uses (and what unseen words fall back to), rebuilding the
tokenizer and the embedding matrix together. The prune stage trims its student with it; the static
reference member (pipeline/baselines/static.py) trims the teacher before model2vec distils it, so it
encodes a few thousand tokens instead of the whole vocabulary. A module of its own so that neither
depends on the other's code.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pipeline.errors import ConfigError

TRIMMABLE = "WordPiece, byte-level BPE and Unigram"


def vocabulary_trim_problem(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Why the vocabulary of `tokenizer` cannot be trimmed, or None when it can."""
    if not getattr(tokenizer, "is_fast", False):
        return "the tokenizer is not a fast tokenizer (no tokenizer.json)"
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = state["model"]["type"]
    if kind == "BPE" and not _is_byte_level(state.get("pre_tokenizer")):
        return "its BPE tokenizer is not byte-level, so unseen characters could not be spelled with kept tokens"
    if kind not in ("WordPiece", "BPE", "Unigram"):
        return f"its tokenizer is {kind}; vocabulary trimming supports {TRIMMABLE}"
    return None


def _is_byte_level(pre_tokenizer: dict[str, Any] | None) -> bool:
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "Sequence":
        return any(_is_byte_level(item) for item in pre_tokenizer.get("pretokenizers", []))
    return pre_tokenizer.get("type") == "ByteLevel"


def trim_vocabulary(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, corpus: list[str], keep_top: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast, dict[str, Any]]:
    """Keep the special tokens, every token `corpus` uses, every token unseen words fall back to
    (WordPiece and Unigram: single characters; byte-level BPE: the 256 byte symbols) and `keep_top`
    other tokens in the vocabulary's own order. Byte-level BPE also keeps every merge whose result
    and parts survive, and the parts of every kept token, so the corpus splits exactly as before.
    The tokenizer and the embedding matrix are rebuilt together; ids are renumbered but every kept
    token keeps its embedding row, so the corpus gives the very same logits."""
    problem = vocabulary_trim_problem(tokenizer)
    if problem:
        raise ConfigError(f"prune.vocab=corpus cannot trim this vocabulary: {problem}. Set prune.vocab=auto or none.")
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    spec = state["model"]
    kind = spec["type"]
    if kind == "Unigram":
        by_id = {index: piece for index, (piece, _score) in enumerate(spec["vocab"])}
    else:
        by_id = {index: token for token, index in spec["vocab"].items()}
    used = {i for ids in tokenizer(corpus, add_special_tokens=False)["input_ids"] for i in ids}
    kept = used | set(tokenizer.all_special_ids) | {t["id"] for t in state.get("added_tokens", [])}
    kept |= {i for i, token in by_id.items() if _is_fallback_piece(kind, token)}
    # Added tokens past the model's own vocabulary (an XLM-R <mask> after the Unigram pieces, domain
    # tokens a user added with add_tokens) are kept, all of them, and renumbered in their order right
    # after the kept vocabulary: the tokenizer numbers added tokens from the vocabulary's size on.
    beyond = sorted(i for i in kept if i not in by_id)
    kept = {i for i in kept if i in by_id}
    others = [i for i in sorted(by_id) if i not in kept and not by_id[i].startswith("[unused")]
    kept |= set(others[:keep_top])
    if kind == "BPE":
        kept = _close_under_merges(kept, by_id, spec)
    old_ids = sorted(kept) + beyond
    new_id = {old: new for new, old in enumerate(old_ids)}

    in_vocabulary = old_ids[: len(old_ids) - len(beyond)]
    if kind == "Unigram":
        spec["vocab"] = [spec["vocab"][old] for old in in_vocabulary]
        if spec.get("unk_id") is not None:
            spec["unk_id"] = new_id[spec["unk_id"]]
    else:
        spec["vocab"] = {by_id[old]: new for new, old in enumerate(in_vocabulary)}
    if kind == "BPE":
        survivors = {by_id[i] for i in in_vocabulary}
        spec["merges"] = [m for m in spec["merges"] if all(t in survivors for t in (*_merge_parts(m), "".join(_merge_parts(m))))]
    for token in state.get("added_tokens", []):
        token["id"] = new_id[token["id"]]
    _renumber_post_processor(state.get("post_processor"), new_id)
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(json.dumps(state))
    trimmed = type(tokenizer)(
        tokenizer_object=backend,
        **{k: v for k, v in tokenizer.init_kwargs.items() if k not in ("vocab_file", "merges_file", "tokenizer_file", "name_or_path")},
    )

    old_embeddings = model.get_input_embeddings()
    index = torch.tensor(old_ids, device=old_embeddings.weight.device)
    config = model.config
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id"):
        if getattr(config, key, None) is not None and getattr(config, key) in new_id:
            setattr(config, key, new_id[getattr(config, key)])
    pad_id = config.pad_token_id if config.pad_token_id in range(len(old_ids)) else None
    embeddings = nn.Embedding(len(old_ids), old_embeddings.embedding_dim, padding_idx=pad_id)
    embeddings.weight.data = old_embeddings.weight.data[index].clone()
    model.set_input_embeddings(embeddings)
    base_embeddings = getattr(model.base_model, "embeddings", None)
    if base_embeddings is not None and hasattr(base_embeddings, "padding_idx"):
        base_embeddings.padding_idx = pad_id  # RoBERTa-style position ids count from the pad id
    config.vocab_size = len(old_ids)
    info = {
        "vocab_kind": kind, "vocab_size_before": len(by_id) + len(beyond), "vocab_size_after": len(old_ids),
        "corpus_tokens": len(used), "added_tokens_beyond_vocabulary": len(beyond),
    }
    return model, trimmed, info


def _is_fallback_piece(kind: str, token: str) -> bool:
    """Tokens unseen words fall back to: single characters (WordPiece, Unigram, with their
    continuation or word-start marks), byte pieces (Unigram byte_fallback), the byte alphabet (BPE)."""
    if kind == "BPE":
        return token in _byte_alphabet()
    if kind == "Unigram":
        return len(token) == 1 or (len(token) == 2 and token[0] == "\u2581") or (token.startswith("<0x") and len(token) == 6)
    return len(token) == 1 or (token.startswith("##") and len(token) == 3)


def _byte_alphabet() -> set[str]:
    from tokenizers import pre_tokenizers

    return set(pre_tokenizers.ByteLevel.alphabet())


def _merge_parts(merge: str | list[str]) -> tuple[str, str]:
    """A merge as its two parts (tokenizers writes "a b" strings or, since 0.20, [a, b] pairs)."""
    first, second = merge.split(" ", 1) if isinstance(merge, str) else merge
    return first, second


def _close_under_merges(kept: set[int], by_id: dict[int, str], spec: dict[str, Any]) -> set[int]:
    """Add the parts of every kept token a merge produces, recursively: BPE builds a token only
    through its parts, so a token whose parts are gone could never be produced again."""
    ids = {token: index for index, token in by_id.items()}
    parts_of: dict[str, list[tuple[str, str]]] = {}
    for merge in spec["merges"]:
        first, second = _merge_parts(merge)
        parts_of.setdefault(first + second, []).append((first, second))
    kept = set(kept)
    todo = [by_id[i] for i in kept]
    while todo:
        for pair in parts_of.get(todo.pop(), []):
            for part in pair:
                if part in ids and ids[part] not in kept:
                    kept.add(ids[part])
                    todo.append(part)
    return kept


def _renumber_post_processor(processor: dict[str, Any] | None, new_id: dict[int, int]) -> None:
    """The [CLS]/[SEP] ids baked into the post-processor follow the renumbering."""
    if not processor:
        return
    if processor.get("type") == "Sequence":
        for item in processor.get("processors", []):
            _renumber_post_processor(item, new_id)
    if processor.get("type") == "TemplateProcessing":
        for special in processor.get("special_tokens", {}).values():
            special["ids"] = [new_id[i] for i in special["ids"]]
    for key in ("cls", "sep"):  # BertProcessing / RobertaProcessing: [token, id]
        if key in processor and isinstance(processor[key], list):
            processor[key][1] = new_id[processor[key][1]]


def unk_share(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> float:
    """Share of [UNK] among the tokens of `texts`."""
    ids = [i for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in row]
    return sum(1 for i in ids if i == tokenizer.unk_token_id) / max(1, len(ids))
