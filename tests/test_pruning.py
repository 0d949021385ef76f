"""Head/FFN importance and pruning, vocabulary trimming, magnitude pruning and the prune stage."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.compression import pruning
from pipeline.config.compression import RecoveryConfig
from pipeline.data.prepared import load_prepared, load_split
from pipeline.errors import ConfigError, DataError
from pipeline.evaluation.family import family
from pipeline.evaluation.metrics import paired_bootstrap_difference
from pipeline.evaluation.plots import read_curve
from pipeline.evaluation.record import ModelRecord
from pipeline.io import read_json
from pipeline.models import load_tokenizer, load_trained, predict_logits
from pipeline.training.encoding import Collator, encode
from scripts.tiny_project import make_tiny_model, read_tiny_texts
from stages import distill_intermediate, prune
from tests.helpers import copy_project

NAMES = ["negative", "neutral", "positive"]


@pytest.fixture
def teacher_and_data(trained_project):
    directory = trained_project.path(trained_project.paths.teacher)
    model = load_trained(directory)
    tokenizer = load_tokenizer(str(directory))
    rows = load_split(trained_project.path(trained_project.paths.prepared), "train")
    dataset = encode(rows, tokenizer, 32, NAMES, "single_label")
    loader = DataLoader(dataset, batch_size=8, collate_fn=Collator(tokenizer))
    return model, tokenizer, rows, loader


def test_keep_counts_and_schedule():
    assert pruning.keep_count(12, 0.5, "heads", "prune.heads_ratio") == 6
    assert pruning.keep_count(2, 0.5, "heads", "prune.heads_ratio") == 1
    with pytest.raises(ConfigError, match=r"prune.heads_ratio=0.8 would remove every one of the 2 .* at most 0.500"):
        pruning.keep_count(2, 0.8, "attention heads", "prune.heads_ratio")
    assert pruning.schedule(12, 6, 1) == [6]
    assert pruning.schedule(12, 6, 3) == [10, 8, 6]


def test_zeroed_head_ranks_lowest(teacher_and_data):
    model, _, _, loader = teacher_and_data
    attention = model.bert.encoder.layer[1].attention
    size = attention.self.attention_head_size
    with torch.no_grad():  # head 1 of layer 2 now outputs nothing
        attention.self.value.weight[size : 2 * size] = 0
        attention.self.value.bias[size : 2 * size] = 0
    heads, neurons = pruning.importance_scores(model, loader, max_batches=3)
    assert heads.shape == (2, 2) and neurons.shape == (2, 64)
    assert heads[1, 1] == heads.min() and heads[1, 1] < 1e-6
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_structured_pruning_reloads_to_the_same_logits(teacher_and_data, tmp_path):
    model, tokenizer, rows, loader = teacher_and_data
    heads, neurons = pruning.importance_scores(model, loader, max_batches=2)
    removed = pruning.prune_heads(model, heads, keep=1)
    pruning.prune_ffn(model, neurons, keep=24)
    assert pruning.heads_per_layer(model) == [1, 1] and pruning.ffn_width(model) == 24
    assert set(removed) == {0, 1}
    model, tokenizer, info = pruning.trim_vocabulary(model, tokenizer, [r["text"] for r in rows], keep_top=3)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    reloaded, reloaded_tokenizer = load_trained(tmp_path), load_tokenizer(str(tmp_path))
    texts = [r["text"] for r in rows[:10]] + ["A sentence with zzz unseen qqq words."]
    expected = predict_logits(model, tokenizer, texts, 32)
    assert torch.equal(expected, predict_logits(reloaded, reloaded_tokenizer, texts, 32))
    assert reloaded.config.vocab_size == info["vocab_size_after"] < info["vocab_size_before"]


def test_vocabulary_trimming_keeps_token_meaning(teacher_and_data):
    model, tokenizer, rows, _ = teacher_and_data
    old_embeddings = model.get_input_embeddings().weight.detach().clone()
    corpus = [r["text"] for r in rows]
    texts = corpus[:12]
    before = predict_logits(model, tokenizer, texts, 32)
    old_tokens = [tokenizer.convert_ids_to_tokens(tokenizer(t)["input_ids"]) for t in texts]
    trimmed_model, trimmed, info = pruning.trim_vocabulary(model, tokenizer, corpus, keep_top=0)
    new_ids = [trimmed(t)["input_ids"] for t in texts]
    assert [trimmed.convert_ids_to_tokens(ids) for ids in new_ids] == old_tokens
    for ids, tokens in zip(new_ids, old_tokens):
        for new_id, token in zip(ids, tokens):
            old_id = tokenizer.convert_tokens_to_ids(token)
            assert torch.equal(trimmed_model.get_input_embeddings().weight[new_id], old_embeddings[old_id])
    assert torch.allclose(predict_logits(trimmed_model, trimmed, texts, 32), before, atol=1e-6)
    # Words never seen in training fall back to single characters, not [UNK].
    unseen = ["Profitable marketplaces hedged"]
    assert pruning.unk_share(tokenizer, unseen) == 0 and pruning.unk_share(trimmed, unseen) == 0
    assert trimmed.pad_token_id == trimmed_model.config.pad_token_id == 0


def project_with_student(params, tmp_path, **sections):
    project = copy_project(params, tmp_path, **sections)
    distill_intermediate.STAGE.execute(project)
    return project


def test_prune_stage_structured_in_two_steps(trained_project, tmp_path):
    params = project_with_student(
        trained_project, tmp_path, student={"num_layers": 2}, prune={"steps": 2, "heads_ratio": 0.5, "ffn_ratio": 0.5}
    )
    metrics = prune.STAGE.execute(params)
    out = params.path(params.paths.pruned)
    record = ModelRecord.read(out)
    assert record.details["heads_per_layer"] == [1, 1] and record.details["ffn_width"] == 32
    # Recovered from the source's layers (the default), each kept head learned the source head it was.
    assert record.details["recovery_attention_heads"] == "each kept head against the source head it was"
    assert record.num_parameters < record.details["params_before"] and metrics["parameter_reduction"] > 0
    assert set(record.details["unk_share"]) == {"validation", "test"}
    curve = (params.path(params.paths.curves) / "prune.csv").read_text().splitlines()
    assert "prune_step" in curve[0] and "loss_hidden" in curve[0] and len(curve) == 3
    # The drop's paired interval: both students' validation answers on the same resamples.
    prepared = load_prepared(params.path(params.paths.prepared))
    labels, texts = prepared.labels("validation"), prepared.texts("validation")
    answers = [predict_logits(load_trained(d), load_tokenizer(str(d)), texts, 32).numpy().argmax(-1)
               for d in (params.path(params.prune.source), out)]
    expected = paired_bootstrap_difference(labels, *answers, samples=params.evaluation.bootstrap_samples,
                                           seed=params.evaluation.seed)
    assert (metrics["validation_f1_drop_ci95_low"], metrics["validation_f1_drop_ci95_high"]) == pytest.approx(expected)


def test_prune_stage_with_nothing_to_remove_passes_the_source_through(trained_project, tmp_path):
    params = project_with_student(trained_project, tmp_path, prune={"heads_ratio": 0.0, "ffn_ratio": 0.0, "vocab": "none"})
    metrics = prune.STAGE.execute(params)
    source = ModelRecord.read(params.path(params.prune.source))
    record = ModelRecord.read(params.path(params.paths.pruned))
    assert record.details["recovery"] == "skipped: nothing was pruned" and record.training_seconds == 0
    assert metrics["validation_f1_drop"] == 0 and record.validation == source.validation
    before, after = load_trained(params.path(params.prune.source)), load_trained(params.path(params.paths.pruned))
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))


def test_a_switched_off_intermediate_student_is_not_built_and_cannot_be_pruned(trained_project, tmp_path):
    params = copy_project(trained_project, tmp_path, distill_intermediate={"enabled": False})
    metrics = distill_intermediate.STAGE.execute(params)
    assert metrics["built"] is False
    member = next(m for m in family(params) if m.name == "student_intermediate")
    assert not member.is_present() and member.not_built_reason() == "distill_intermediate.enabled is false"
    assert read_curve(params.path(params.paths.curves) / "distill_intermediate.csv") == [], "an empty curve: no panel"
    with pytest.raises(ConfigError, match=r"prune.source=models/student_intermediate was not built "
                                          r"\(distill_intermediate.enabled is false\): .* prune.source=models/student_vanilla"):
        prune.run(params)
    assert not params.path(params.paths.pruned).exists(), "nothing written"


def test_drop_layers_keeps_evenly_spaced_layers_ending_at_the_last(teacher_and_data):
    model = teacher_and_data[0]
    total = model.config.num_hidden_layers
    dropped, kept = pruning.drop_layers(model, 1)
    assert kept == [total] and dropped.config.num_hidden_layers == 1
    last = model.base_model.encoder.layer[total - 1].state_dict()
    assert all(torch.equal(last[key], value) for key, value in dropped.base_model.encoder.layer[0].state_dict().items())
    assert model.config.num_hidden_layers == total  # the source is not changed
    with pytest.raises(ConfigError, match=f"prune.num_layers={total + 1}: the source student has only {total} layers"):
        pruning.drop_layers(model, total + 1)


def test_a_pruned_student_learns_each_kept_head_from_the_source_head_it_was():
    """With heads removed, the attention term compares each kept head with the source head it was
    (guide_head_index), which the head average cannot: in a one-layer model the kept heads' maps equal
    their source heads' exactly, so the matched term is zero and the averaged one is not."""
    import copy

    from transformers import BertConfig, BertForSequenceClassification

    from pipeline.errors import ModelError
    from pipeline.kd.terms import AttentionMSE, match_guide_heads
    from pipeline.training.loss import KDBatch, KDLoss

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32,
                        num_labels=3, initializer_range=0.5, attn_implementation="eager")  # peaked maps, not uniform
    source = BertForSequenceClassification(config).eval()
    source.prune_heads({0: [1]})  # the source had lost a head before: it holds original heads 0, 2, 3
    student = copy.deepcopy(source)
    assert pruning.prune_heads(student, torch.tensor([[3.0, 1.0, 2.0]]), keep=2) == {0: [2]}
    assert pruning.guide_head_index(student, source, [1]) == [[0, 2]]  # original heads 0 and 3, in the source's order

    inputs = {"input_ids": torch.randint(0, 40, (2, 6)), "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])}
    with torch.no_grad():
        batch = KDBatch(student=student(**inputs, output_attentions=True), labels=torch.zeros(2, dtype=torch.long),
                        attention_mask=inputs["attention_mask"], teacher=source(**inputs, output_attentions=True))
    term = AttentionMSE(1.0, [1])
    averaged = term(batch).item()
    assert match_guide_heads(KDLoss([term], "single_label"), [[0, 2]]) and term.guide_heads == [[0, 2]]
    assert averaged > 1e-3 and term(batch).item() < averaged * 1e-6
    assert not match_guide_heads(None, [[0, 2]])

    # A student cut to the source's second layer, then pruned: the index follows the cut.
    deep = BertForSequenceClassification(BertConfig(**{**config.to_dict(), "num_hidden_layers": 2, "pruned_heads": {}}))
    deep.prune_heads({1: [1]})
    cut, kept = pruning.drop_layers(deep, 1)
    pruning.prune_heads(cut, torch.tensor([[3.0, 1.0, 2.0]]), keep=2)
    assert kept == [2] and pruning.guide_head_index(cut, deep, kept) == [[0, 2]]
    stranger = BertForSequenceClassification(BertConfig(**{**config.to_dict(), "num_hidden_layers": 2, "pruned_heads": {}}))
    stranger.prune_heads({1: [0, 3]})  # a guide without the student's heads 0 and 3
    with pytest.raises(ModelError, match=r"student layer 1 has heads \[0, 3\] that its guide's layer 2 does not"):
        pruning.guide_head_index(cut, stranger, kept)


def test_prune_stage_drops_layers_and_recovers(trained_project, tmp_path):
    params = project_with_student(
        trained_project, tmp_path, student={"num_layers": 2},
        prune={"num_layers": 1, "heads_ratio": 0.0, "ffn_ratio": 0.0, "vocab": "none"},
    )
    metrics = prune.STAGE.execute(params)
    record = ModelRecord.read(params.path(params.paths.pruned))
    assert record.details["layers_before"] == 2 and record.details["layers_kept"] == [2]
    assert metrics["num_layers"] == 1 and "recovery" not in record.details and record.training_seconds > 0
    assert load_trained(params.path(params.paths.pruned)).config.num_hidden_layers == 1
    assert record.num_parameters < record.details["params_before"]


@pytest.mark.parametrize("hidden_weight", [0.0, 1.0])
def test_prune_recovery_can_distil_from_the_unpruned_source_without_the_teacher(trained_project, tmp_path, hidden_weight):
    recovery = {**trained_project.prune.recovery.model_dump(mode="json"), "distil_from": "source", "hidden_weight": hidden_weight,
                "attention_weight": 0.0}  # hidden_weight=0: the logit terms alone
    params = project_with_student(
        trained_project, tmp_path, student={"num_layers": 2},
        prune={"num_layers": 1, "ffn_ratio": 0.5, "vocab": "none", "recovery": recovery},
    )
    if hidden_weight > 0:
        # The teacher's cache holds its internals of the kept layer; the recovery must not read them.
        assert 2 in read_json(params.path(params.paths.teacher_logits) / "internals.json")["layers"]
    else:  # the recovery reads neither the teacher's logits nor its internals: without its cache it still runs
        shutil.rmtree(params.path(params.paths.teacher_logits))
    prune.STAGE.execute(params)
    record = ModelRecord.read(params.path(params.paths.pruned))
    assert record.details["recovery_distils_from"] == "source" and record.details["layers_kept"] == [2]
    assert record.training_seconds > 0 and record.details["ffn_width"] < record.details["ffn_width_before"]
    header = (params.path(params.paths.curves) / "prune.csv").read_text().splitlines()[0]
    assert "loss_kl" in header and ("loss_hidden" in header) == (hidden_weight > 0)
    source_logits = params.path(params.paths.checkpoints) / "prune" / "source_logits" / "train.npy"
    if hidden_weight > 0:  # the source runs live for its layers, and gives its logits in the same pass
        assert not source_logits.exists()
        return
    # The logit terms alone read the source's own logits, computed once on the texts it trains on.
    source_dir = params.path(params.prune.source)
    texts = [row["text"] for row in load_split(params.path(params.paths.prepared), "train")]
    expected = predict_logits(load_trained(source_dir), load_tokenizer(str(source_dir)), texts, params.task.max_length)
    assert np.allclose(np.load(source_logits), expected.numpy(), atol=1e-4)
    # The default distils from the teacher, and so reads its cache.
    teacher_params = copy_project(params, tmp_path / "teacher", prune={"recovery": {**recovery, "distil_from": "teacher"}})
    with pytest.raises(DataError, match="teacher_logits"):
        prune.run(teacher_params)
    with pytest.raises(ValueError, match="the teacher_logits cache holds the teacher's internals"):
        RecoveryConfig(distil_from="source", teacher_internals="cached")


def test_source_layers_recovery_learns_the_sources_layers_and_the_teachers_logits(trained_project, tmp_path, monkeypatch):
    """distil_from=source_layers (Patient KD for a cut student): the unpruned student runs live for the
    layer terms, each kept layer against the source layer it was; the soft term reads the teacher's
    cached logits, not the source's."""
    from pipeline.kd import phases
    from pipeline.kd import teacher_logits as cache
    from pipeline.models import state_fingerprint
    from pipeline.training.trainer import DistillationTrainer

    recovery = {**trained_project.prune.recovery.model_dump(mode="json"), "distil_from": "source_layers",
                "hidden_weight": 1.0, "attention_weight": 1.0, "epochs": 1}
    params = project_with_student(
        trained_project, tmp_path, student={"num_layers": 2},
        prune={"num_layers": 1, "ffn_ratio": 0.0, "vocab": "none", "recovery": recovery},
    )
    seen = []

    class Spy(DistillationTrainer):
        def __init__(self, *args, **kwargs):
            seen.append((kwargs["teacher"], kwargs["teacher_internals"], kwargs["train_dataset"], kwargs["kd"]))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(phases, "DistillationTrainer", Spy)
    prune.STAGE.execute(params)
    (guide, store, dataset, kd), = seen
    source = load_trained(params.path(params.prune.source))
    assert state_fingerprint(guide) == state_fingerprint(source) and store is None  # live, the source itself
    terms = {term.name: term for term in kd.terms}  # the kept layer learns layer 2 of 2, as it was
    assert terms["hidden"].pairs == [(0, 0), (1, 2)] and terms["attention"].layer_map == [2]
    teacher = load_trained(params.path(params.paths.teacher))
    train_texts = [row["text"] for row in load_split(params.path(params.paths.prepared), "train")]
    expected = cache.load(params.path(params.paths.teacher_logits), "train", train_texts, params.task.max_length,
                          state_fingerprint(teacher))
    assert np.allclose(np.array(dataset["teacher_logits"][:len(train_texts)]), expected)
    source_says = predict_logits(source, load_tokenizer(str(params.path(params.prune.source))), train_texts, 32)
    assert not np.allclose(expected, source_says.numpy(), atol=1e-3)  # the two guides differ: the test can tell
    record = ModelRecord.read(params.path(params.paths.pruned))
    assert record.details["recovery_distils_from"] == "source_layers"
    # Half the heads went too (the tiny project's heads_ratio): the kept head learned the one it was in layer 2.
    pruned = load_trained(params.path(params.paths.pruned))
    assert terms["attention"].guide_heads == pruning.guide_head_index(pruned, source, [2])
    assert record.details["recovery_attention_heads"] == "each kept head against the source head it was"
    header = (params.path(params.paths.curves) / "prune.csv").read_text().splitlines()[0]
    assert all(f"loss_{name}" in header for name in ("kl", "hidden", "attention"))
    with pytest.raises(ValueError, match="distil_from=source_layers with teacher_internals=cached"):
        RecoveryConfig(distil_from="source_layers", teacher_internals="cached")


def test_prune_stage_magnitude(trained_project, tmp_path):
    params = project_with_student(trained_project, tmp_path, prune={"method": "magnitude", "sparsity": 0.6, "vocab": "none"})
    metrics = prune.STAGE.execute(params)
    info = ModelRecord.read(params.path(params.paths.pruned)).details
    assert metrics["sparsity_encoder_linear"] == pytest.approx(0.6, abs=0.01)
    assert info["gzip_size_mb"] < info["source_gzip_size_mb"]
    assert "no faster" in info["note"]
    reloaded = load_trained(params.path(params.paths.pruned))
    assert pruning.sparsity(pruning.encoder_linears(reloaded)) == pytest.approx(0.6, abs=0.01)


def test_prune_stage_rejects_a_ratio_that_removes_every_head(trained_project, tmp_path):
    params = project_with_student(trained_project, tmp_path, prune={"heads_ratio": 0.9})
    with pytest.raises(ConfigError, match="would remove every one of the 2 attention heads"):
        prune.STAGE.execute(params)
    assert not params.path(params.paths.pruned).exists()


# --------------------------------------------------------------------------- added tokens (issue 30 class 8)

DOMAIN_TOKENS = ["ebitda", "q3guidance"]


@pytest.mark.parametrize(
    ("model_type", "mask_after_pieces"),
    [("bert", False), ("roberta", False), ("xlm-roberta", True), ("deberta-v2", False), ("modernbert", False)],
    ids=["WordPiece", "byte-level BPE", "Unigram, XLM-R <mask> after the pieces", "Unigram (DeBERTa)", "BPE (ModernBERT)"],
)
def test_added_tokens_past_the_vocabulary_are_kept_and_remapped(tmp_path, model_type, mask_after_pieces):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = read_tiny_texts()
    directory = make_tiny_model(tmp_path / model_type, texts, model_type, mask_after_pieces=mask_after_pieces)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    pieces = tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=False)
    tokenizer.add_tokens(DOMAIN_TOKENS)  # a user's domain tokens ...
    tokenizer.add_special_tokens({"additional_special_tokens": ["<ent>"]})  # ... and a special one
    beyond = sorted(i for i in tokenizer.get_added_vocab().values() if i >= pieces)
    assert len(beyond) == 3 + mask_after_pieces, "ids past the model's vocabulary, as in the issue"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=3).eval()
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    corpus = texts[:8] + [f"EBITDA rose <ent> on Q3guidance {tokenizer.mask_token or ''}"]
    before_ids = tokenizer(corpus, padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**before_ids).logits
    trimmed_model, trimmed, info = pruning.trim_vocabulary(model, tokenizer, corpus, keep_top=0)
    assert info["vocab_size_after"] < info["vocab_size_before"] and info["added_tokens_beyond_vocabulary"] == len(beyond)
    after_ids = trimmed(corpus, padding=True, return_tensors="pt")
    assert [trimmed.convert_ids_to_tokens(row) for row in after_ids["input_ids"].tolist()] == [
        tokenizer.convert_ids_to_tokens(row) for row in before_ids["input_ids"].tolist()], "the same tokens"
    with torch.no_grad():
        assert torch.allclose(trimmed_model(**after_ids).logits, before, atol=1e-5)
    # Saved and reloaded, as the prune stage does: the added tokens keep their new ids.
    trimmed_model.save_pretrained(tmp_path / "out", safe_serialization=True)
    trimmed.save_pretrained(tmp_path / "out")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert reloaded(corpus)["input_ids"] == trimmed(corpus)["input_ids"]
    assert len(reloaded) == trimmed_model.config.vocab_size == info["vocab_size_after"]
    for token in [*DOMAIN_TOKENS, "<ent>"]:
        assert reloaded.convert_tokens_to_ids(token) >= info["vocab_size_after"] - len(beyond)


def test_prune_stage_trims_the_vocabulary_to_every_text_the_student_learned_from(trained_project, tmp_path):
    """The transfer texts' words keep their own pieces after trimming, not only the training texts'
    (trimmed to the training texts alone, the FPB student lost 2.0 validation points)."""
    from pipeline.data.prepared import load_prepared
    from stages import prepare_data, teacher_logits

    prepared_dir = trained_project.path(trained_project.paths.prepared)
    train_words = {w for r in load_split(prepared_dir, "train") for w in r["text"].lower().split()}
    unseen = sorted({w for r in load_split(prepared_dir, "validation") for w in r["text"].lower().split()} - train_words)
    transfer_text = " ".join(unseen[:12])
    (tmp_path / "transfer.txt").write_text(transfer_text + "\n")
    params = copy_project(
        trained_project, tmp_path, transfer={"path": str(tmp_path / "transfer.txt")},
        prune={"heads_ratio": 0.0, "ffn_ratio": 0.0, "vocab": "corpus", "vocab_keep_top": 0},
    )
    prepare_data.STAGE.execute(params)
    assert load_prepared(params.path(params.paths.prepared)).transfer_texts() == [transfer_text]
    teacher_logits.STAGE.execute(params)
    distill_intermediate.STAGE.execute(params)
    prune.STAGE.execute(params)
    before = load_tokenizer(str(params.path(params.prune.source)))
    after = load_tokenizer(str(params.path(params.paths.pruned)))
    pieces = before.tokenize(transfer_text)
    assert after.tokenize(transfer_text) == pieces and any(p not in before.tokenize(" ".join(train_words)) for p in pieces)
    assert after.vocab_size < before.vocab_size
