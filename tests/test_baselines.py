"""The reference members (pipeline/baselines/): TF-IDF + LinearSVC and model2vec static embeddings of the
teacher. Saved models reload to the same logits in a torch-free process, C is chosen on validation,
every architecture the teacher may have distils (or is skipped with its reason), the stages write their
records and name their data in MLflow, and the benchmark and report take the members in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from pipeline.baselines import static, tfidf
from pipeline.baselines.classifiers import StaticClassifier, TfidfClassifier
from pipeline.baselines.common import class_weights
from pipeline.config import SLAConfig
from pipeline.config.baselines import StaticBaselineConfig, TfidfBaselineConfig
from pipeline.data.prepared import load_prepared
from pipeline.errors import ConfigError
from pipeline.evaluation.family import family
from pipeline.evaluation.record import ModelRecord
from pipeline.evaluation.report import alternatives_verdict, markdown_table
from pipeline.export.predict import main as predict
from pipeline.not_built import NOT_BUILT_FILE, not_built_reason
from scripts.tiny_project import REPO, make_tiny_model, read_tiny_texts
from stages import baseline_static, baseline_tfidf
from tests.helpers import copy_project

LABELS = ["negative", "neutral", "positive"]


def corpus(task_type: str = "single_label"):
    """The tiny corpus, labelled by keyword: two thirds train, the rest validation."""
    texts = read_tiny_texts()
    if task_type == "multi_label":
        y = np.array([[int("profit" in t.lower()), int("sales" in t.lower()), 1] for t in texts])
    else:
        y = np.array([0 if "fell" in t.lower() or "loss" in t.lower() else 2 if "rose" in t.lower() else 1 for t in texts])
    cut = 2 * len(texts) // 3
    return (texts[:cut], y[:cut]), (texts[cut:], y[cut:])


@pytest.mark.parametrize("task_type", ["single_label", "multi_label"])
def test_tfidf_reloads_to_the_same_logits_and_keeps_the_best_c_on_validation(tmp_path, task_type):
    train, validation = corpus(task_type)
    cfg = TfidfBaselineConfig(c_grid=[0.01, 1.0])
    fitted, coef, intercept, chosen = tfidf.fit(cfg, train, validation, task_type)
    scores = chosen["validation_macro_f1_by_C"]
    assert set(scores) == {"0.01", "1"} and scores[f"{chosen['C']:g}"] == max(scores.values())
    tfidf.save(tmp_path, fitted, coef, intercept, LABELS, task_type)
    classifier = TfidfClassifier.load(tmp_path)
    expected = tfidf.linear_scores(tfidf.features(fitted, validation[0]), coef, intercept)
    np.testing.assert_allclose(classifier.logits(validation[0]), expected, atol=1e-5)
    assert classifier.logits(validation[0]).shape == (len(validation[0]), 3)
    assert classifier.decide(classifier.logits(validation[0][:2])).shape == ((2, 3) if task_type == "multi_label" else (2,))


def test_a_binary_classifier_gets_one_column_per_class():
    from sklearn.svm import LinearSVC

    x = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    svm = LinearSVC().fit(x, [0, 1, 0, 1])
    coef, intercept = class_weights(svm)
    logits = x @ coef.T + intercept
    assert coef.shape == (2, 2) and coef.flags.c_contiguous
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], svm.decision_function(x), atol=1e-6)
    assert (logits.argmax(1) == svm.predict(x)).all()


def test_tfidf_needs_some_features():
    with pytest.raises(ValueError, match="no features"):
        TfidfBaselineConfig(word_ngrams=None, char_ngrams=None)
    with pytest.raises(ValueError, match="positive values of C"):
        TfidfBaselineConfig(c_grid=[0.0])


def test_a_tampered_directory_is_refused_with_a_clear_error(tmp_path):
    train, validation = corpus()
    tfidf.save(tmp_path, *tfidf.fit(TfidfBaselineConfig(c_grid=[1.0]), train, validation, "single_label")[:3],
               LABELS, "single_label")
    described = json.loads((tmp_path / "vectorizers.json").read_text())
    described["word"]["vocabulary"]["zzz"] = len(described["word"]["vocabulary"])
    (tmp_path / "vectorizers.json").write_text(json.dumps(described))
    with pytest.raises(Exception, match="idf length|weights per class"):
        TfidfClassifier.load(tmp_path)
    with pytest.raises(Exception, match="describes a 'tfidf' model, not 'static'"):
        StaticClassifier.load(tmp_path)


def classifier_teacher(tmp_path, model_type: str):
    """A tiny random encoder of `model_type` with a classification head, as train_teacher saves one."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = make_tiny_model(tmp_path / "source", read_tiny_texts(), model_type)
    teacher = tmp_path / "teacher"
    AutoModelForSequenceClassification.from_pretrained(source, num_labels=3).save_pretrained(teacher)
    AutoTokenizer.from_pretrained(source).save_pretrained(teacher)
    return teacher


@pytest.mark.parametrize("model_type", ["bert", "mpnet", "roberta", "deberta-v2"])
def test_static_distils_each_kind_of_tokenizer_and_reloads_to_the_same_logits(tmp_path, model_type):
    train, validation = corpus()
    teacher = classifier_teacher(tmp_path, model_type)
    model, vocabulary = static.distill(teacher, StaticBaselineConfig(pca_dims=16), train[0])
    # Only the tokens the texts use (plus what unseen words fall back to) were encoded.
    assert vocabulary["vocab_size_after"] < vocabulary["vocab_size_before"] and model.dim == 16
    head, c, scores = static.fit_head(model, [1.0, 10.0], train, validation, "single_label")
    static.save(tmp_path / "static", model, head, LABELS, "single_label")
    classifier = StaticClassifier.load(tmp_path / "static")
    logits = classifier.logits(validation[0] + ["zzqx words the corpus never had"])
    assert logits.shape == (len(validation[0]) + 1, 3) and np.isfinite(logits).all()
    probabilities = head.predict_proba(static.embed(model, validation[0]))
    np.testing.assert_allclose(classifier.probabilities(logits[:-1]), probabilities, atol=1e-5)


def test_static_whole_vocabulary_and_multi_label(tmp_path):
    train, validation = corpus("multi_label")
    model, vocabulary = static.distill(classifier_teacher(tmp_path, "bert"), StaticBaselineConfig(vocabulary="model"), train[0])
    assert "vocab_size_after" not in vocabulary and vocabulary["tokens"] >= vocabulary["vocab_size_before"] - 5
    head, _, _ = static.fit_head(model, [1.0], train, validation, "multi_label")
    static.save(tmp_path / "static", model, head, ["profit", "sales", "always"], "multi_label")
    classifier = StaticClassifier.load(tmp_path / "static")
    decided = classifier.decide(classifier.logits(validation[0]))
    assert decided.shape == (len(validation[0]), 3) and decided[:, 2].all(), "a label on in every train text stays on"


def test_reference_members_load_and_answer_without_torch(trained_reference_members):
    tfidf_dir, static_dir = trained_reference_members
    code = (
        "import sys\n"
        "from pipeline.baselines.classifiers import load_reference\n"
        f"for d in {[str(tfidf_dir), str(static_dir)]!r}:\n"
        "    c = load_reference(d)\n"
        "    assert c.logits(['Profit rose.']).shape == (1, 3)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope="module")
def reference_project(trained_project, tmp_path_factory):
    """A copy of the tiny trained project with both reference stages run through their mains' path."""
    params = copy_project(trained_project, tmp_path_factory.mktemp("refs"), ("data", "models"))
    metrics = {"tfidf": baseline_tfidf.STAGE.execute(params), "static": baseline_static.STAGE.execute(params)}
    return params, metrics


@pytest.fixture(scope="module")
def trained_reference_members(reference_project):
    params, _ = reference_project
    return params.path(params.paths.baseline_tfidf), params.path(params.paths.baseline_static)


def test_the_stages_write_records_and_tag_their_runs(reference_project):
    params, metrics = reference_project
    prepared = load_prepared(params.path(params.paths.prepared))
    for name, member in (("tfidf", "baseline_tfidf"), ("static", "baseline_static")):
        record = ModelRecord.read(params.path(getattr(params.paths, member)))
        assert record.member == name and record.details["reference"] and record.data_hash == prepared.content_hash
        assert record.test["examples"] == len(prepared.rows("test")) and len(record.test["macro_f1_ci95"]) == 2
        assert metrics[name]["test_macro_f1"] == record.test["macro_f1"] and metrics[name]["size_mb"] > 0
        assert metrics[name]["C"] in params.baselines.model_dump()[name]["c_grid"]
        run = mlflow.search_runs(experiment_names=[params.tracking.experiment],
                                 filter_string=f"tags.stage = '{member}'", output_format="list")[0]
        assert run.data.tags["reference"] == "true" and run.data.tags["family_member"] == name
        # The run names its data: the prepared splits' digest, the source file and the row counts.
        dataset = run.inputs.dataset_inputs[0]
        assert dataset.dataset.name == "csv:tiny.csv" and dataset.dataset.digest == prepared.content_hash[:12]
        tags = {tag.key: tag.value for tag in dataset.tags}
        assert tags["rows_test"] == str(len(prepared.rows("test"))) and tags["content_hash"] == prepared.content_hash
    assert metrics["static"]["tokens"] < 300, "static distilled the tiny corpus' tokens only"
    teacher_run = mlflow.search_runs(experiment_names=[params.tracking.experiment],
                                     filter_string="tags.stage = 'train_teacher'", output_format="list")[0]
    assert teacher_run.data.tags["reference"] == "false" and teacher_run.inputs.dataset_inputs


def test_predict_serves_a_reference_member(trained_reference_members, capsys):
    for directory in trained_reference_members:
        assert predict(["--model", str(directory), "--json", "Operating profit rose."]) == 0
        answer = json.loads(capsys.readouterr().out)
        assert answer["label"] in LABELS and abs(sum(answer["probabilities"].values()) - 1) < 1e-4


def test_switched_off_or_undistillable_members_say_why(reference_project, tmp_path, monkeypatch):
    params = copy_project(reference_project[0], tmp_path, ("data", "models"), baselines={"tfidf": {"enabled": False}})
    assert baseline_tfidf.run(params)["built"] is False
    directory = params.path(params.paths.baseline_tfidf)
    assert not_built_reason(directory) == "baselines.tfidf.enabled is false"
    assert not next(m for m in family(params) if m.name == "tfidf").is_present(), "the benchmark leaves it out"

    def cannot(*args, **kwargs):
        raise NotImplementedError("no static embeddings for this architecture")

    monkeypatch.setattr("model2vec.distill.distill_from_model", cannot)
    metrics = baseline_static.run(params)
    reason = not_built_reason(params.path(params.paths.baseline_static))
    assert metrics["built"] is False and "model2vec cannot distil this bert teacher (NotImplementedError" in reason
    assert (params.path(params.paths.baseline_static) / NOT_BUILT_FILE).is_file()


def test_bad_static_params_name_the_key():
    from pipeline.config import params_from_dict

    with pytest.raises(ConfigError, match="baselines.static.vocabulary"):
        params_from_dict({"baselines": {"static": {"vocabulary": "all"}}})


# --------------------------------------------------------------------------- the report's verdict


def row(name, f1, e2e, alternative=False, retention=None, ci=0.03):
    return {"name": name, "test_macro_f1": f1, "e2e_latency_ms_p50": e2e, "alternative": alternative,
            "f1_retention": retention if retention is not None else f1 / 0.94, "test_macro_f1_ci95": [f1 - ci, f1 + ci],
            "format": "onnx", "precision": "int8", "latency_ms_p50": e2e}


SLA = SLAConfig(max_latency_ms=2.0, min_f1_retention=0.98)


def test_the_verdict_measures_the_champion_against_the_best_alternative():
    champion = row("student_onnx_int8", 0.937, 0.92)
    rows = [row("teacher", 0.94, 20), champion, row("tfidf", 0.883, 2.48, True), row("static", 0.829, 0.17, True)]
    verdict = alternatives_verdict(rows, champion, SLA)
    assert verdict.startswith("The champion is +5.4 points of test macro-F1 over the best alternative, tfidf (0.883), "
                              "at 0.37x its latency (end-to-end p50 0.92 vs 2.48 ms, 1 thread)")
    assert "consider shipping" not in verdict


def test_the_verdict_says_when_the_champion_buys_nothing():
    champion = row("student_onnx_int8", 0.93, 0.9)
    rows = [row("teacher", 0.94, 20), champion, row("tfidf", 0.935, 0.09, True, retention=0.995)]
    verdict = alternatives_verdict(rows, champion, SLA, {"static": "baselines.static.enabled is false"})
    assert "is 0.5 points of test macro-F1 below the best alternative" in verdict and "inside the champion's 95% interval" in verdict
    assert "tfidf keeps 99.5% of the teacher's test macro-F1 at 0.1x the champion's latency: consider shipping it" in verdict
    assert verdict.endswith("static was not built: baselines.static.enabled is false.")
    static_champion = row("static", 0.93, 0.2, True, retention=0.99)
    assert "ship it" in alternatives_verdict([row("teacher", 0.94, 20), static_champion], static_champion, SLA)
    assert "No champion to compare" in alternatives_verdict(rows, None, SLA)
    assert alternatives_verdict([row("teacher", 0.94, 20)], None, SLA) is None


def test_reference_rows_are_marked_in_the_table():
    rows = [{**row("tfidf", 0.88, 2.5, True), "num_parameters": 1e5, "size_mb": 1.0}]
    assert "| tfidf (reference) |" in markdown_table(rows)


def test_reference_members_are_members_of_the_family(tiny_params):
    members = {m.name: m for m in family(tiny_params())}
    assert members["tfidf"].alternative and members["static"].alternative and not members["teacher"].alternative
    assert members["tfidf"].servable and members["static"].servable


def test_the_benchmark_times_them_beside_the_family_without_torch(reference_project, tmp_path):
    from stages import benchmark

    params = copy_project(reference_project[0], tmp_path, ("data", "models"))
    benchmark.STAGE.execute(params)
    members = {e["name"]: e for e in json.loads(params.path(params.paths.benchmark).read_text())["members"]}
    assert set(members) == {"teacher", "tfidf", "static"}, "absent family members are left out"
    for name in ("tfidf", "static"):
        entry = members[name]
        assert entry["alternative"] and entry["servable"] and entry["imports_torch"] is False
        assert entry["latency_ms"]["1"]["p50"] > 0 and entry["size_mb"] > 0 and entry["peak_rss_mb"] > 10
    assert not members["teacher"]["alternative"] and members["teacher"]["imports_torch"] is True


def test_a_reference_champion_is_served_as_the_text_in_pyfunc_without_torch(trained_reference_members, tmp_path, capsys):
    """The registered champion may be a reference member: the same pyfunc serves it from the code it
    ships, answering as the predict command does, with its library in the requirements."""
    import os

    from pipeline.export.serving import log_pyfunc
    from tests.helpers import LOAD_AND_PREDICT, imported_top_level

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    for directory, library in zip(trained_reference_members, ("scikit-learn", "model2vec")):
        with mlflow.start_run(run_name=f"serving-{directory.name}"):
            info = log_pyfunc(directory, "classifier")
        requirements = Path(mlflow.pyfunc.get_model_dependencies(info.model_uri)).read_text()
        assert library in requirements and "torch" not in requirements
        texts = ["Operating profit rose.", "Net sales fell."]
        result = subprocess.run([sys.executable, "-X", "importtime", "-c", LOAD_AND_PREDICT, info.model_uri,
                                 json.dumps(texts)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        answer = json.loads(result.stdout.strip().splitlines()[-1])
        assert predict(["--model", str(directory), "--json", *texts]) == 0
        expected = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert answer["frame"] == expected and answer["list"] == expected
        assert "torch" not in imported_top_level(result.stderr)
