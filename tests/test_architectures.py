"""Every supported encoder family, on tiny random checkpoints with their own kind of fast tokenizer:
adapters, students that reload to the logits they were built with, pruning that reloads, vocabulary
trimming that keeps the logits, and the stages run in-process from the teacher to the ONNX export."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import torch
import yaml
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification

from pipeline.architectures import SUPPORTED, architecture_for
from pipeline.compression import pruning
from pipeline.config import StudentConfig, params_from_dict
from pipeline.errors import ConfigError, ModelError
from pipeline.evaluation.record import ModelRecord
from pipeline.kd.students import build_student
from pipeline.models import load_tokenizer, load_trained, predict_logits, save_model
from pipeline.training.encoding import Collator, encode
from scripts.tiny_project import (
    TINY_ARCHITECTURES,
    TINY_CSV,
    make_tiny_model,
    read_tiny_texts,
    tiny_params_tree,
)
from stages import (
    distill_intermediate,
    distill_vanilla,
    export_onnx,
    prepare_data,
    prune,
    quantize,
    student_baseline,
    teacher_logits,
    train_teacher,
    verify_teacher,
)

NAMES = ["negative", "neutral", "positive"]
# What the architecture can express in config.json after removing heads (see pipeline/architectures.py).
NO_HEAD_PRUNING = {"mpnet", "deberta-v2", "modernbert"}
VOCAB_KIND = {
    "bert": "WordPiece", "distilbert": "WordPiece", "electra": "WordPiece", "mpnet": "WordPiece",
    "roberta": "BPE", "modernbert": "BPE", "xlm-roberta": "Unigram", "deberta-v2": "Unigram", "albert": "Unigram",
}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """model_type -> a tiny random checkpoint directory, built once per session on first use."""
    built: dict[str, object] = {}
    texts = read_tiny_texts()

    def get(model_type: str):
        if model_type not in built:
            built[model_type] = make_tiny_model(tmp_path_factory.mktemp(model_type), texts, model_type)
        return built[model_type]

    return get


def classifier(directory) -> AutoModelForSequenceClassification:
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(
        directory, num_labels=len(NAMES), use_safetensors=True, attn_implementation="eager"
    )


def test_the_tested_list_is_the_supported_list():
    assert sorted(TINY_ARCHITECTURES) == SUPPORTED


def test_unknown_architecture_is_named_with_the_supported_list():
    with pytest.raises(ModelError, match=r"'gpt2' is not supported .*albert, bert, deberta-v2"):
        architecture_for(type("Config", (), {"model_type": "gpt2"})())


@pytest.mark.parametrize("model_type", TINY_ARCHITECTURES)
def test_students_of_every_kind_reload_to_the_same_logits(model_type, tiny_checkpoints, tmp_path):
    teacher = classifier(tiny_checkpoints(model_type)).eval()
    tokenizer = load_tokenizer(str(tiny_checkpoints(model_type)))
    layers = teacher.config.num_hidden_layers
    infos = []
    for kind in (StudentConfig(num_layers=layers - 1), StudentConfig(num_layers=1, init="random")):
        student, info = build_student(teacher, kind, NAMES)
        infos.append(info)
        assert student.config.num_hidden_layers == kind.num_layers
        out = tmp_path / f"{kind.init}"
        save_model(student, tokenizer, out)  # raises when the reload differs
        reloaded = load_trained(out)
        texts = read_tiny_texts()[:8]
        assert torch.equal(predict_logits(student, tokenizer, texts, 32), predict_logits(reloaded, tokenizer, texts, 32))
    if model_type == "albert":  # the shared layer group is kept and applied fewer times
        assert infos[0] == {"init": "teacher", "shared_layer_repetitions": layers - 1}
    else:
        assert infos[0] == {"init": "teacher", "init_layers": list(range(2, layers + 1))}


def test_a_save_that_does_not_reload_fails(tiny_checkpoints, tmp_path):
    """A ModernBERT layer copied to another position (what keep_layers used to do) is caught."""
    model = classifier(tiny_checkpoints("modernbert")).eval()
    tokenizer = load_tokenizer(str(tiny_checkpoints("modernbert")))
    layers = model.model.layers
    layers[0], layers[1] = layers[1], layers[0]  # layer 0 has no attention norm, the others do
    with pytest.raises(ModelError, match="reloads to different logits"):
        save_model(model, tokenizer, tmp_path)


@pytest.mark.parametrize("model_type", TINY_ARCHITECTURES)
def test_pruning_and_trimming_reload_to_the_same_logits(model_type, tiny_checkpoints, tmp_path):
    directory = tiny_checkpoints(model_type)
    model, tokenizer = classifier(directory), load_tokenizer(str(directory))
    texts = read_tiny_texts()
    rows = [{"text": text, "label": NAMES[i % 3]} for i, text in enumerate(texts)]
    loader = DataLoader(encode(rows, tokenizer, 32, NAMES, "single_label"), batch_size=8, collate_fn=Collator(tokenizer))
    heads, neurons = pruning.importance_scores(model, loader, max_batches=2)
    layers = len(architecture_for(model).layers(model))
    assert heads.shape == (layers, 2) and neurons.shape == (layers, 64)
    assert (heads > 0).all() and (neurons > 0).any()

    if model_type in NO_HEAD_PRUNING:
        with pytest.raises(ConfigError, match=r"prune.heads_ratio=0.5: .*Set prune.heads_ratio=0, or prune.head_pruning=auto"):
            pruning.check_structured(model, 0.5, 1)
        pruning.check_structured(model, 0.0, 2)
    else:
        removed = pruning.prune_heads(model, heads, keep=1)
        assert pruning.heads_per_layer(model) == [1] * layers and all(len(v) == 1 for v in removed.values())
    pruning.prune_ffn(model, neurons, keep=24)
    assert pruning.ffn_width(model) == 24

    model.eval()
    corpus = texts[::3]  # the tiny vocabularies were built on every text: trim to a third of them
    before = predict_logits(model, tokenizer, corpus, 32)
    assert pruning.vocabulary_trim_problem(tokenizer) is None
    model, trimmed, info = pruning.trim_vocabulary(model, tokenizer, corpus, keep_top=3)
    assert info["vocab_kind"] == VOCAB_KIND[model_type]
    assert info["vocab_size_after"] < info["vocab_size_before"]
    # The training texts give the very same logits with the trimmed vocabulary.
    assert torch.allclose(predict_logits(model, trimmed, corpus, 32), before, atol=1e-5)
    # Unseen words still split into kept pieces, not all into the unknown token.
    assert pruning.unk_share(trimmed, ["Zany quixotic jackdaws"]) < 1
    save_model(model, trimmed, tmp_path)
    reloaded = load_trained(tmp_path)
    assert reloaded.config.vocab_size == info["vocab_size_after"]
    assert pruning.heads_per_layer(reloaded) == pruning.heads_per_layer(model)
    assert pruning.ffn_width(reloaded) == 24


def arch_params(root, checkpoint, **sections):
    (root / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(TINY_CSV, root / "data" / "tiny.csv")
    tree = tiny_params_tree(checkpoint)
    for name, values in sections.items():
        tree[name].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    return params_from_dict(tree, root=root)


STAGES = [
    prepare_data, train_teacher, verify_teacher, teacher_logits, student_baseline, distill_vanilla,
    distill_intermediate, prune,
    quantize, export_onnx,
]


# The whole chain costs 15-25 s per architecture, so `make test` runs it on the two families with the
# most special cases: ModernBERT (position-dependent layers, byte-level BPE, no head pruning) and
# ALBERT (shared layers, Unigram); FINCOMPRESS_ALL_ARCHITECTURES=1 runs all nine. The tests above
# cover every family's adapter.
ALL_ARCHITECTURES = os.environ.get("FINCOMPRESS_ALL_ARCHITECTURES") == "1"
CHAIN_BY_DEFAULT = ("modernbert", "albert")


@pytest.mark.slow
@pytest.mark.parametrize("model_type", TINY_ARCHITECTURES)
def test_stages_run_on_every_architecture(model_type, tiny_checkpoints, tmp_path):
    """Teacher to ONNX export in-process with default knobs. Where the architecture cannot drop heads,
    prune.head_pruning=required fails before training naming the knob; the default (auto) keeps
    the heads, prunes the FFN and trims the vocabulary, and says so in the record."""
    if model_type not in CHAIN_BY_DEFAULT and not ALL_ARCHITECTURES:
        pytest.skip("set FINCOMPRESS_ALL_ARCHITECTURES=1 to run the whole chain on every architecture")
    params = arch_params(tmp_path, tiny_checkpoints(model_type))
    timings = {}
    for stage in STAGES:
        start = time.perf_counter()
        if stage is prune and model_type in NO_HEAD_PRUNING:
            strict = arch_params(tmp_path, tiny_checkpoints(model_type), prune={"head_pruning": "required"})
            with pytest.raises(ConfigError, match="Set prune.heads_ratio=0"):
                stage.STAGE.execute(strict)
            assert not params.path(params.paths.pruned).exists()
        stage.STAGE.execute(params)
        timings[stage.STAGE.name] = round(time.perf_counter() - start, 1)
    info = ModelRecord.read(params.path(params.paths.pruned)).details
    assert info["vocab_trimmed"] and info["vocab_size"] < info.get("vocab_size_before", 0)
    assert info["ffn_width"] < info["ffn_width_before"]
    if model_type in NO_HEAD_PRUNING:
        assert info["heads_per_layer"] == info["heads_per_layer_before"] and "attention heads kept" in info["heads_note"]
    else:
        assert info["heads_per_layer"] != info["heads_per_layer_before"] and info["heads_pruned"]
    print(model_type, timings, {k: info[k] for k in ("heads_per_layer", "ffn_width", "vocab_size", "vocab_size_before")})


def test_head_gates_give_the_head_mask_gradient(tiny_checkpoints):
    """On BERT, which still takes a head_mask, the gate scores equal Michel et al.'s mask gradient,
    so BERT teachers prune exactly the heads they did before."""
    directory = tiny_checkpoints("bert")
    model, tokenizer = classifier(directory).eval(), load_tokenizer(str(directory))
    rows = [{"text": text, "label": NAMES[i % 3]} for i, text in enumerate(read_tiny_texts())]
    batches = list(DataLoader(encode(rows, tokenizer, 32, NAMES, "single_label"), batch_size=8, collate_fn=Collator(tokenizer)))[:2]
    mask = torch.ones(2, 2, requires_grad=True)
    expected = torch.zeros(2, 2)
    for batch in batches:
        model(**batch, head_mask=mask).loss.backward()
        expected += mask.grad.abs()
        mask.grad = None
    expected /= expected.norm(dim=1, keepdim=True)
    heads, _ = pruning.importance_scores(model, batches, max_batches=2)
    assert torch.allclose(heads, expected, atol=1e-5)


def test_albert_with_several_layer_groups_is_refused_before_training():
    from transformers import AlbertConfig, AlbertForSequenceClassification

    config = AlbertConfig(vocab_size=50, embedding_size=8, hidden_size=16, num_hidden_layers=4, num_hidden_groups=2,
                          num_attention_heads=2, intermediate_size=32, num_labels=3)
    teacher = AlbertForSequenceClassification(config)
    with pytest.raises(ConfigError, match="2 groups .*not supported. Use student.init=random"):
        build_student(teacher, StudentConfig(num_layers=2), NAMES)


def test_albert_refuses_a_choice_of_layers_it_does_not_have():
    from transformers import AlbertConfig, AlbertForSequenceClassification

    config = AlbertConfig(vocab_size=50, embedding_size=8, hidden_size=16, num_hidden_layers=4,
                          num_attention_heads=2, intermediate_size=32, num_labels=3)
    teacher = AlbertForSequenceClassification(config)
    with pytest.raises(ConfigError, match="init_layers=bottom: this teacher shares one layer .*leave init_layers at evenly"):
        build_student(teacher, StudentConfig(num_layers=2, init_layers="bottom"), NAMES)
    assert build_student(teacher, StudentConfig(num_layers=2), NAMES)[1] == {"init": "teacher", "shared_layer_repetitions": 2}


def test_a_vocabulary_that_cannot_be_trimmed_says_why():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "profit": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    assert "WordLevel" in pruning.vocabulary_trim_problem(tokenizer)
    with pytest.raises(ConfigError, match="prune.vocab=corpus cannot trim .*WordLevel.*Set prune.vocab=auto or none"):
        pruning.trim_vocabulary(None, tokenizer, ["profit"], keep_top=0)
