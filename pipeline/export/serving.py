"""The exported ONNX model as an MLflow `python_function` model: text in, labels and probabilities out.

    model = mlflow.pyfunc.load_model("models:/fincompress-sentiment@champion")
    model.predict(pd.DataFrame({"text": ["Operating profit rose.", "Net sales fell."]}))
    model.predict(["Operating profit rose."])  # a list of strings works too

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


def texts_from(model_input: Any) -> list[str]:
    """The texts of a DataFrame's `text` column or of a list of strings, checked and stripped."""
    if isinstance(model_input, pd.DataFrame):
        if list(model_input.columns) == [0]:  # MLflow hands a list of strings over as an unnamed column
            model_input = model_input.rename(columns={0: TEXT_COLUMN})
        if TEXT_COLUMN not in model_input.columns:
            raise DataError(
                f"the input has no '{TEXT_COLUMN}' column (it has {[str(c) for c in model_input.columns]}); "
                f"send a DataFrame with a '{TEXT_COLUMN}' column, e.g. {{\"dataframe_records\": [{{\"text\": \"...\"}}]}}"
            )
        values = model_input[TEXT_COLUMN].tolist()
    elif isinstance(model_input, (list, tuple, np.ndarray, pd.Series)):
        values = list(model_input)
    else:
        raise DataError(
            f"cannot classify a {type(model_input).__name__}; send a DataFrame with a '{TEXT_COLUMN}' column "
            "or a list of strings"
        )
    if not values:
        raise DataError("no texts to classify: the input is empty")
    texts = []
    for row, value in enumerate(values):
        if value is None or (isinstance(value, float) and np.isnan(value)):  # pandas turns None into NaN
            raise DataError(f"text {row} is missing (null); send a string for every row")
        if not isinstance(value, str):
            raise DataError(f"text {row} is a {type(value).__name__} ({value!r}), not a string; send strings only")
        if not value.strip():
            raise DataError(f"text {row} is empty; send non-blank texts only")
        texts.append(value.strip())  # as the predict command reads its lines
    return texts


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
        return pd.DataFrame(classify(self.classifier, texts))


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
    from mlflow.types.schema import AnyType, ColSpec, Schema

    model_dir = Path(model_dir)
    example = pd.DataFrame({TEXT_COLUMN: EXAMPLE_TEXTS})
    classifier = load_classifier(model_dir)
    output = pd.DataFrame(classify(classifier, EXAMPLE_TEXTS))
    # One unnamed input of any type: a bare list of strings passes MLflow's schema check as well as a
    # DataFrame, and the model's own checks (a `text` column of non-blank strings) say what is wrong
    # more plainly than a failed type cast would. The input example shows the expected shape.
    signature = ModelSignature(Schema([ColSpec(AnyType())]), infer_signature(example, output).outputs)
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
