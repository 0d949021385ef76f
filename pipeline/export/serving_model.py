"""The MLflow "models from code" entry point of the text-in pyfunc (see pipeline/export/serving.py).

MLflow copies this file into the logged model and runs it when the model is loaded, so the model is
rebuilt from code rather than unpickled.
"""

import mlflow

from pipeline.export.serving import TextClassifier

mlflow.models.set_model(TextClassifier())
