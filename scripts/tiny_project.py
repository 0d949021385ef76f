"""A tiny runnable FinCompress project: a random 2-layer BERT with a WordPiece vocabulary written for a
74-sentence corpus (or, with make_tiny_model, any of the nine supported architectures with its own
kind of fast tokenizer), params sized for seconds, laid out with the code and dvc.yaml as a git + DVC
repository. The tests (tests/conftest.py) and scripts/prefect_e2e.py build their projects with it."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_CSV = REPO / "tests" / "data" / "tiny_sentiment.csv"


def tiny_vocabulary(texts: list[str]) -> list[str]:
    words = sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.lower())})
    chars = sorted({c for w in words for c in w})
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + [f"##{c}" for c in chars] + [
        w for w in words if len(w) > 1
    ]


def make_tiny_bert(directory: Path, texts: list[str], seed: int = 0, hidden_size: int = 32) -> Path:
    """A random 2-layer BERT (hidden 32, 2 heads, FFN twice as wide) with a WordPiece vocabulary
    written for `texts` (other texts give another vocabulary: a student init with its own tokenizer)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(tiny_vocabulary(texts)) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


# The special tokens of each tokenizer kind, in the order of their first ids.
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
TINY_WIDTHS = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128}
TINY_ARCHITECTURES = (
    "bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "deberta-v2", "albert", "modernbert",
)


def _wordpiece(directory: Path, texts: list[str], specials: list[str], cls_name: str):
    import transformers

    (directory / "vocab.txt").write_text("\n".join(specials + tiny_vocabulary(texts)[5:]) + "\n")
    return getattr(transformers, cls_name)(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)


def _byte_level_bpe(texts: list[str], specials: list[str], template: tuple[str, str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    cls, sep = template
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} {sep} $B {sep}",
        special_tokens=[(t, tokenizer.token_to_id(t)) for t in (cls, sep)],
    )
    return tokenizer


def _unigram(texts: list[str], specials: list[str], unk: str, template: tuple[str, str]):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=250, special_tokens=specials, unk_token=unk)
    tokenizer.train_from_iterator(texts, trainer)
    cls, sep = template
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B {sep}",
        special_tokens=[(t, tokenizer.token_to_id(t)) for t in (cls, sep)],
    )
    return tokenizer


def make_tiny_model(directory: Path, texts: list[str], model_type: str, seed: int = 0, mask_after_pieces: bool = False) -> Path:
    """A random encoder of `model_type` (hidden 32, 2-3 layers, 2 heads) with a fast tokenizer of its
    family's kind trained offline on `texts`: WordPiece (BERT, DistilBERT, ELECTRA, MPNet), byte-level
    BPE (RoBERTa, ModernBERT) or Unigram (XLM-RoBERTa, DeBERTa-v2, ALBERT). Safetensors weights.
    `mask_after_pieces`: XLM-RoBERTa's <mask> is an added token after the Unigram pieces, as in the real
    checkpoint (an id past the model vocabulary), not one of the pieces."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel, PreTrainedTokenizerFast

    if model_type == "bert":
        return make_tiny_bert(directory, texts, seed)
    directory.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {}
    if model_type in ("distilbert", "electra"):
        name = {"distilbert": "DistilBertTokenizerFast", "electra": "ElectraTokenizerFast"}[model_type]
        tokenizer = _wordpiece(directory, texts, BERT_SPECIALS, name)
    elif model_type == "mpnet":
        tokenizer = _wordpiece(directory, texts, ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"], "MPNetTokenizerFast")
    elif model_type == "roberta":
        backend = _byte_level_bpe(texts, ROBERTA_SPECIALS, ("<s>", "</s>"))
        tokenizer = transformers.RobertaTokenizerFast(tokenizer_object=backend)
    elif model_type == "modernbert":
        backend = _byte_level_bpe(texts, BERT_SPECIALS, ("[CLS]", "[SEP]"))
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
            mask_token="[MASK]", model_input_names=["input_ids", "attention_mask"],
        )
        extra = {"num_hidden_layers": 3, "global_attn_every_n_layers": 2, "local_attention": 8,
                 "pad_token_id": 0, "cls_token_id": 2, "sep_token_id": 3, "bos_token_id": 2, "eos_token_id": 3}
    elif model_type == "xlm-roberta":
        specials = [t for t in ROBERTA_SPECIALS if t != "<mask>"] if mask_after_pieces else ROBERTA_SPECIALS
        backend = _unigram(texts, specials, "<unk>", ("<s>", "</s>"))
        tokenizer = transformers.XLMRobertaTokenizerFast(tokenizer_object=backend)  # adds a missing <mask> last
    elif model_type == "deberta-v2":
        backend = _unigram(texts, BERT_SPECIALS, "[UNK]", ("[CLS]", "[SEP]"))
        tokenizer = transformers.DebertaV2TokenizerFast(tokenizer_object=backend)
        # DeBERTa-v3's layout: relative attention with shared key projections, position buckets.
        extra = {"relative_attention": True, "pos_att_type": ["p2c", "c2p"], "position_buckets": 16,
                 "max_relative_positions": -1, "share_att_key": True, "norm_rel_ebd": "layer_norm",
                 "position_biased_input": False, "type_vocab_size": 0, "pad_token_id": 0}
    elif model_type == "albert":
        backend = _unigram(texts, BERT_SPECIALS, "[UNK]", ("[CLS]", "[SEP]"))
        tokenizer = transformers.AlbertTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
        extra = {"embedding_size": 16, "num_hidden_groups": 1, "pad_token_id": 0}
    else:
        raise ValueError(f"no tiny recipe for {model_type}")
    if model_type in ("roberta", "xlm-roberta"):
        extra = {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}
    widths = {"num_hidden_layers": 2, **TINY_WIDTHS, **extra}
    if model_type == "distilbert":
        widths = {"dim": 32, "n_heads": 2, "n_layers": 2, "hidden_dim": 64, "max_position_embeddings": 128}
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **widths)
    torch.manual_seed(seed)
    AutoModel.from_config(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def read_tiny_texts() -> list[str]:
    with open(TINY_CSV, newline="") as handle:
        return [row["text"] for row in csv.DictReader(handle)]


def tiny_params_tree(tiny_bert: Path, data_path: str = "data/tiny.csv") -> dict[str, Any]:
    """A complete params tree sized for seconds, not minutes."""
    tree = yaml.safe_load((REPO / "params.yaml").read_text())
    budget = {"batch_size": 8, "eval_batch_size": 32, "seed": 0, "warmup_ratio": 0.0}
    tree["data"].update(source="csv", path=data_path, validation_fraction=0.2, test_fraction=0.2, seed=0)
    tree["teacher"].update(model=str(tiny_bert), epochs=20, learning_rate=3e-3, **budget)
    tree["task"]["max_length"] = 32
    tree["verify_teacher"]["min_macro_f1"] = 0.0
    tree["student"].update(num_layers=1, epochs=2, learning_rate=3e-3, **budget)
    # The tests exercise trimming and the removal of half the heads (the demo's defaults prune less).
    tree["prune"].update(importance_batches=2, heads_ratio=0.5, ffn_ratio=0.75, vocab="auto", vocab_keep_top=5)
    tree["prune"]["recovery"].update(epochs=1, learning_rate=1e-3, **budget)
    tree["benchmark"].update(min_runs=5, min_rounds=2, max_runs=20, max_seconds=1.0, round_seconds=0.0, warmup_runs=1,
                             throughput_batches=1, throughput_batch_size=4)
    tree["export_onnx"]["int8_timing"].update(min_runs=5, min_seconds=0.0, warmup_runs=1, rounds=1)
    tree["evaluation"]["bootstrap_samples"] = 50
    tree["report"]["sla"].update(max_latency_ms=1000.0, min_f1_retention=0.0)
    tree["flow"].update(retries=0, retry_delay_seconds=0)
    return tree


def write_project(root: Path, tree: dict[str, Any]) -> Path:
    """Lay out a runnable project in `root`: code, dvc.yaml, tiny data, params.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("pipeline", "stages"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "data").mkdir(exist_ok=True)
    shutil.copy(TINY_CSV, root / "data" / "tiny.csv")
    (root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    return root


GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
}


def sh(
    args: list[str], cwd: Path, check: bool = True, timeout: float = 1200, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a command with this interpreter's bin first on PATH (dvc.yaml says `python -m ...`)."""
    env = {
        **os.environ, **GIT_IDENTITY, "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(env or {}),
    }
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def init_repo(root: Path) -> Path:
    """Make `root` a committed git + DVC repository (DVC experiments and the queue need commits)."""
    sh(["git", "init", "-q"], root)
    sh([sys.executable, "-m", "dvc", "init", "-q"], root)
    sh([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], root)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "tiny project"], root)
    return root


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "dvc", *args], root, check)
