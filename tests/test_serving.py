"""The text-in MLflow pyfunc on a tiny exported model: it answers exactly as `pipeline.export.predict --json`,
loads without torch from the code it ships, rejects bad input clearly; and, slow, `mlflow models
serve` answers POST /invocations and the tracking server shows the registered champion."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipeline.errors import DataError
from pipeline.export.predict import main as predict
from pipeline.export.serve import main as serve
from pipeline.export.serving import ACCEPTED_SHAPES, SERVING_MODULES, log_pyfunc
from tests.helpers import LOAD_AND_PREDICT, export_tiny_classifier, imported_top_level

LABELS = ["negative", "neutral", "positive"]
REPO = Path(__file__).resolve().parents[1]
TEXTS = ["Operating profit rose sharply in the third quarter.", "Net sales fell.", "  The company held its AGM. "]


@pytest.fixture(scope="module")
def model_dir(tiny_bert, tmp_path_factory) -> Path:
    return export_tiny_classifier(tiny_bert, tmp_path_factory.mktemp("serving"), LABELS)


@pytest.fixture(scope="module")
def logged(model_dir):
    with mlflow.start_run(run_name="serving-test"):
        return log_pyfunc(model_dir, "classifier")


@pytest.fixture(scope="module")
def model_uri(logged) -> str:
    return logged.model_uri


@pytest.fixture(scope="module")
def loaded(model_uri):
    return mlflow.pyfunc.load_model(model_uri)


def predict_json(model_dir: Path, texts: list[str], capsys) -> list[dict]:
    assert predict(["--model", str(model_dir), "--json", *texts]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_pyfunc_answers_as_predict_does_in_a_process_without_torch(model_dir, model_uri, tmp_path, capsys):
    """A fresh interpreter outside the repository: the model runs from the code it ships."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", LOAD_AND_PREDICT, model_uri, json.dumps(TEXTS)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    expected = predict_json(model_dir, TEXTS, capsys)
    assert answer["frame"] == expected and answer["list"] == expected
    assert [row["text"] for row in expected] == [text.strip() for text in TEXTS]
    shipped = Path(answer["pipeline_file"]).parent
    assert shipped.parent.name == "code", f"pipeline came from {shipped}, not the model's code_paths"
    assert sorted(path.relative_to(shipped).as_posix() for path in shipped.rglob("*.py")) == sorted(SERVING_MODULES)
    imported = imported_top_level(result.stderr)
    assert {"onnxruntime", "tokenizers", "mlflow"} <= imported  # the listing is real
    assert not imported & {"torch", "transformers", "optimum"}


def test_pyfunc_metadata_declares_what_inference_needs(logged, model_uri):
    info = logged
    assert info.signature is not None and info.saved_input_example_info is not None
    outputs = info.signature.outputs.input_names()
    assert outputs == ["text", "label", "probabilities"]
    requirements = Path(mlflow.pyfunc.get_model_dependencies(model_uri)).read_text()
    names = {line.split("==")[0] for line in requirements.split() if line and not line.startswith("-")}
    assert {"onnxruntime", "tokenizers", "numpy", "pandas", "mlflow"} <= names
    assert not names & {"torch", "transformers", "optimum", "optimum-onnx"}


def test_multi_label_pyfunc_applies_the_thresholds_as_predict_does(model_dir, tmp_path, capsys):
    multi = tmp_path / "multi"
    shutil.copytree(model_dir, multi)
    config = json.loads((multi / "config.json").read_text())
    config.update(problem_type="multi_label_classification", label_thresholds=[0.0, 1.0, 0.5])
    (multi / "config.json").write_text(json.dumps(config))
    with mlflow.start_run(run_name="serving-multi-label"):
        uri = log_pyfunc(multi, "classifier").model_uri
    answer = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"text": TEXTS})).to_dict("records")
    expected = predict_json(multi, TEXTS, capsys)
    assert answer == expected
    assert all(row["labels"][0] == "negative" and "neutral" not in row["labels"] for row in answer)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (pd.DataFrame({"sentence": ["Profit rose."]}), r"has the columns \['sentence'\], expected exactly one 'text'"),
        (pd.DataFrame({"text": ["Profit rose."], "id": [1]}), r"has the columns \['text', 'id'\]"),
        (pd.DataFrame({"text": ["Profit rose.", 3]}), "text 1 is a int"),
        (["Profit rose.", None], "text 1 is missing"),
        (pd.DataFrame({"text": ["Profit rose.", "   "]}), "text 1 is empty"),
        (pd.DataFrame({"text": []}), "the input is empty"),
        ([], "the input is empty"),
        (np.array([["Profit rose.", "Sales fell."]]), r"nested list \(shape \[1, 2\]\)"),
        ([["Profit rose.", "Sales fell."]], "text 0 is itself a list"),
        ([{"text": "Profit rose."}, {"sentence": "Sales fell."}], r"record 1 has the keys \['sentence'\]"),
        ({"text": ["Profit rose."], "extra": ["x"]}, r"the keys \['extra', 'text'\]"),
        (42, "cannot classify a int"),
    ],
    ids=["other column", "extra column", "a number", "null", "blank", "empty DataFrame", "empty list",
         "2-D array", "nested list", "record with another key", "mapping with another key", "a number alone"],
)
def test_bad_input_gets_a_clear_error_with_the_accepted_shapes(loaded, bad, message):
    with pytest.raises(DataError, match=message) as error:
        loaded.predict(bad)
    assert ACCEPTED_SHAPES in str(error.value)


@pytest.mark.parametrize(
    "shape",
    [
        list(TEXTS), np.array(TEXTS), pd.DataFrame({"text": TEXTS}), pd.DataFrame({0: TEXTS}),
        [{"text": text} for text in TEXTS], {"text": list(TEXTS)}, pd.Series(TEXTS),
    ],
    ids=["list", "array", "DataFrame", "unnamed column", "records", "mapping", "Series"],
)
def test_every_accepted_shape_answers_one_prediction_per_text_in_order(loaded, shape):
    answer = loaded.predict(shape)
    assert list(answer["text"]) == [text.strip() for text in TEXTS]


def test_a_bare_string_is_one_text(loaded):
    answer = loaded.predict(TEXTS[0])
    assert list(answer["text"]) == [TEXTS[0].strip()]


def test_serve_with_no_champion_exits_1_with_the_reports_account(tmp_path, capsys):
    """`make serve` before any champion: the report's closest-member message, not an MLflow error."""
    params = tmp_path / "params.yaml"
    params.write_text("report:\n  registered_model_name: serve-test-none\n")
    assert serve(["--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert "error: serve: nothing is registered as serve-test-none@champion" in err and "(make run)" in err
    message = "No servable member meets the SLA ...\nClosest: student_onnx_int8 (...)\n  make search SEARCH_ARGS=\"...\""
    (tmp_path / "reports" / "metrics").mkdir(parents=True)
    (tmp_path / "reports" / "metrics" / "report.json").write_text(json.dumps({"no_champion": {"message": message}}))
    mlflow.MlflowClient().create_registered_model("serve-test-none")  # registered, but no version is the champion
    assert serve(["--params", str(params)]) == 1
    assert capsys.readouterr().err.endswith(f"@champion in {os.environ['MLFLOW_TRACKING_URI']}.\n{message}\n")


# --------------------------------------------------------------------------- servers (slow)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(url: str, payload: dict | None = None, timeout: float = 30, csv: str | None = None) -> tuple[int, dict]:
    data = csv.encode() if csv is not None else None if payload is None else json.dumps(payload).encode()
    kind = "text/csv" if csv is not None else "application/json"
    request = urllib.request.Request(url, data=data, headers={"Content-Type": kind})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
            return response.status, json.loads(body) if body.strip() else {}
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """A server in its own process group (stopped by that group's id), its output in `log`."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    with open(log, "wb") as out:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_up(process: subprocess.Popen, url: str, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.slow
def test_served_champion_answers_like_predict_and_shows_in_the_tracking_server(model_dir, tmp_path, capsys):
    from stages.report import register_champion

    name = "serving-test-champion"
    row = {"name": "student_onnx_int8", "test_macro_f1": 0.75, "latency_ms_p50": 0.5, "size_mb": 1.25}
    with mlflow.start_run(run_name="report") as run:
        version = register_champion(row, model_dir, name, card="# student_onnx_int8: the card\n")
    expected = predict_json(model_dir, TEXTS, capsys)

    port = free_port()
    serve_log = tmp_path / "serve.log"
    # Through `make serve`, as a user starts it (the venv is this interpreter's: -o skips its setup).
    server = start(["make", "-C", str(REPO), "-o", ".venv/.installed", "serve", f"BIN={Path(sys.executable).parent}",
                    f"MODEL_NAME={name}", f"SERVE_PORT={port}"], tmp_path, serve_log)
    try:
        wait_until_up(server, f"http://127.0.0.1:{port}/ping", serve_log)
        url = f"http://127.0.0.1:{port}/invocations"
        status, answer = http(url, {"dataframe_records": [{"text": text} for text in TEXTS]})
        assert status == 200, answer
        assert answer["predictions"] == expected
        for accepted in ({"inputs": TEXTS}, {"instances": TEXTS}, {"inputs": [{"text": t} for t in TEXTS]},
                         {"inputs": {"text": TEXTS}}, {"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]}}):
            status, answer = http(url, accepted)
            assert status == 200 and answer["predictions"] == expected, (accepted, answer)
        status, answer = http(url, csv="text\n" + "".join(f'"{t}"\n' for t in TEXTS))
        assert status == 200 and answer["predictions"] == expected
        status, answer = http(url, {"inputs": TEXTS[1]})  # a bare string: one text, one prediction
        assert status == 200 and answer["predictions"] == expected[1:2]
        for bad, message in (
            ({"inputs": [["Profit rose.", "Sales fell."]]}, "nested"),
            ({"inputs": []}, "the input is empty"),
            ({"dataframe_records": []}, "the input is empty"),
            ({"dataframe_records": [{"sentence": "Profit rose."}]}, "expected exactly one 'text' column"),
            ({"inputs": ["Profit rose.", None]}, "text 1 is missing"),
            ({"inputs": [1, 2]}, "text 0 is a int"),
            ({"inputs": [{"text": "a", "id": 1}]}, "record 0 has the keys"),
        ):
            status, answer = http(url, bad)
            assert status == 400 and message in answer["message"] and ACCEPTED_SHAPES in answer["message"], (bad, answer)
    finally:
        stop(server)
    assert server.returncode is not None

    # The registry and the run, fetched from a tracking server's REST API as the MLflow UI does.
    port = free_port()
    ui_log = tmp_path / "ui.log"
    ui = start([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                os.environ["MLFLOW_TRACKING_URI"], "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
               tmp_path, ui_log)
    try:
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        wait_until_up(ui, f"http://127.0.0.1:{port}/health", ui_log)
        status, answer = http(f"{api}/registered-models/alias?name={name}&alias=champion")
        assert status == 200, answer
        found = answer["model_version"]
        assert found["version"] == version and found["description"].startswith("# student_onnx_int8")
        tags = {tag["key"]: tag["value"] for tag in found["tags"]}
        assert tags["family_member"] == "student_onnx_int8" and float(tags["test_macro_f1"]) == 0.75
        status, answer = http(f"{api}/runs/get?run_id={run.info.run_id}")
        assert status == 200 and answer["run"]["info"]["run_name"] == "report"
    finally:
        stop(ui)
