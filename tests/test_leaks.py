"""No validation or test sentence reaches training, in any spelling (issue 30 class 1). The transfer
filter and the de-duplication across the labelled splits compare texts through the one normaliser
(pipeline/data/normalize.py); near-duplicates (a number changed) are dropped, counted and shown. The
planted-test-split test proves it end to end: the test split, planted in the transfer set in nine
spellings and with its numbers changed, is in no student's training inputs (the baseline, both KD
students and the pruning recovery)."""

from __future__ import annotations

import csv
import json

import pytest

from pipeline.config import params_from_dict
from pipeline.data.normalize import LeakGuard, normalize
from pipeline.data.prepared import load_prepared
from pipeline.errors import DataError
from pipeline.training.trainer import DistillationTrainer
from stages import (
    augment,
    distill_intermediate,
    distill_vanilla,
    prepare_data,
    prune,
    student_baseline,
    teacher_logits,
)
from tests.helpers import copy_project, spellings


def write_csv(path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def test_spellings_of_a_split_text_never_enter_the_transfer_set(tiny_params):
    params = tiny_params()
    prepare_data.STAGE.execute(params)
    prepared = load_prepared(params.path(params.paths.prepared))
    test, validation = prepared.texts("test")[0], prepared.texts("validation")[0]
    planted = [*spellings(test).values(), *spellings(validation).values()]
    fresh = "Analysts expect the bank to raise its dividend next year."
    path = params.root / "data" / "transfer.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in [fresh, *planted]), encoding="utf-8")
    metrics = prepare_data.STAGE.execute(tiny_params(transfer={"path": "data/transfer.jsonl"}))
    info = load_prepared(params.path(params.paths.prepared)).manifest["transfer"]
    assert load_prepared(params.path(params.paths.prepared)).transfer_texts() == [fresh]
    count = len(spellings(test))
    assert info["split_duplicates_by_split"] == {"train": 0, "validation": count, "test": count}
    assert metrics["transfer_split_duplicates_dropped"] == 2 * count
    assert info["leak_examples"]["exact"][0]["matches"] in (test, validation)


def test_near_duplicates_of_held_out_texts_are_dropped_counted_and_shown(tiny_params, caplog):
    params = tiny_params()
    prepare_data.STAGE.execute(params)
    prepared = load_prepared(params.path(params.paths.prepared))
    test = max(prepared.texts("test"), key=len)  # long enough for one changed word to stay similar
    words = test.split()
    number_changed = f"{test} 12.5 %"  # a number (and a symbol) added: a near-duplicate, similarity 1.0
    one_word_changed = " ".join(["Annual", *words[1:]])
    lines = ["Analysts expect the bank to raise its dividend next year.", number_changed, one_word_changed]
    (params.root / "data" / "t.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with caplog.at_level("INFO"):
        metrics = prepare_data.STAGE.execute(tiny_params(transfer={"path": "data/t.txt"}))
    info = load_prepared(params.path(params.paths.prepared)).manifest["transfer"]
    assert metrics["transfer_near_duplicates_dropped"] == 1 and info["near_duplicates_by_split"] == {"test": 1}
    assert info["leak_examples"]["near"][0] == {
        "text": number_changed, "kind": "near", "split": "test", "matches": test, "similarity": 1.0,
        "reason": info["leak_examples"]["near"][0]["reason"],
    }
    assert "is a near-duplicate of a test text (similarity 1.00)" in caplog.text
    kept = load_prepared(params.path(params.paths.prepared)).transfer_texts()
    assert number_changed not in kept and lines[0] in kept
    assert (one_word_changed in kept) == (info["similar_kept"] == 1), "a similar text is kept, and counted"


def test_the_labelled_splits_share_no_sentence_in_any_spelling(tmp_path, tiny_params):
    base = [row for row in csv.DictReader(open(tiny_params().root / "data" / "tiny.csv", encoding="utf-8"))]
    rows = [(row["text"], row["label"]) for row in base]
    text, label = rows[0]
    other = next(lab for _, lab in rows if lab != label)
    rows += [(spelling, label) for spelling in list(spellings(text).values())[:4]]  # the same, same label
    rows += [(rows[1][0].upper(), other if rows[1][1] != other else label)]  # the same text, another label
    near = [(f"The company sold {n} tonnes of paper in the quarter.", "neutral") for n in (10, 20, 30, 40, 50, 60)]
    write_csv(tiny_params().root / "data" / "tiny.csv", rows + near)
    params = tiny_params()
    metrics = prepare_data.STAGE.execute(params)
    prepared = load_prepared(params.path(params.paths.prepared))
    keys = {split: [normalize(t) for t in prepared.texts(split)] for split in ("train", "validation", "test")}
    every = [key for split in keys.values() for key in split]
    assert len(every) == len(set(every)), "one spelling of a sentence, in one split"
    assert normalize(text) in every and normalize(rows[1][0]) not in every  # conflicting labels: both dropped
    assert prepared.manifest["exact_duplicates_dropped"] == 4 and prepared.manifest["conflicting_rows_dropped"] == 2
    # The six near-duplicates end up in one split (the other copies dropped, counted).
    splits_with_paper = {split for split, texts in keys.items() if any("tonnes of paper" in t for t in texts)}
    assert len(splits_with_paper) == 1
    dropped = prepared.manifest["near_duplicates_dropped"]
    assert sum(dropped.values()) == sum(metrics[f"near_duplicates_dropped_{s}"] for s in dropped) > 0
    guard = LeakGuard({split: prepared.texts(split) for split in ("validation", "test")})
    assert not any((m := guard.check(t)) is not None and m.leaks for t in prepared.texts("train"))


def test_a_split_made_only_of_near_duplicates_is_a_clear_error(tiny_params):
    rows = [(f"Net sales were EUR {n} million in the period.", ("negative", "neutral", "positive")[n % 3])
            for n in range(1, 40)]
    write_csv(tiny_params().root / "data" / "tiny.csv", rows)
    with pytest.raises(DataError, match=r"every validation text is a near-duplicate of a test text .*numbers"):
        prepare_data.STAGE.execute(tiny_params())


class Captured(Exception):
    """Stops a stage once its trainer is built: what it would train on is all this test needs."""


@pytest.fixture(scope="module", params=[False, True], ids=["transfer", "transfer+augmented"])
def planted_project(trained_project, tmp_path_factory, request):
    """The trained tiny project with its test split planted in the transfer set: every test sentence in
    nine spellings and with a number added (JSONL, so a spelling may span lines); with augmentation on,
    the augment stage's texts (made from training and transfer texts) join the students' inputs too."""
    root = tmp_path_factory.mktemp("planted")
    params = copy_project(trained_project, root)
    test = load_prepared(params.path(params.paths.prepared)).texts("test")
    planted = [spelling for text in test for spelling in spellings(text).values()]
    planted += [f"{text} 2.5 %" for text in test]
    fresh = ["Analysts expect the bank to raise its dividend next year.", "Shipping volumes were flat in spring."]
    lines = [fresh[0], *planted, fresh[1]]
    (root / "data" / "transfer.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    tree = {**params.model_dump(mode="json"), "transfer": {"path": "data/transfer.jsonl",
                                                           "augment": {"enabled": request.param, "n_per_text": 3}}}
    params = params_from_dict(tree, root=root)
    prepare_data.STAGE.execute(params)
    if request.param:
        assert augment.STAGE.execute(params)["augment_texts"] > 0
    teacher_logits.STAGE.execute(params)
    return params, test, len(planted)


def test_no_student_trains_on_the_planted_test_split(planted_project, monkeypatch):
    params, test, planted = planted_project
    prepared = load_prepared(params.path(params.paths.prepared))
    assert prepared.texts("test") == test, "the splits (hence the teacher) are unchanged by a transfer set"
    info = prepared.manifest["transfer"]
    assert info["split_duplicates_by_split"]["test"] + info["near_duplicates_by_split"].get("test", 0) == planted
    assert info["kept"] == 2
    captured = []

    def capture(self, *args, **kwargs):
        captured.append((kwargs["train_dataset"], kwargs["processing_class"]))
        raise Captured

    monkeypatch.setattr(DistillationTrainer, "__init__", capture)
    for stage in (student_baseline, distill_vanilla, distill_intermediate):
        with pytest.raises(Captured):
            stage.STAGE.run(params)
    # The pruning recovery trains the pruned student on the same inputs; the teacher stands in for the
    # student it prunes (no student was trained here).
    tree = params.model_dump(mode="json")
    tree["prune"]["source"] = params.paths.teacher
    with pytest.raises(Captured):
        prune.STAGE.run(params_from_dict(tree, root=params.root))
    assert len(captured) == 4
    # The KD students and the recovery train on train + the 2 kept transfer texts (+ augmented ones).
    augmented = 2 * 3 if params.transfer.augment.enabled else 0
    assert all(len(dataset) >= len(prepared.texts("train")) + 2 + augmented for dataset, _ in captured[1:])
    guard = LeakGuard({"test": test})
    for dataset, tokenizer in captured:
        test_ids = {tuple(ids) for ids in tokenizer(test, truncation=True, max_length=params.task.max_length)["input_ids"]}
        assert len(dataset) >= len(prepared.texts("train"))
        for ids in dataset["input_ids"]:
            assert tuple(ids) not in test_ids, "a test sentence, token for token"
            decoded = tokenizer.decode(ids, skip_special_tokens=True)
            match = guard.check(decoded)
            assert match is None or not match.leaks, match.describe(decoded)
