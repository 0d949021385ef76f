"""Issue 24: augmented transfer texts (made from training texts only, never leaking validation or test),
token-level KD across tokenizers that share their pieces under other ids, TinyBERT's two phases, and
the pruned student judged against its source."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from transformers import BertConfig, BertModel, MPNetTokenizerFast

from pipeline.config import DistillIntermediateConfig, params_from_dict
from pipeline.data import augment
from pipeline.data.normalize import LeakGuard, normalize
from pipeline.data.prepared import load_prepared
from pipeline.errors import ConfigError, DataError
from pipeline.evaluation.record import ModelRecord
from pipeline.kd.phases import Phase, cached_store, plan
from pipeline.kd.teacher_internals import INDEX_FILE, InternalsStore
from pipeline.kd.teacher_logits import texts_sha256
from pipeline.kd.terms import build_kd_loss
from pipeline.kd.texts import ORIGINAL, KDTexts
from pipeline.kd.token_map import align
from pipeline.models import load_tokenizer, load_trained_with_tokenizer
from scripts.tiny_project import ROBERTA_SPECIALS, make_tiny_bert, read_tiny_texts
from stages import augment as augment_stage
from stages import distill_intermediate, prepare_data, prune, teacher_logits
from stages.prune import source_f1_drop
from tests.helpers import copy_project

SOURCES = [
    "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period.",
    "The company expects net sales to remain roughly at the previous year's level.",
    "Shares in the retailer fell sharply after it cut its full-year guidance.",
    "Net sales totalled EUR 48.2 mn.",
]


# --------------------------------------------------------------------------- augmentation


def made(sources=SOURCES, heldout=(), **overrides):
    settings = dict(methods=["mask", "ngram"], n_per_text=4, max_texts=None, seed=0,
                    heldout=LeakGuard({"test": list(heldout)}), existing=sources)
    settings.update(overrides)
    return augment.augment(list(sources), **settings)


def test_each_method_makes_what_it_says():
    rng = random.Random(0)
    words = SOURCES[0].split()
    masked = augment.mask_words(words, 0.3, rng)
    assert len(masked) == len(words) and augment.MASK in masked
    assert all(w == m or m.startswith(augment.MASK) or augment.MASK in m for w, m in zip(words, masked))
    run = augment.ngram(words, 0.5, rng)
    assert len(words) / 2 <= len(run) < len(words) and " ".join(run) in " ".join(words)
    assert augment.ngram("Shares fell .".split(), 0.5, rng) is None  # too short to cut
    # Neighbours in a tiny embedding space: "rose" and "climbed" point the same way, "fell" away.
    vocab = {"rose": 0, "climbed": 1, "fell": 2, "##ed": 3, "[CLS]": 4}
    embeddings = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0], [0.95, 0.05], [0.99, 0.0]]).numpy()
    neighbours = augment.Neighbours(embeddings, vocab, ["rose", "fell"], top_k=1)
    assert neighbours.neighbours == {"rose": ["climbed"], "fell": ["climbed"]}  # no pieces, no specials, never itself
    assert neighbours.replace("Profit Rose sharply".split(), 1.0, rng) == ["Profit", "Climbed", "sharply"]


def test_augmentation_is_deterministic_capped_and_counted():
    rows, stats = made()
    again, _ = made()
    assert rows == again and rows and {row["method"] for row in rows} == {"mask", "ngram"}
    assert stats.kept == {m: sum(row["method"] == m for row in rows) for m in ("mask", "ngram")}
    keys = [normalize(row["text"]) for row in rows]
    assert len(set(keys)) == len(keys) and not set(keys) & {normalize(s) for s in SOURCES}
    capped, stats = made(max_texts=3)
    assert len(capped) == 3 and stats.dropped_cap == sum(stats.made.values()) - 3 - stats.dropped_duplicate
    assert stats.as_metrics()["augment_texts"] == 3


def test_no_augmented_text_leaks_a_heldout_text_in_any_spelling():
    """The test split planted among the sources in several spellings: nothing made from them is
    equal to, or a near-duplicate of, a test text."""
    test = ["Net sales increased by 5 % to EUR 10.2 mn in the second quarter of the year .",
            "The board proposes a dividend of EUR 0.50 per share for the financial year ."]
    planted = [t.upper() for t in test] + [t.replace(" ", "  ") for t in test] + [t.replace("5", "7") for t in test]
    rows, stats = made(SOURCES + planted, heldout=test, methods=["mask", "ngram"], n_per_text=6)
    guard = LeakGuard({"test": test})
    assert stats.dropped_heldout > 0 and stats.heldout_examples
    assert all((match := guard.check(row["text"])) is None or not match.leaks for row in rows)


def test_the_mask_placeholder_becomes_each_tokenizers_mask(tiny_bert):
    bert = load_tokenizer(str(tiny_bert))
    assert augment.for_tokenizer([f"Profit {augment.MASK} ."], bert) == ["Profit [MASK] ."]
    assert bert.convert_ids_to_tokens(bert("Profit [MASK] .")["input_ids"])[2] == "[MASK]"

    class NoMask:
        mask_token, unk_token = None, "<unk>"

    assert augment.for_tokenizer([f"a {augment.MASK}"], NoMask()) == ["a <unk>"]


# --------------------------------------------------------------------------- alignment


@pytest.fixture(scope="module")
def shifted_init(trained_project, tmp_path_factory):
    """A student init whose tokenizer holds the teacher's very pieces under other ids: five
    RoBERTa-style specials in front (as all-mpnet-base-v2's vocabulary is all-MiniLM-L6-v2's)."""
    directory = tmp_path_factory.mktemp("shifted_init")
    pieces = (trained_project.path(trained_project.paths.teacher) / "vocab.txt").read_text().split("\n")
    (directory / "vocab.txt").write_text("\n".join(ROBERTA_SPECIALS + [p for p in pieces if p]) + "\n")
    tokenizer = MPNetTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(3)
    BertModel(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def test_alignment_is_shared_mapped_or_pooled(trained_project, tiny_bert, shifted_init, tmp_path):
    params = trained_project
    prepared = load_prepared(params.path(params.paths.prepared))
    _, teacher_tokenizer = load_trained_with_tokenizer(params.path(params.paths.teacher), prepared.label_names)
    texts = prepared.texts("train") + [f"Profit {augment.MASK} sharply ."]
    assert align(teacher_tokenizer, None, texts, texts, 32).kind == "shared"
    assert align(teacher_tokenizer, load_tokenizer(str(tiny_bert)), texts, texts, 32).kind == "shared"
    shifted = load_tokenizer(str(shifted_init))
    assert shifted.get_vocab() != teacher_tokenizer.get_vocab()
    read = KDTexts(prepared.texts("train"), [], [texts[-1]])
    mapped = read.align(teacher_tokenizer, shifted, 32)
    assert mapped.kind == "mapped" and mapped.token_level and mapped.texts_checked == len(texts)
    # The teacher's inputs made from a padded student batch are exactly the teacher's own batch,
    # the masked word included ([MASK] by role, whatever its name or id).
    sample = read.read_by(shifted)["train"][:5] + read.read_by(shifted)["augmented"]
    student_batch = shifted(sample, padding=True, return_tensors="pt")
    teacher_batch = teacher_tokenizer(read.read_by(teacher_tokenizer)["train"][:5] + read.read_by(teacher_tokenizer)["augmented"],
                                      padding=True, return_tensors="pt")
    assert not torch.equal(student_batch["input_ids"], teacher_batch["input_ids"])
    teacher, _ = load_trained_with_tokenizer(params.path(params.paths.teacher))
    inputs = mapped.teacher_inputs(teacher)(dict(student_batch))
    assert torch.equal(inputs["input_ids"], teacher_batch["input_ids"])
    assert torch.equal(inputs["attention_mask"], teacher_batch["attention_mask"])
    # Other pieces (a vocabulary written for other texts): pooled, with the evidence.
    other = make_tiny_bert(tmp_path / "other", read_tiny_texts()[::2], seed=1)
    pooled = read.align(teacher_tokenizer, load_tokenizer(str(other)), 32)
    assert pooled.kind == "pooled" and 0 < pooled.texts_cut_differently <= pooled.texts_checked and pooled.example
    assert "other pieces" in pooled.describe()


def test_two_phases_split_the_terms_and_refuse_a_joint_original(trained_project):
    section = DistillIntermediateConfig(schedule="two_phase", phase1_epochs=2, layer_texts="original")

    def build(part):
        return build_kd_loss(section, "single_label", layer_map=[2], hidden_sizes=(16, 32), part=part)

    layers, logits = plan(section, 5, build, "distill_intermediate")
    assert (layers.name, [t.name for t in layers.kd.terms], layers.epochs, layers.parts, layers.last) == (
        "layers", ["hidden", "attention"], 2, ("train", "transfer"), False)
    assert ([t.name for t in logits.kd.terms], logits.epochs, logits.parts, logits.last) == (
        ["ce", "kl"], 5, ("train", "transfer", "augmented"), True)
    assert layers.kd.needs_internals and not logits.kd.needs_internals  # the logit phase reads the cache
    no_layers = section.model_copy(update={"hidden_weight": 0.0, "attention_weight": 0.0})
    only = plan(no_layers, 5, lambda part: build_kd_loss(no_layers, "single_label", layer_map=[2], part=part), "k")
    assert [phase.name for phase in only] == ["logits"]
    joint = section.model_copy(update={"schedule": "joint"})
    with pytest.raises(ConfigError, match="layer_texts=original needs distill_intermediate.schedule=two_phase"):
        plan(joint, 5, build, "distill_intermediate")
    [one] = plan(joint.model_copy(update={"layer_texts": "all"}), 5, build, "distill_intermediate", scale=0.5)
    assert one.name == "joint" and one.epochs == 2.5 and [t.name for t in one.kd.terms] == ["ce", "kl", "hidden", "attention"]


@pytest.fixture(scope="module")
def mapped_project(trained_project, shifted_init, tmp_path_factory):
    """The trained tiny project with transfer texts, augmentation on and a student whose tokenizer is
    the teacher's pieces under other ids, after augment and teacher_logits."""
    root = tmp_path_factory.mktemp("mapped_project")
    params = copy_project(trained_project, root)
    (root / "data" / "transfer.txt").write_text("Analysts expect the bank to raise its dividend next year.\n")
    tree = params.model_dump(mode="json")
    tree["transfer"].update(path="data/transfer.txt", augment={"enabled": True, "n_per_text": 2, "neighbours": 2})
    tree["student"].update(init=str(shifted_init), epochs=1)
    tree["distill_intermediate"].update(schedule="two_phase", phase1_epochs=1, layer_texts="original",
                                        teacher_internals="cached")
    tree["prune"]["recovery"].update(epochs=1, attention_weight=1.0, schedule="two_phase", phase1_epochs=1,
                                     layer_texts="original", teacher_internals="cached", distil_from="teacher")
    tree["tracking"]["experiment"] = "fincompress-token-kd"
    params = params_from_dict(tree, root=root)
    prepare_data.STAGE.execute(params)
    assert augment_stage.STAGE.execute(params)["augment_texts"] > 0
    metrics = teacher_logits.STAGE.execute(params)
    assert "pooled_layers" not in metrics and metrics["augmented_rows"] > 0  # token level: no pooled states
    assert metrics["internals_layers"] == 2  # the embedding output and layer 2 (a 1-layer student's map of a 2-layer teacher)
    return params


def test_cached_internals_are_the_live_teachers(mapped_project, shifted_init):
    params = mapped_project
    prepared = load_prepared(params.path(params.paths.prepared))
    teacher, teacher_tokenizer = load_trained_with_tokenizer(params.path(params.paths.teacher), prepared.label_names)
    texts = KDTexts(prepared.texts("train"), prepared.transfer_texts(), [])
    store = InternalsStore(params.path(params.paths.teacher_logits), texts.parts(ORIGINAL), texts_sha256)
    assert store.layers == [0, 2] and store.covers([2]) and not store.covers([1, 2])
    rows = [0, len(texts.train), 5]  # a transfer text among training texts, in another order
    chosen = [(texts.train + texts.transfer)[row] for row in rows]
    student_batch = load_tokenizer(str(shifted_init))(chosen, padding=True, return_tensors="pt")
    cached = store(torch.tensor(rows), student_batch["input_ids"].shape[1])
    with torch.no_grad():
        live = teacher(**teacher_tokenizer(chosen, padding=True, return_tensors="pt"), output_hidden_states=True,
                       output_attentions=True)
    mask = student_batch["attention_mask"].bool()
    for layer in (0, 2):
        torch.testing.assert_close(cached.hidden_states[layer][mask], live.hidden_states[layer][mask], atol=2e-2, rtol=1e-2)
    for layer in (1,):  # the attention map of layer 2
        pairs = (mask[:, None, :, None] & mask[:, None, None, :]).expand_as(live.attentions[layer])
        torch.testing.assert_close(cached.attentions[layer][pairs], live.attentions[layer][pairs], atol=2e-3, rtol=1e-2)
        assert cached.attentions[layer][~pairs].abs().sum() == 0  # padding is zero (and masked by the terms)
    with pytest.raises(DataError, match="belong to other texts"):
        InternalsStore(params.path(params.paths.teacher_logits), {"train": texts.train[::-1]}, texts_sha256)


def test_auto_caches_the_internals_only_when_they_fit(mapped_project, tmp_path):
    """teacher_internals: auto caches them when the estimate (token counts, before any is computed) is
    within teacher_internals_max_mb; otherwise nothing is cached and the layer terms run the teacher live."""
    layers = build_kd_loss(mapped_project.distill_intermediate, "single_label", layer_map=[2], hidden_sizes=(16, 32),
                           part="layers")
    prepared = load_prepared(mapped_project.path(mapped_project.paths.prepared))
    texts = KDTexts(prepared.texts("train"), prepared.transfer_texts(), [])
    phase = Phase("layers", layers, 1, ORIGINAL, last=False, internals="auto")
    stores = {}
    for name, max_mb in (("fits", 1000.0), ("too_large", 1e-6)):
        params = copy_project(mapped_project, tmp_path / name, distill_intermediate={
            "teacher_internals": "auto", "teacher_internals_max_mb": max_mb})
        metrics = teacher_logits.STAGE.execute(params)
        cache_dir = params.path(params.paths.teacher_logits)
        assert metrics["internals_estimated_mb"] > 0
        if name == "fits":
            written = sum(f.stat().st_size for pattern in ("*.hidden.npy", "*.attention.npy") for f in cache_dir.glob(pattern))
            headers = 128 * len(list(cache_dir.glob("*.npy")))  # the .npy headers; the estimate counts values only
            assert abs(metrics["internals_estimated_mb"] * 1e6 - written) <= headers + 0.05e6
        else:
            assert "internals_layers" not in metrics and not (cache_dir / INDEX_FILE).exists()
        stores[name] = cached_store(phase, texts, cache_dir, [2])
    assert isinstance(stores["fits"], InternalsStore) and stores["too_large"] is None
    # A layer map the cache does not hold (another depth, e.g. a search trial): live, not an error.
    assert cached_store(phase, texts, params.path(params.paths.teacher_logits).parent / "missing", [2]) is None


def test_cached_internals_changed_afterwards_are_refused(mapped_project, tmp_path):
    params = mapped_project
    prepared = load_prepared(params.path(params.paths.prepared))
    texts = KDTexts(prepared.texts("train"), prepared.transfer_texts(), [])
    copy = tmp_path / "teacher_logits"
    shutil.copytree(params.path(params.paths.teacher_logits), copy)
    hidden = copy / "train.hidden.npy"
    data = bytearray(hidden.read_bytes())
    data[-1] ^= 0x01  # one bit of one cached value: same size, still a valid array
    hidden.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train\.hidden\.npy is not the file the teacher_logits stage wrote"):
        InternalsStore(copy, texts.parts(ORIGINAL), texts_sha256)


def test_a_mapped_student_distils_token_by_token_in_two_phases(mapped_project):
    params = mapped_project
    metrics = distill_intermediate.STAGE.execute(params)
    record = ModelRecord.read(params.path(params.paths.student_intermediate))
    kd = record.details["kd"]
    assert kd["token_alignment"] == "mapped" and "skipped" not in kd and "hidden_targets" not in kd
    texts = json.loads((params.path(params.paths.augmented) / "augment.json").read_text())["texts"]
    train = len(load_prepared(params.path(params.paths.prepared)).texts("train"))
    assert kd["phases"] == {"layers": {"terms": ["hidden", "attention"], "texts": train + 1},
                            "logits": {"terms": ["ce", "kl"], "texts": train + 1 + texts}}
    assert record.details["augmented_texts"] == texts and metrics["token_level_kd"] == 1
    curve = (params.path(params.paths.curves) / "distill_intermediate.csv").read_text().splitlines()
    header = curve[0].split(",")
    assert {"loss_hidden", "loss_attention", "loss_kl", "phase"} <= set(header)
    phases = [row.split(",")[header.index("phase")] for row in curve[1:]]
    assert phases[0] == "layers" and phases[-1] == "logits"

    metrics = prune.STAGE.execute(params)
    pruned = ModelRecord.read(params.path(params.paths.pruned))
    assert pruned.details["token_alignment"] == "mapped"
    assert pruned.details["recovery_phases"] == {"layers": ["hidden", "attention"], "logits": ["ce", "kl"]}
    assert metrics["source_validation_macro_f1"] == record.validation["macro_f1"]
    assert metrics["validation_f1_drop"] == pytest.approx(record.validation["macro_f1"] - pruned.validation["macro_f1"])


def test_a_pruned_student_that_falls_too_far_says_so_with_the_numbers(trained_project):
    params = trained_project
    source = ModelRecord.read(params.path(params.paths.teacher))
    worse = source.model_copy(update={"validation": {**source.validation, "macro_f1": source.validation["macro_f1"] - 0.02}})
    drop = source_f1_drop(source, worse, 0.005)
    assert drop["within_max_f1_drop"] == 0 and drop["validation_f1_drop"] == pytest.approx(0.02)
    assert "2.00 points below its source's" in drop["f1_drop_note"] and "prune.max_f1_drop=0.005" in drop["f1_drop_note"]
    examples = source.validation["examples"]
    assert f"one of the {examples} validation texts is about {100 / examples:.1f} points" in drop["f1_drop_note"]
    kept = source_f1_drop(source, source, 0.005)
    assert kept["within_max_f1_drop"] == 1 and "f1_drop_note" not in kept
    # With the paired bootstrap interval of the drop: whether the split can tell the two apart at all.
    unclear = source_f1_drop(source, worse, 0.005, (-0.012, 0.051))
    assert (unclear["validation_f1_drop_ci95_low"], unclear["validation_f1_drop_ci95_high"]) == (-0.012, 0.051)
    assert ("(0.5 points). The paired bootstrap 95% interval of the drop is -1.2 to 5.1 points, which includes no "
            "drop at all: this split cannot tell the two apart. Prune less") in unclear["f1_drop_note"]
    clear = source_f1_drop(source, worse, 0.005, (0.011, 0.03), confidence=0.9)
    assert "90% interval of the drop is 1.1 to 3.0 points. Prune less" in clear["f1_drop_note"]
    assert "includes no drop" not in clear["f1_drop_note"]
