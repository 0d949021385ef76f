"""A mismatched model never answers, every command has one error boundary, and faults heal
(issue 18, parts 3-5): tokenizer/embeddings, id2label/output width, symlink escapes, max_length vs
position embeddings, a re-headed classifier, non-UTF-8 input to predict, unexpected exceptions,
MLflow write failures, runs left RUNNING by a killed stage, half-written checkpoints, and one
benchmark per machine with its load average.

The cases are rows of the bad-input matrix in tests/README.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from pipeline import tracking
from pipeline.config import params_from_dict
from pipeline.errors import ConfigError, ModelError, TransientError
from pipeline.evaluation import latency
from pipeline.export.onnx import OnnxClassifier
from pipeline.export.onnx_export import export_fp32
from pipeline.export.predict import main as predict
from pipeline.training import checkpoints
from scripts.tiny_project import sh, tiny_params_tree, write_project
from stages import prepare_data, train_teacher

REPO = Path(__file__).resolve().parents[1]
LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def exported(tiny_bert, tmp_path_factory) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("exported")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=3, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}
    )
    model.save_pretrained(root / "source", safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(root / "source")
    export_fp32(root / "source", root / "onnx", opset=17, max_length=32)
    return root / "onnx"


def copy_of(exported: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(exported, target)
    return target


def test_a_tokenizer_from_another_model_is_refused(exported, tmp_path, capsys):
    target = copy_of(exported, tmp_path)
    tokenizer = Tokenizer.from_file(str(target / "tokenizer.json"))
    rows = tokenizer.get_vocab_size()
    tokenizer.add_tokens([f"extra{i}" for i in range(50)])  # a bigger vocabulary than the embeddings
    tokenizer.save(str(target / "tokenizer.json"))
    with pytest.raises(ModelError, match=rf"the tokenizer has {rows + 50} tokens but the model's embeddings only {rows}"):
        OnnxClassifier.load(target)
    assert predict(["--model", str(target), "Profit rose."]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "they come from different models" in captured.err


def test_id2label_that_does_not_name_every_output_is_refused(exported, tmp_path):
    target = copy_of(exported, tmp_path)
    config = json.loads((target / "config.json").read_text())
    config["id2label"] = {"0": "down", "1": "up"}
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"id2label names 2 labels but the model outputs 3 values"):
        OnnxClassifier.load(target)


def test_files_linked_from_outside_the_model_directory_are_refused(exported, tmp_path):
    target = copy_of(exported, tmp_path)
    outside = tmp_path / "elsewhere.json"
    (target / "tokenizer.json").rename(outside)
    (target / "tokenizer.json").symlink_to(outside)
    with pytest.raises(ModelError, match=r"tokenizer\.json points outside the model directory"):
        OnnxClassifier.load(target)
    inside = copy_of(exported, tmp_path / "ok")  # a link within the directory is fine
    (inside / "tokenizer.json").rename(inside / "real-tokenizer.json")
    (inside / "tokenizer.json").symlink_to(inside / "real-tokenizer.json")
    assert OnnxClassifier.load(inside).label_names == LABELS


def test_predict_refuses_bytes_that_are_not_utf8(exported, tmp_path, capsys):
    file = tmp_path / "texts.txt"
    file.write_bytes("Profit rose.\n\u201cSales\u201d fell.\n".encode("cp1252"))
    assert predict(["--model", str(exported), "--file", str(file)]) == 1
    err = capsys.readouterr().err
    assert f"error: --file {file}: line 2 is not UTF-8 (byte 0x93); save the texts as UTF-8" in err
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.export.predict", "--model", str(exported)],
        input=b"fine\n\xff\xfe broken\n", capture_output=True, cwd=REPO,
    )
    assert result.returncode == 1
    assert b"error: standard input: line 2 is not UTF-8 (byte 0xff)" in result.stderr
    assert b"Traceback" not in result.stderr


def test_predict_keeps_a_text_with_a_line_separator_whole(exported, tmp_path, capsys):
    file = tmp_path / "texts.txt"
    file.write_text("Profit\u2028rose.\r\nSales fell.\n", encoding="utf-8")
    assert predict(["--model", str(exported), "--json", "--file", str(file)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.split("\n") if line]
    assert [row["text"] for row in rows] == ["Profit\u2028rose.", "Sales fell."]


def test_predict_turns_an_unexpected_exception_into_one_line(exported, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(OnnxClassifier, "logits", lambda self, texts, batch_size: 1 / 0)  # a bug
    assert predict(["--model", str(exported), "Profit rose."]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: predict: unexpected ZeroDivisionError: division by zero; the traceback is in ")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    (log_file,) = tmp_path.glob("fincompress-predict-*.log")
    assert "Traceback" in log_file.read_text() and "ZeroDivisionError" in log_file.read_text()


def test_a_stage_turns_an_unexpected_exception_into_one_line(tmp_path, tiny_bert):
    root = write_project(tmp_path / "project", tiny_params_tree(tiny_bert))
    (root / "stages" / "broken.py").write_text(textwrap.dedent("""
        from pipeline.stage import Stage

        def run(params):
            return {"x": [][1]}  # a bug

        if __name__ == "__main__":
            Stage("broken", run).main()
    """))
    result = sh([sys.executable, "-m", "stages.broken"], root, check=False)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: broken: unexpected IndexError: list index out of range; the traceback is in ")
    assert "Traceback" not in result.stderr
    (log_file,) = (root / ".cache" / "logs").glob("fincompress-broken-*.log")
    assert "Traceback" in log_file.read_text()
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'broken'")
    assert list(runs["status"]) == ["FAILED"]


def test_an_mlflow_write_failure_is_the_retryable_error(tmp_path, tiny_params):
    params = tiny_params(tracking={"experiment": "artifact-store-broken"})
    (tmp_path / "mlartifacts").write_text("a file where the artifact store should be")
    with pytest.raises(TransientError, match=r"could not write the artifact manifest\.json to MLflow .*then run again"):
        prepare_data.STAGE.execute(params)
    runs = mlflow.search_runs(experiment_names=["artifact-store-broken"])
    assert list(runs["status"]) == ["FAILED"]


def _open_run(tmp_path: Path, stage: str, then: str) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import os, time
        from pipeline.config import params_from_dict
        from pipeline import tracking
        params = params_from_dict({{"tracking": {{"experiment": "killed-runs"}}}}, root={str(tmp_path)!r})
        with tracking.stage_run(params, {stage!r}, None, (), None) as run:
            print(run.info.run_id, flush=True)
            {then}
    """)
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)


def test_a_run_left_running_by_a_killed_stage_is_marked_killed(tmp_path):
    killed = _open_run(tmp_path, "prepare_data", "os.kill(os.getpid(), 9)")
    killed_id = killed.stdout.readline().strip()
    killed.wait()
    live = _open_run(tmp_path, "prepare_data", "time.sleep(60)")
    try:
        live_id = live.stdout.readline().strip()
        assert mlflow.get_run(killed_id).info.status == "KILLED", "closed by the next start of the stage"
        params = params_from_dict({"tracking": {"experiment": "killed-runs"}}, root=tmp_path)
        with tracking.stage_run(params, "prepare_data", None, (), None):
            pass
        assert mlflow.get_run(live_id).info.status == "RUNNING", "a live run is left alone"
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()


def _checkpoint(directory: Path, step: int, complete: bool) -> Path:
    checkpoint = directory / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    save_file({"w": torch.zeros(64)}, str(checkpoint / "model.safetensors"))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    checkpoints.record_digests(checkpoint)  # as DistillationTrainer does after every save
    if not complete:  # what a full disk leaves: the weights cut short
        data = (checkpoint / "model.safetensors").read_bytes()
        (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
    return checkpoint


def test_only_a_complete_checkpoint_is_resumed(tmp_path, caplog):
    params = params_from_dict({}, root=tmp_path)
    directory = params.path(params.paths.checkpoints) / "train_teacher"
    directory.mkdir(parents=True)
    (directory / "fingerprint.txt").write_text("key\n")
    good = _checkpoint(directory, 10, complete=True)
    half = _checkpoint(directory, 20, complete=False)
    no_state = _checkpoint(directory, 30, complete=True)
    (no_state / "trainer_state.json").unlink()
    with caplog.at_level(logging.INFO):
        _, resume = checkpoints.checkpoint_dir(params, "train_teacher", "key")
    assert resume == str(good)
    assert not half.exists() and not no_state.exists()
    assert f"removing the incomplete checkpoint {half}" in caplog.text


def test_max_length_beyond_the_position_embeddings_fails_before_training(tiny_params):
    params = tiny_params(task={"max_length": 256})  # the tiny BERT has 128 positions
    prepare_data.STAGE.execute(params)
    with pytest.raises(ConfigError, match=r"task\.max_length=256 is longer than the model's position "
                                          r"embeddings \(128 tokens\); set task\.max_length to at most 128"):
        train_teacher.STAGE.execute(params)
    assert not params.path(params.paths.checkpoints).exists()


def test_a_classifier_with_other_labels_as_teacher_gets_the_right_hint(tmp_path, tiny_params, tiny_bert):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    five = tmp_path / "five-label-classifier"
    AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=5).save_pretrained(five)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(five)
    params = tiny_params(teacher={"model": str(five)})
    prepare_data.STAGE.execute(params)
    with pytest.raises(ModelError, match=r"is already a classifier, and its classification head does not fit "
                                         r"the 3 classes of the data .*base encoder it was fine-tuned from") as error:
        train_teacher.STAGE.execute(params)
    assert "config.json and model.safetensors" not in str(error.value)


def test_one_benchmark_at_a_time_with_the_load_recorded(tmp_path, monkeypatch, caplog):
    lock = tmp_path / "bench.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from pipeline.io import exclusive_lock
            with exclusive_lock({str(lock)!r}, "its benchmark"):
                print("held", flush=True)
                time.sleep(1.5)
        """)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    with caplog.at_level(logging.WARNING), latency.quiet_machine(lock) as load:
        waited = time.monotonic() - started
    holder.wait()
    assert waited > 0.5, "the second benchmark waits for the first"
    assert f"waiting for another process (pid {holder.pid}) to finish its benchmark" in caplog.text
    assert len(load["load_average_before"]) == 3 and len(load["load_average_after"]) == 3
    assert load["cores"] >= 1 and isinstance(load["busy"], bool)
    assert 0 <= load["other_work_cores_before"] <= os.cpu_count()

    import psutil

    cores = load["cores"]
    monkeypatch.setattr(os, "getloadavg", lambda: (4.0 * cores, 1.0, 1.0))  # the stage that ran just before
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval: 0.0)  # ... and is over now
    caplog.clear()
    with caplog.at_level(logging.WARNING), latency.quiet_machine(lock) as load:
        pass
    assert load["busy"] is False and load["other_work_cores_before"] == 0.0
    assert "busy" not in caplog.text

    monkeypatch.setattr(psutil, "cpu_percent", lambda interval: 100.0)  # another job saturating the CPU
    with caplog.at_level(logging.WARNING), latency.quiet_machine(lock) as load:
        pass
    assert load["busy"] is True
    assert (f"the machine was busy when the benchmark started (other processes used {psutil.cpu_count():.2f} of "
            f"{cores} cores in the 0.5 s before timing)") in caplog.text

    def unreadable(interval):
        raise OSError("no /proc/stat")

    monkeypatch.setattr(psutil, "cpu_percent", unreadable)  # the load average decides where psutil cannot read
    caplog.clear()
    with caplog.at_level(logging.WARNING), latency.quiet_machine(lock) as load:
        pass
    assert load["busy"] is True and load["other_work_cores_before"] is None
    assert f"(1-minute load average {4.0 * cores:.2f} on {cores} cores)" in caplog.text
