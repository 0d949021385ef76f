"""Students with their own tokenizer (issue 14, point 2): the same-tokenizer check, the teacher's
pooled hidden states cached by teacher_logits and looked up by text, the pooled hidden-state term,
and a family (baseline, vanilla, intermediate, pruned, quantized, ONNX) from a tiny BERT student init
whose vocabulary is not the teacher's. The same-tokenizer path is covered by test_distill's recorded
losses and test_transfer's bitwise cache check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from pipeline.config import DistillIntermediateConfig, StudentConfig, params_from_dict
from pipeline.data.prepared import load_prepared
from pipeline.errors import ConfigError, DataError
from pipeline.evaluation.record import ModelRecord
from pipeline.export.onnx import OnnxClassifier
from pipeline.kd import teacher_logits as cache
from pipeline.kd.students import build_student, student_tokenizer
from pipeline.kd.terms import NEEDS_SHARED_TOKENIZER, build_kd_loss, mean_pool, relative_mse
from pipeline.kd.texts import KDTexts
from pipeline.kd.token_map import same_tokenizer
from pipeline.models import (
    load_pretrained_classifier,
    load_tokenizer,
    load_trained,
    load_trained_with_tokenizer,
    predict_logits,
    state_fingerprint,
)
from pipeline.training.encoding import Collator, encode_splits
from pipeline.training.loss import KDBatch
from scripts.tiny_project import make_tiny_bert, read_tiny_texts
from stages import (
    distill_intermediate,
    distill_vanilla,
    export_onnx,
    prepare_data,
    prune,
    quantize,
    student_baseline,
    teacher_logits,
)
from tests.helpers import copy_project

TRANSFER = [
    "Analysts expect the bank to raise its dividend next year.",
    "The retailer closed twelve stores in the northern region.",
]


@pytest.fixture(scope="module")
def student_init(tmp_path_factory):
    """A pretrained-student stand-in: a tiny BERT, narrower than the teacher (hidden 16), whose
    WordPiece vocabulary was written for half the corpus, so it is not the teacher's."""
    return make_tiny_bert(tmp_path_factory.mktemp("student_init"), read_tiny_texts()[::2], seed=1, hidden_size=16)


@pytest.fixture(scope="module")
def cross_project(trained_project, student_init, tmp_path_factory):
    """The trained tiny project with a transfer set and student.init = the other-vocabulary BERT,
    after teacher_logits (which then also caches pooled hidden states)."""
    root = tmp_path_factory.mktemp("cross_project")
    params = copy_project(trained_project, root)
    (root / "data" / "transfer.txt").write_text("\n".join(TRANSFER) + "\n")
    tree = params.model_dump(mode="json")
    tree["transfer"]["path"] = "data/transfer.txt"
    tree["student"].update(init=str(student_init), epochs=1)
    tree["export_onnx"].update(export_teacher=False)
    # Runs of its own: test_onnx reads the oldest export_onnx run of the shared experiment as its own.
    tree["tracking"]["experiment"] = "fincompress-cross-tokenizer"
    params = params_from_dict(tree, root=root)
    prepare_data.STAGE.execute(params)
    metrics = teacher_logits.STAGE.execute(params)
    assert metrics["pooled_layers"] == 3 and metrics["transfer_rows"] == 2  # every layer of the 2-layer teacher
    return params


def teacher_and_tokenizer(params):
    prepared = load_prepared(params.path(params.paths.prepared))
    teacher, tokenizer = load_trained_with_tokenizer(params.path(params.paths.teacher), prepared.label_names)
    return prepared, teacher, tokenizer


def vocabulary(directory) -> dict[str, int]:
    return load_tokenizer(str(directory)).get_vocab()


def test_same_tokenizer_means_same_vocabulary_and_same_ids(trained_project, tiny_bert, student_init, tmp_path):
    prepared, teacher, tokenizer = teacher_and_tokenizer(trained_project)
    texts = prepared.texts("train")
    assert same_tokenizer(tokenizer, load_tokenizer(str(tiny_bert)), texts, 32)
    assert not same_tokenizer(tokenizer, load_tokenizer(str(student_init)), texts, 32)
    # The same vocabulary, but no lowercasing: other ids for the same texts, so another tokenizer.
    cased = type(tokenizer)(vocab_file=str(tiny_bert / "vocab.txt"), do_lower_case=False)
    assert cased.get_vocab() == tokenizer.get_vocab()
    assert not same_tokenizer(tokenizer, cased, texts, 32)
    # A pretrained init with the teacher's tokenizer uses it, exactly as before; another keeps its own.
    names = prepared.label_names
    same_init = StudentConfig(num_layers=1, init=str(tiny_bert))
    student, _ = build_student(teacher, same_init, names)
    train_only = KDTexts(texts, [], [])
    shared_tokenizer, alignment = student_tokenizer(same_init, tokenizer, student, train_only, 32)
    assert shared_tokenizer is tokenizer and alignment.kind == "shared"
    other_init = StudentConfig(num_layers=1, init=str(student_init))
    student, info = build_student(teacher, other_init, names)
    own, alignment = student_tokenizer(other_init, tokenizer, student, train_only, 32)
    assert alignment.kind == "pooled" and alignment.texts_cut_differently > 0 and own.get_vocab() == vocabulary(student_init) and student.config.hidden_size == 16
    assert info["init_layers"] == [2]  # evenly spaced layers of the init model, as for the teacher


def test_a_student_init_without_a_usable_tokenizer_is_a_clear_error(trained_project, student_init, tmp_path):
    prepared, teacher, tokenizer = teacher_and_tokenizer(trained_project)
    bare = tmp_path / "bare"
    load_pretrained_classifier(str(student_init), prepared.label_names).save_pretrained(bare, safe_serialization=True)
    cfg = StudentConfig(num_layers=1, init=str(bare))
    student, _ = build_student(teacher, cfg, prepared.label_names)
    with pytest.raises(ConfigError, match=r"student.init='.*bare': its tokenizer could not be loaded"):
        student_tokenizer(cfg, tokenizer, student, KDTexts(prepared.texts("train"), [], []), 32)
    # A tokenizer with more ids than the init model's embeddings: they do not belong together.
    load_tokenizer(str(trained_project.path(trained_project.paths.teacher))).save_pretrained(bare)
    small = tmp_path / "small"
    model = load_pretrained_classifier(str(student_init), prepared.label_names)
    model.resize_token_embeddings(20)
    model.save_pretrained(small, safe_serialization=True)
    load_tokenizer(str(student_init)).save_pretrained(small)
    cfg = StudentConfig(num_layers=1, init=str(small))
    student, _ = build_student(teacher, cfg, prepared.label_names)
    with pytest.raises(ConfigError, match=r"student.init=.*embeddings have only 20 rows"):
        student_tokenizer(cfg, tokenizer, student, KDTexts(prepared.texts("train"), [], []), 32)
    # A vocabulary for another script: every word of the task is unknown.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "\u0436", "\u0437"]) + "\n")
    BertTokenizerFast(vocab_file=str(foreign / "vocab.txt")).save_pretrained(foreign)
    config = BertConfig(vocab_size=7, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(foreign, safe_serialization=True)
    cfg = StudentConfig(num_layers=1, init=str(foreign))
    student, _ = build_student(teacher, cfg, prepared.label_names)
    with pytest.raises(ConfigError, match=r"student.init=.*foreign': its tokenizer cannot encode the task's texts"):
        student_tokenizer(cfg, tokenizer, student, KDTexts(prepared.texts("train"), [], []), 32)


def test_teacher_logits_caches_pooled_states_by_text_only_for_another_tokenizer(trained_project, cross_project):
    shared = trained_project.path(trained_project.paths.teacher_logits)  # a shared tokenizer: nothing more than before
    assert "pooled_layers" not in json.loads((shared / "index.json").read_text())
    assert not list(shared.glob("*.pooled.npy"))
    params = cross_project
    prepared, teacher, tokenizer = teacher_and_tokenizer(params)
    directory, fingerprint = params.path(params.paths.teacher_logits), state_fingerprint(teacher)
    for split, texts in (("train", prepared.texts("train")), ("transfer", prepared.transfer_texts())):
        pooled = cache.load_pooled(directory, split, texts, 32, fingerprint, [0, 2])
        assert pooled.shape == (len(texts), 2, teacher.config.hidden_size) and pooled.dtype == np.float32
        with torch.no_grad():  # one text at a time: no padding at all
            for i in (0, len(texts) - 1):
                batch = tokenizer(texts[i], return_tensors="pt")
                states = teacher(**batch, output_hidden_states=True).hidden_states
                live = torch.stack([mean_pool(states[layer], batch["attention_mask"])[0] for layer in (0, 2)])
                np.testing.assert_allclose(pooled[i], live.numpy(), atol=3e-3, rtol=1e-3)  # float16 on disk
        assert np.array_equal(cache.load_pooled(directory, split, texts, 32, fingerprint, [2]), pooled[:, 1:])
    # Every layer is cached: a 2-layer student (layers 0, 1, 2) reads the cache a 1-layer one (0, 2) reads.
    both = cache.load_pooled(directory, "train", prepared.texts("train"), 32, fingerprint, [0, 1, 2])
    assert np.array_equal(both[:, [0, 2]], cache.load_pooled(directory, "train", prepared.texts("train"), 32, fingerprint, [0, 2]))
    with pytest.raises(DataError, match=r"no pooled hidden states of teacher layers \[3\] \(cached: \[0, 1, 2\]\)"):
        cache.load_pooled(directory, "train", prepared.texts("train"), 32, fingerprint, [0, 3])
    with pytest.raises(DataError, match="stale: they were computed on 2 other transfer texts"):
        cache.load_pooled(directory, "transfer", prepared.transfer_texts()[::-1], 32, fingerprint, [0, 2])


def test_a_student_batch_gets_the_teachers_values_for_its_own_texts(cross_project, student_init):
    params = cross_project
    prepared, teacher, teacher_tokenizer = teacher_and_tokenizer(params)
    own = load_tokenizer(str(student_init))
    kd = build_kd_loss(params.distill_intermediate, "single_label", layer_map=[2], hidden_sizes=(16, 32),
                       token_level=False)
    train = encode_splits(prepared, own, 32)["train"]
    directory, fingerprint = params.path(params.paths.teacher_logits), state_fingerprint(teacher)
    texts = KDTexts(prepared.texts("train"), prepared.transfer_texts(), [])
    dataset = cache.kd_train_dataset(train, texts, own, 32, kd, directory, fingerprint)
    texts = texts.train + texts.transfer
    assert len(dataset) == len(texts) and dataset["has_label"] == [1] * len(train) + [0] * 2
    rows = [3, len(texts) - 1, 0, 7]  # a batch in another order, a transfer text included
    batch = Collator(own)([dataset[i] for i in rows])
    chosen = [texts[i] for i in rows]
    for i, text in enumerate(chosen):  # the student's own tokens
        ids = own(text, truncation=True, max_length=32)["input_ids"]
        assert batch["input_ids"][i, : len(ids)].tolist() == ids and batch["attention_mask"][i].sum() == len(ids)
    live = predict_logits(teacher, teacher_tokenizer, chosen, 32)
    torch.testing.assert_close(batch["teacher_logits"], live, atol=1e-5, rtol=0)
    pooled = {split: cache.load_pooled(directory, split, t, 32, fingerprint, [0, 2])
              for split, t in (("train", prepared.texts("train")), ("transfer", prepared.transfer_texts()))}
    expected = np.concatenate([pooled["train"], pooled["transfer"]])[rows]
    assert torch.equal(batch["teacher_pooled"].reshape(4, 2, 32), torch.from_numpy(expected))


def test_pooled_term_trains_its_projection_and_skips_attention(trained_project, student_init):
    names = ["negative", "neutral", "positive"]
    section = DistillIntermediateConfig(temperature=2.0, alpha=0.5, hidden_weight=1.0, attention_weight=10.0)
    kd = build_kd_loss(section, "single_label", layer_map=[2], hidden_sizes=(16, 32), token_level=False)
    assert [term.name for term in kd.terms] == ["ce", "kl", "hidden"] and kd.skipped == {"attention": NEEDS_SHARED_TOKENIZER}
    assert kd.needs_hidden_states and not kd.needs_attentions and not kd.needs_internals and kd.has_projection
    assert kd.pooled_teacher_layers == [0, 2]
    torch.manual_seed(0)
    student = load_pretrained_classifier(str(student_init), names)
    tokenizer = load_tokenizer(str(student_init))
    inputs = tokenizer(read_tiny_texts()[:6], padding=True, return_tensors="pt")
    targets = torch.randn(6, 2, 32)
    projection = kd.terms[2].projection

    def pooled_loss():
        outputs = student(**inputs, output_hidden_states=True)
        batch = KDBatch(student=outputs, labels=torch.zeros(6, dtype=torch.long), teacher_logits=torch.randn(6, 3),
                        attention_mask=inputs["attention_mask"], teacher_pooled=targets)
        return outputs, kd(batch)[1]["hidden"]

    outputs, value = pooled_loss()
    by_hand = sum(torch.nn.functional.mse_loss(projection(mean_pool(outputs.hidden_states[s], inputs["attention_mask"])),
                                               targets[:, i]) / targets[:, i].pow(2).mean() for i, s in enumerate((0, 1))) / 2
    assert value.item() == pytest.approx(by_hand.item(), rel=1e-6)
    flat = KDBatch(student=outputs, labels=torch.zeros(6, dtype=torch.long), attention_mask=inputs["attention_mask"],
                   teacher_pooled=targets.reshape(6, -1))  # rows as the dataset column holds them
    assert kd.terms[2](flat).item() == value.item()
    value.backward()
    assert projection.weight.grad.abs().sum() > 0
    assert student.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    optimizer = torch.optim.Adam([*student.parameters(), *kd.parameters()], lr=1e-2)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = pooled_loss()[1]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]
    # Relative: predicting zeros scores 1 at any scale of the targets.
    assert relative_mse(torch.zeros(4, 3), 0.01 * torch.randn(4, 3)).item() == pytest.approx(1.0)
    # Padding does not move the pooled vectors: a padded copy of a text pools like the text alone.
    hidden = torch.randn(1, 5, 4)
    assert torch.allclose(mean_pool(hidden, torch.tensor([[1, 1, 1, 0, 0]])), hidden[:, :3].mean(dim=1))
    # Shared tokenizer: the token-level terms, exactly as before.
    shared = build_kd_loss(section, "single_label", layer_map=[2], hidden_sizes=(16, 32))
    assert [term.name for term in shared.terms] == ["ce", "kl", "hidden", "attention"] and not shared.skipped
    assert shared.needs_internals and shared.pooled_teacher_layers == []


def test_a_family_from_a_student_with_its_own_tokenizer(cross_project, student_init, tmp_path):
    params = copy_project(cross_project, tmp_path)
    own_vocab = vocabulary(student_init)
    teacher_vocab = vocabulary(params.path(params.paths.teacher))
    assert own_vocab != teacher_vocab
    for module, key in ((student_baseline, "student_baseline"), (distill_vanilla, "student_vanilla"),
                        (distill_intermediate, "student_intermediate")):
        metrics = module.STAGE.execute(params)
        out = params.path(getattr(params.paths, key))
        record = ModelRecord.read(out)
        assert record.details["student"]["tokenizer"] == "own" and record.details["student"]["hidden_size"] == 16
        assert vocabulary(out) == own_vocab
        assert metrics["shared_tokenizer"] == 0
        assert load_trained(out).config.hidden_size == 16
    record = ModelRecord.read(params.path(params.paths.student_intermediate))
    assert record.details["kd"]["skipped"] == {"attention": NEEDS_SHARED_TOKENIZER}
    assert record.details["kd"]["hidden_targets"] == "pooled" and record.details["kd"]["projection"] is True
    assert metrics["attention_kd_skipped"] == 1
    curve = (params.path(params.paths.curves) / "distill_intermediate.csv").read_text().splitlines()[0].split(",")
    assert "loss_hidden" in curve and "loss_kl" in curve and "loss_attention" not in curve
    assert ModelRecord.read(params.path(params.paths.student_vanilla)).details["transfer_texts"] == 2

    # Recovered from the teacher alone, the layer terms read its pooled states (its tokens are not the student's);
    teacher_guided = copy_project(params, tmp_path / "teacher_guided", prune={
        "recovery": {**params.prune.recovery.model_dump(mode="json"), "distil_from": "teacher", "attention_weight": 0.0}})
    prune.STAGE.execute(teacher_guided)
    assert ModelRecord.read(teacher_guided.path(teacher_guided.paths.pruned)).details["recovery_hidden_targets"] == "pooled"
    # by default (source_layers) they read the unpruned student's layers, on its own tokens: token-level, attention too.
    metrics = prune.STAGE.execute(params)
    pruned = ModelRecord.read(params.path(params.paths.pruned))
    assert pruned.details["tokenizer"] == "own" and "recovery_hidden_targets" not in pruned.details
    assert pruned.details["recovery_phases"] == {"joint": ["ce", "kl", "hidden", "attention"]}
    assert pruned.details["vocab_trimmed"] and pruned.details["vocab_size_before"] == len(own_vocab)
    trimmed = vocabulary(params.path(params.paths.pruned))
    assert set(trimmed) < set(own_vocab)
    # Trimmed on the student's tokenizer: the training texts split as the student's tokenizer splits
    # them (and not as the teacher's does).
    own, pruned_tokenizer = load_tokenizer(str(student_init)), load_tokenizer(str(params.path(params.paths.pruned)))
    teacher_tokenizer = load_tokenizer(str(params.path(params.paths.teacher)))
    train_texts = load_prepared(params.path(params.paths.prepared)).texts("train")
    assert [pruned_tokenizer.tokenize(t) for t in train_texts] == [own.tokenize(t) for t in train_texts]
    assert [own.tokenize(t) for t in train_texts] != [teacher_tokenizer.tokenize(t) for t in train_texts]
    assert metrics["shared_tokenizer"] == 0 and metrics["vocab_size"] == len(trimmed)

    quantize.STAGE.execute(params)
    assert vocabulary(params.path(params.paths.quantized)) == trimmed
    export_onnx.STAGE.execute(params)
    served = OnnxClassifier.load(params.path(params.paths.onnx_student) / "int8")
    text = load_prepared(params.path(params.paths.prepared)).texts("test")[0]
    ids = served.feed([text])["input_ids"][0].tolist()
    assert ids == pruned_tokenizer(text, truncation=True, max_length=32)["input_ids"]
