"""The transfer set (unlabelled texts; no text of a split may leak in), the teacher_logits stage (its
cache equals the live teacher and refuses stale texts), the hard-label term skipping transfer rows,
and KD students training on transfer texts while nothing changes without them."""

from __future__ import annotations

import copy
import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import SequenceClassifierOutput

from pipeline.config import DistillVanillaConfig, params_from_dict
from pipeline.data.prepared import TRANSFER_FILE, load_prepared
from pipeline.errors import DataError, OutputError
from pipeline.evaluation.record import ModelRecord
from pipeline.io import check_output_paths
from pipeline.kd import teacher_logits as cache
from pipeline.kd.teacher_logits import precompute_teacher_logits
from pipeline.kd.terms import build_kd_loss
from pipeline.kd.texts import KDTexts
from pipeline.models import load_trained_with_tokenizer, predict_logits, state_fingerprint
from pipeline.training.encoding import Collator, encode_splits
from pipeline.training.loss import KDBatch
from stages import (
    distill_intermediate,
    distill_vanilla,
    prepare_data,
    prune,
    student_baseline,
    teacher_logits,
)
from tests.helpers import copy_project

NEW_TEXTS = [
    "Analysts expect the bank to raise its dividend next year.",
    "The retailer closed twelve stores in the northern region.",
    "Shipping volumes were flat compared with last spring.",
]


def split_texts(params) -> dict[str, list[str]]:
    prepared = load_prepared(params.path(params.paths.prepared))
    return {split: prepared.texts(split) for split in ("train", "validation", "test")}


def transfer_lines(splits: dict[str, list[str]]) -> list[str]:
    """New texts, one duplicate, and texts of every split (two with other whitespace), in a known order."""
    return [
        NEW_TEXTS[0],
        "  " + splits["test"][0].replace(" ", "   ") + " ",  # the same after normalisation: a leak
        NEW_TEXTS[1],
        splits["validation"][0],
        splits["train"][0],
        splits["train"][1].replace(" ", "\t"),
        NEW_TEXTS[0],  # duplicate
        NEW_TEXTS[2],
    ]


def write_transfer(path, lines: list[str], kind: str) -> None:
    if kind in ("text", "phrasebank"):
        suffix = "@neutral" if kind == "phrasebank" else ""
        path.write_text("\n".join(line + suffix for line in lines) + "\n\n", encoding="utf-8")
    elif kind == "csv":
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "sentence", "label"])
            writer.writerows([i, line, "whatever"] for i, line in enumerate(lines))
    else:
        path.write_text("".join(json.dumps({"sentence": line, "label": 9}) + "\n" for line in lines), encoding="utf-8")


@pytest.mark.parametrize("kind, name", [("text", "t.txt"), ("phrasebank", "pb.txt"), ("csv", "t.csv"), ("jsonl", "t.jsonl")])
def test_transfer_texts_are_read_normalised_and_never_equal_a_split_text(tiny_params, kind, name):
    plain = tiny_params()
    before = prepare_data.STAGE.execute(plain)
    prepared_dir = plain.path(plain.paths.prepared)
    assert not (prepared_dir / TRANSFER_FILE).exists() and "transfer" not in load_prepared(prepared_dir).manifest
    splits = split_texts(plain)
    split_files = {split: (prepared_dir / f"{split}.jsonl").read_bytes() for split in splits}

    write_transfer(plain.root / "data" / name, transfer_lines(splits), kind)
    params = tiny_params(transfer={"path": f"data/{name}", "text_column": "sentence"})
    metrics = prepare_data.STAGE.execute(params)
    prepared = load_prepared(prepared_dir)
    assert prepared.transfer_texts() == NEW_TEXTS  # labels ignored, file order kept
    info = prepared.manifest["transfer"]
    assert info["format"] == kind
    assert info["rows_read"] == 8 and info["duplicates_dropped"] == 1 and info["kept"] == 3
    assert info["split_duplicates_dropped"] == 4
    assert info["split_duplicates_by_split"] == {"train": 2, "validation": 1, "test": 1}
    assert metrics == {**before, "transfer_rows_read": 8, "transfer_split_duplicates_dropped": 4, "transfer_kept": 3,
                       "transfer_near_duplicates_dropped": 0, "transfer_similar_kept": 0, "transfer_duplicates_dropped": 1}
    # The splits themselves are untouched by a transfer set.
    assert {split: (prepared_dir / f"{split}.jsonl").read_bytes() for split in splits} == split_files


def test_transfer_max_texts_and_bad_inputs(tiny_params):
    splits = (prepare_data.STAGE.execute(tiny_params()), split_texts(tiny_params()))[1]
    write_transfer(tiny_params().root / "data" / "t.txt", transfer_lines(splits), "text")
    params = tiny_params(transfer={"path": "data/t.txt", "max_texts": 2})
    prepare_data.STAGE.execute(params)
    prepared = load_prepared(params.path(params.paths.prepared))
    assert prepared.transfer_texts() == NEW_TEXTS[:2]
    assert prepared.manifest["transfer"]["beyond_max_texts_dropped"] == 1

    inside_an_output = tiny_params(transfer={"path": "models/teacher_logits/t.txt"})
    with pytest.raises(OutputError, match="paths.teacher_logits=models/teacher_logits contains transfer.path"):
        check_output_paths(inside_an_output)
    with pytest.raises(DataError, match="transfer.path: .* is not a file"):
        prepare_data.STAGE.execute(tiny_params(transfer={"path": "data/missing.txt"}))
    leaks_only = tiny_params().root / "data" / "leaks.txt"
    leaks_only.write_text("\n".join(splits["test"][:3]) + "\n")
    with pytest.raises(DataError, match="no text of .* is left .*3 equal to a text of the splits"):
        prepare_data.STAGE.execute(tiny_params(transfer={"path": "data/leaks.txt"}))
    write_transfer(tiny_params().root / "data" / "t.csv", NEW_TEXTS, "csv")
    with pytest.raises(DataError, match="transfer.text_column"):
        prepare_data.STAGE.execute(tiny_params(transfer={"path": "data/t.csv"}))  # no column "text"


@pytest.fixture(scope="module")
def transfer_project(trained_project, tmp_path_factory):
    """The trained tiny project with a transfer set (the splits, hence the teacher, are unchanged)."""
    root = tmp_path_factory.mktemp("transfer_project")
    params = copy_project(trained_project, root)
    write_transfer(root / "data" / "transfer.txt", transfer_lines(split_texts(params)), "text")
    params = params_from_dict({**params.model_dump(mode="json"), "transfer": {"path": "data/transfer.txt"}}, root=root)
    prepare_data.STAGE.execute(params)
    metrics = teacher_logits.STAGE.execute(params)
    assert (metrics["train_rows"], metrics["transfer_rows"]) == (len(split_texts(params)["train"]), 3)
    return params


def test_cached_logits_are_the_live_teachers_and_stale_ones_are_refused(transfer_project):
    params = transfer_project
    prepared = load_prepared(params.path(params.paths.prepared))
    teacher, tokenizer = load_trained_with_tokenizer(params.path(params.paths.teacher), prepared.label_names)
    fingerprint = state_fingerprint(teacher)
    directory = params.path(params.paths.teacher_logits)
    max_length = params.task.max_length
    for split, texts in (("train", prepared.texts("train")), ("transfer", prepared.transfer_texts())):
        cached = cache.load(directory, split, texts, max_length, fingerprint)
        live = predict_logits(teacher, tokenizer, texts, max_length).numpy()
        assert cached.dtype == np.float32 and cached.shape == (len(texts), 3)
        np.testing.assert_allclose(cached, live, atol=1e-5)
    with pytest.raises(DataError, match="stale: they were computed on 3 other transfer texts"):
        cache.load(directory, "transfer", prepared.transfer_texts()[::-1], max_length, fingerprint)
    with pytest.raises(DataError, match="at max_length .* by a teacher with other weights"):
        cache.load(directory, "train", prepared.texts("train"), max_length + 1, "0" * 64)


def test_hard_label_term_ignores_transfer_rows():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, requires_grad=True)
    labels = torch.tensor([0, 2, 1, 0, 0])  # rows 3 and 4 are transfer texts: their labels are placeholders
    teacher = torch.randn(5, 3)
    kd = build_kd_loss(DistillVanillaConfig(temperature=2.0, alpha=0.3), "single_label")
    has_label = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])

    def parts(labels, has_label):
        batch = KDBatch(student=SequenceClassifierOutput(logits=logits), labels=labels,
                        attention_mask=torch.ones(5, 4), teacher_logits=teacher, has_label=has_label)
        return {name: value.item() for name, value in kd(batch)[1].items()}

    masked = parts(labels, has_label)
    assert masked["ce"] == pytest.approx(F.cross_entropy(logits[:3], labels[:3]).item(), abs=1e-7)
    assert parts(torch.tensor([0, 2, 1, 2, 1]), has_label)["ce"] == masked["ce"]  # placeholders never count
    # The soft term reads every row, transfer rows included.
    assert masked["kl"] == pytest.approx((F.kl_div(
        F.log_softmax(logits / 2, -1), F.log_softmax(teacher / 2, -1), reduction="batchmean", log_target=True,
    ) * 4).item(), abs=1e-6)
    # All rows labelled: exactly the loss without a has_label column.
    assert parts(labels, torch.ones(5)) == parts(labels, None)
    assert parts(labels, torch.zeros(5))["ce"] == 0
    only_transfer = KDBatch(student=SequenceClassifierOutput(logits=logits), labels=labels,
                            attention_mask=torch.ones(5, 4), teacher_logits=teacher, has_label=torch.zeros(5))
    assert kd(only_transfer)[0].requires_grad  # a batch of transfer texts still trains on the soft term
    multi = build_kd_loss(DistillVanillaConfig(temperature=2.0, alpha=0.3), "multi_label", label_names=["a", "b", "c"])
    targets = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0]])
    batch = KDBatch(student=SequenceClassifierOutput(logits=logits), labels=targets,
                    attention_mask=torch.ones(5, 4), teacher_logits=teacher, has_label=has_label)
    expected = F.binary_cross_entropy_with_logits(logits[:3], targets[:3].float())
    assert multi(batch)[1]["ce"].item() == pytest.approx(expected.item(), abs=1e-7)


def test_without_transfer_texts_the_students_train_on_exactly_what_they_did(trained_project):
    """The cached train logits are bitwise the ones the vanilla student computed for itself before."""
    params = trained_project
    prepared = load_prepared(params.path(params.paths.prepared))
    teacher, tokenizer = load_trained_with_tokenizer(params.path(params.paths.teacher), prepared.label_names)
    train = encode_splits(prepared, tokenizer, params.task.max_length)["train"]
    kd = build_kd_loss(params.distill_vanilla, "single_label")
    used = cache.kd_train_dataset(
        train, KDTexts(prepared.texts("train"), [], []), tokenizer, params.task.max_length, kd, params.path(params.paths.teacher_logits),
        state_fingerprint(teacher),
    )
    before = precompute_teacher_logits(teacher, train, Collator(tokenizer))  # what students.py did
    assert used.column_names == before.column_names and "has_label" not in used.column_names
    assert used["teacher_logits"] == before["teacher_logits"] and used["input_ids"] == before["input_ids"]
    baseline = build_kd_loss(None, "single_label")
    assert cache.kd_train_dataset(train, KDTexts([], [], []), tokenizer, params.task.max_length, baseline, params.root, "") is train


@pytest.mark.parametrize("module, out_key", [(distill_vanilla, "student_vanilla"), (distill_intermediate, "student_intermediate")])
def test_kd_students_train_on_the_transfer_texts(transfer_project, tmp_path, module, out_key):
    params = copy_project(transfer_project, tmp_path, student={"epochs": 1})
    module.STAGE.execute(params)
    assert ModelRecord.read(params.path(getattr(params.paths, out_key))).details["transfer_texts"] == 3


def test_baseline_never_sees_transfer_texts_and_stale_logits_stop_kd(transfer_project, tmp_path):
    params = copy_project(transfer_project, tmp_path, student={"epochs": 1})
    student_baseline.STAGE.execute(params)
    assert "transfer_texts" not in ModelRecord.read(params.path(params.paths.student_baseline)).details
    (params.root / "data" / "transfer.txt").write_text(NEW_TEXTS[2] + "\n")  # new transfer texts, old logits
    prepare_data.STAGE.execute(params)
    with pytest.raises(DataError, match=r"rebuild it: dvc repro -f teacher_logits"):
        distill_vanilla.STAGE.execute(params)


@pytest.mark.parametrize("hidden_weight", [1.0, 0.0])  # teacher live (hidden states) / cached logits only
def test_pruning_recovery_trains_on_the_transfer_texts(transfer_project, tmp_path, hidden_weight):
    params = copy_project(
        transfer_project, tmp_path, student={"epochs": 1},
        prune={"recovery": {**transfer_project.prune.recovery.model_dump(), "epochs": 1, "hidden_weight": hidden_weight}},
    )
    distill_intermediate.STAGE.execute(params)
    prune.STAGE.execute(params)
    assert ModelRecord.read(params.path(params.paths.pruned)).details["transfer_texts"] == 3


def test_pruning_importance_from_the_teacher_reads_every_kd_text_and_the_teachers_logits(
    transfer_project, tmp_path, monkeypatch
):
    """prune.importance_from=teacher: heads and neurons are scored by the recovery's soft term against
    the teacher's cached logits, on the labelled and the transfer texts (not the task loss on the
    labelled split alone)."""
    from pipeline.compression import pruning

    recovery = {**transfer_project.prune.recovery.model_dump(), "epochs": 1, "temperature": 2.0}
    params = copy_project(
        transfer_project, tmp_path, student={"epochs": 1},
        prune={"importance_from": "teacher", "heads_ratio": 0.5, "recovery": recovery},
    )
    distill_intermediate.STAGE.execute(params)
    scored = []
    real_scores = pruning.importance_scores

    def spy(model, loader, max_batches, loss_fn):
        scored.append((copy.deepcopy(model), loader.dataset, loss_fn, next(iter(loader))))
        return real_scores(model, loader, max_batches, loss_fn)

    monkeypatch.setattr(pruning, "importance_scores", spy)
    prune.STAGE.execute(params)
    (student, dataset, loss_fn, batch), = scored
    prepared = load_prepared(params.path(params.paths.prepared))
    teacher, tokenizer = load_trained_with_tokenizer(params.path(params.paths.teacher), prepared.label_names)
    texts = prepared.texts("train") + prepared.transfer_texts()
    assert len(dataset) == len(texts) and sum(dataset["has_label"]) == len(prepared.texts("train"))
    expected = predict_logits(teacher, tokenizer, texts, params.task.max_length).numpy()
    np.testing.assert_allclose(np.array(dataset["teacher_logits"]), expected, atol=1e-5)
    # The loss is T^2 KL(teacher || student) at T=2 on the batch's cached teacher logits, by hand.
    student.eval()
    with torch.no_grad():
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
        logits = student(**inputs).logits
        by_hand = F.kl_div(F.log_softmax(logits / 2, -1), F.softmax(batch["teacher_logits"] / 2, -1),
                           reduction="batchmean") * 4
        assert torch.allclose(loss_fn(student, batch), by_hand, atol=1e-6)
        # ... zero for the teacher itself: what it scores is what the student has not yet learnt from it.
        assert loss_fn(teacher, batch).abs() < 1e-6
    record = ModelRecord.read(params.path(params.paths.pruned))
    assert record.details["importance_from"] == "teacher" and set(record.details["heads_per_layer"]) == {1}


def test_transfer_path_auto_is_the_demos_companion_only_with_the_demo_data():
    from pipeline.config import DataConfig, TransferConfig
    from pipeline.config.data import DEMO_TRANSFER_PATH, transfer_path

    assert transfer_path(TransferConfig(), DataConfig()) == DEMO_TRANSFER_PATH  # the shipped default: auto, demo
    assert transfer_path(TransferConfig(), DataConfig(source="csv", path="mine.csv")) is None
    assert transfer_path(TransferConfig(path=None), DataConfig()) is None
    assert transfer_path(TransferConfig(path="texts.txt"), DataConfig(source="csv", path="mine.csv")) == "texts.txt"
