"""`make serve`: the registered champion over HTTP, or why there is none.

Looks up `models:/<name>@champion` in the project's tracking store. When it is there, this process
becomes `mlflow models serve` (the local environment, bound to 127.0.0.1). When it is not, it prints
what the report said about it (the member closest to the SLA, its distance to each goal and the `make
search` that may close the gap, read from the report's metrics file, not recomputed) and exits 1,
instead of an MLflow traceback.

    python -m pipeline.export.serve [--params params.yaml] [--name NAME] [--port 5001]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.config import DEFAULT_PARAMS_FILE, Params, load_params
from pipeline.errors import FinCompressError
from pipeline.io import read_json
from pipeline.tracking import tracking_uri

ALIAS = "champion"


def champion_version(name: str, uri: str) -> str | None:
    """The version registered under `name` with the champion alias, or None when there is none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        model = mlflow.MlflowClient(tracking_uri=uri).get_registered_model(name)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return model.aliases.get(ALIAS)  # a registered model may have versions but no champion


def why_no_champion(params: Params, name: str) -> str:
    """The report's own account when it registered nothing under `name`, else how to get a champion."""
    report = params.path(params.paths.metrics) / "report.json"
    try:
        message = (read_json(report).get("no_champion") or {}).get("message")
    except (OSError, ValueError):
        message = None
    if message and name == params.report.registered_model_name:
        return message
    return (f"The report ({report}) has no account of it: build the family and let its report pick a champion "
            "(make run), or serve another name (make serve MODEL_NAME=...).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS_FILE, help="params file (default: params.yaml)")
    parser.add_argument("--name", help="registered model name (default: params' report.registered_model_name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
    except FinCompressError as error:
        print(f"error: serve: {error}", file=sys.stderr)
        return 1
    name = args.name or params.report.registered_model_name
    uri = tracking_uri(params)
    if champion_version(name, uri) is None:
        print(f"error: serve: nothing is registered as {name}@{ALIAS} in {uri}.\n{why_no_champion(params, name)}",
              file=sys.stderr)
        return 1
    bin_dir = Path(sys.executable).parent
    mlflow_cli = str(bin_dir / "mlflow")
    command = [mlflow_cli, "models", "serve", "-m", f"models:/{name}@{ALIAS}", "--env-manager", "local",
               "-h", args.host, "-p", str(args.port)]
    os.environ["MLFLOW_TRACKING_URI"] = uri
    # mlflow starts `uvicorn` by name: this environment's, also when the venv is not activated.
    os.environ["PATH"] = os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])
    os.execv(mlflow_cli, command)  # replaces this process: the server gets its signals directly
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
