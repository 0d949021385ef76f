"""The exported ONNX model as an MLflow `python_function` model: text in, labels and probabilities out.

    model = mlflow.pyfunc.load_model("models:/fincompress-sentiment@champion")
    model.predict(pd.DataFrame({"text": ["Operating profit rose.", "Net sales fell."]}))
    model.predict(["Operating profit rose."])  # a list of strings works too, and one string is one text

Each row of the answer is what `python -m pipeline.export.predict --json` prints for the text: `text`,
`label` (multi-label models: `labels`, every label at or above its threshold from config.json) and
`probabilities` by class name. The model wraps the exported directory (model.onnx, tokenizer.json,
config.json) through `OnnxClassifier`, so loading and serving it needs ONNX Runtime, `tokenizers`,
numpy and pandas, never torch: only the torch-free modules of `pipeline` are shipped with it. A reference
member (pipeline/baselines/) as the champion is served the same way from its own directory, with its
libraries (scikit-learn or model2vec) added to the requirements.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from pipeline.errors import DataError
from pipeline.export.predict import classify, load_classifier

MODEL_DIR = "model_dir"  # the pyfunc artifact holding the exported directory
TEXT_COLUMN = "text"
# The modules the pyfunc imports when MLflow loads it (pipeline.export.serving and what it imports): shipped
# as code_paths, so the served model never needs the rest of `pipeline` (torch, transformers, optimum).
# The modules (relative to pipeline/) that serving imports, with the package __init__ files on the way.
SERVING_MODULES = (
    "__init__.py", "errors.py", "io.py", "data/__init__.py", "data/labels.py",
    "export/__init__.py", "export/onnx.py", "export/predict.py", "export/serving.py",
    "baselines/__init__.py", "baselines/classifiers.py",  # a reference member as the champion
)
# The libraries inference needs; pinned to the versions the model was checked with.
REQUIREMENTS = ("mlflow", "onnxruntime", "onnx", "tokenizers", "numpy", "pandas")
EXAMPLE_TEXTS = ["Operating profit rose sharply in the third quarter.", "Net sales fell by 5 percent."]


# Every input error ends with this, so a caller sees what to send instead.
ACCEPTED_SHAPES = (
    'send one text per prediction, e.g. {"inputs": ["Profit rose.", "Sales fell."]}, a single text as '
    '{"inputs": "Profit rose."}, or a "text" column: {"dataframe_records": [{"text": "Profit rose."}]} or '
    '{"dataframe_split": {"columns": ["text"], "data": [["Profit rose."]]}}'
)


def texts_from(model_input: Any) -> list[str]:
    """The texts of a request, one per prediction, in order; anything else is a DataError naming what
    is wrong and ending with ACCEPTED_SHAPES. Accepted: a list (or 1-D array) of strings, a single
    string (one text: one prediction), records or a DataFrame with exactly one column `text` (or the
    unnamed column MLflow makes of a list of strings), a mapping {"text": [...]}. Nested lists are
    refused: [["a", "b"]] could mean one text or two, and the answer must not guess."""
    values = _text_values(model_input)
    if not values:
        raise DataError(f"no texts to classify: the input is empty; {ACCEPTED_SHAPES}")
    texts = []
    for row, value in enumerate(values):
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()  # MLflow's parsing wraps each JSON string of a record in an array
        if value is None or (isinstance(value, float) and np.isnan(value)):  # pandas turns None into NaN
            raise DataError(f"text {row} is missing (null); send a string for every text. {ACCEPTED_SHAPES}")
        if not isinstance(value, str):
            shown = value.tolist() if isinstance(value, np.ndarray) else value
            raise DataError(f"text {row} is a {type(shown).__name__} ({shown!r}), not a string. {ACCEPTED_SHAPES}")
        if not value.strip():
            raise DataError(f"text {row} is empty; send non-blank texts only. {ACCEPTED_SHAPES}")
        texts.append(value.strip())  # as the predict command reads its lines
    return texts


def _text_values(model_input: Any) -> list[Any]:
    """The request's values, one per text (checked one by one by `texts_from`)."""
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        columns = [str(column) for column in model_input.columns]
        if list(model_input.columns) in ([0], [TEXT_COLUMN]):  # MLflow makes a list of strings column 0
            return model_input.iloc[:, 0].tolist()
        if model_input.empty and not columns:
            return []
        raise DataError(f"the input has the columns {columns}, expected exactly one '{TEXT_COLUMN}' column; {ACCEPTED_SHAPES}")
    if isinstance(model_input, dict):
        if set(model_input) != {TEXT_COLUMN}:
            raise DataError(f"the input has the keys {sorted(map(str, model_input))}, expected only "
                            f"'{TEXT_COLUMN}'; {ACCEPTED_SHAPES}")
        return _text_values(model_input[TEXT_COLUMN])
    if isinstance(model_input, np.ndarray):
        if model_input.ndim == 0:
            return [model_input.item()]
        if model_input.ndim > 1:
            raise DataError(f"the input is a nested list (shape {list(model_input.shape)}); {ACCEPTED_SHAPES}")
        return model_input.tolist()
    if isinstance(model_input, (list, tuple, pd.Series)):
        values = list(model_input)
        if values and all(isinstance(value, dict) for value in values):  # records: [{"text": ...}, ...]
            return [_one_record(value, row) for row, value in enumerate(values)]
        nested = next((row for row, value in enumerate(values) if isinstance(value, (list, tuple, np.ndarray, dict))
                       and not (isinstance(value, np.ndarray) and value.ndim == 0)), None)
        if nested is not None:
            raise DataError(f"text {nested} is itself a list or record: the input is nested; {ACCEPTED_SHAPES}")
        return values
    raise DataError(f"cannot classify a {type(model_input).__name__}; {ACCEPTED_SHAPES}")


def _one_record(record: dict[str, Any], row: int) -> Any:
    if set(record) != {TEXT_COLUMN}:
        raise DataError(f"record {row} has the keys {sorted(map(str, record))}, expected only '{TEXT_COLUMN}'; {ACCEPTED_SHAPES}")
    return record[TEXT_COLUMN]


class InputError(DataError, MlflowException):
    """Bad input to the served model. An MlflowException too, so that `mlflow models serve` answers
    400 with this message instead of a generic 500 ("unexpected error while evaluating the model")."""

    def __init__(self, message: str) -> None:
        MlflowException.__init__(self, message, error_code=INVALID_PARAMETER_VALUE)


class TextClassifier(mlflow.pyfunc.PythonModel):
    """An exported ONNX classifier that takes texts, for `mlflow.pyfunc` and `mlflow models serve`."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.classifier = load_classifier(context.artifacts[MODEL_DIR])

    # MLflow hands the input over as a DataFrame (a list of strings too, after the signature check); a
    # DataFrame hint also tells MLflow to take the schema from the signature, not from type hints.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """One row per text: `text`, `label` (multi-label: `labels`) and `probabilities` by class."""
        try:
            texts = texts_from(model_input)
        except DataError as error:
            raise InputError(str(error)) from None
        answers = classify(self.classifier, texts)
        if len(answers) != len(texts):  # one prediction per text, in order: never a silent truncation
            raise RuntimeError(f"{len(answers)} predictions for {len(texts)} texts")
        return pd.DataFrame(answers)


@contextmanager
def serving_code() -> Iterator[Path]:
    """A temporary copy of the `pipeline` package holding only SERVING_MODULES, for code_paths."""
    source = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="fincompress-serving-") as tmp:
        package = Path(tmp) / "pipeline"
        for name in SERVING_MODULES:
            (package / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, package / name)
        yield package


def pip_requirements(extra: tuple[str, ...] = ()) -> list[str]:
    """REQUIREMENTS and `extra` (a reference member's libraries), pinned to the installed versions."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in (*REQUIREMENTS, *extra)]


def log_pyfunc(model_dir: str | Path, name: str, **log_model_kwargs: Any) -> Any:
    """Log `model_dir` (an exported ONNX directory, or a reference member's) as a text-in pyfunc model in
    the active run.

    Extra keyword arguments go to `mlflow.pyfunc.log_model` (e.g. registered_model_name, tags).
    Returns its ModelInfo.
    """
    from mlflow.models import ModelSignature, infer_signature

    model_dir = Path(model_dir)
    example = pd.DataFrame({TEXT_COLUMN: EXAMPLE_TEXTS})
    classifier = load_classifier(model_dir)
    output = pd.DataFrame(classify(classifier, EXAMPLE_TEXTS))
    # No input schema: MLflow's schema enforcement would reshape the request before the model sees it
    # ([["a", "b"]] became the one text "a") and refuse an empty list in its own words. The model checks
    # the request as sent (texts_from) and answers one prediction per text or a 400 that shows the
    # accepted shapes. The input example still documents the usual shape.
    signature = ModelSignature(inputs=None, outputs=infer_signature(example, output).outputs)
    with serving_code() as package:
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("serving_model.py")),  # code, not a pickle
            artifacts={MODEL_DIR: str(model_dir)},
            code_paths=[str(package)],
            signature=signature,
            input_example=example,
            pip_requirements=pip_requirements(getattr(classifier, "requirements", ())),
            **log_model_kwargs,
        )
