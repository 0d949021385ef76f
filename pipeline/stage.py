"""The entry point every stage shares: parse arguments, validate params, open the MLflow run,
run the stage, write `reports/metrics/<stage>.json`. A user-facing error prints its message (no
traceback) and exits with status 1; nothing already written is touched.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from pipeline import tracking
from pipeline.config import DEFAULT_PARAMS_FILE, Params, load_params
from pipeline.errors import FinCompressError, TransientError
from pipeline.io import read_json, write_json

log = logging.getLogger("fincompress")

StageFn = Callable[[Params], dict[str, Any]]
EX_TEMPFAIL = 75  # sysexits.h: a temporary failure, worth retrying


def is_main_process() -> bool:
    """False on the non-zero ranks of a torchrun / accelerate launch: only rank 0 writes and tracks."""
    return int(os.environ.get("RANK", "0")) == 0


def setup_logging() -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(show_path=False, rich_tracebacks=True)],
        force=True,
    )
    for noisy in ("alembic", "mlflow", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def metrics_path(params: Params, stage: str):
    return params.path(params.paths.metrics) / f"{stage}.json"


def data_hash(params: Params) -> str | None:
    manifest = params.path(params.paths.prepared) / "manifest.json"
    try:
        return read_json(manifest).get("content_hash")
    except (OSError, ValueError):  # not prepared yet (or unreadable): the tag stays empty
        return None


def execute(
    run: StageFn, params: Params, stage: str, member: str | None = None, sections: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Run one stage in its MLflow run and write its metrics file; return the metrics."""
    if not is_main_process():
        return run(params)
    with tracking.stage_run(params, stage, member, sections, data_hash(params)):
        metrics = run(params)
        tracking.log_metrics(metrics)
        path = metrics_path(params, stage)
        write_json(path, metrics)
        tracking.log_artifact(path, "metrics")
    return metrics


def main(run: StageFn, stage: str, member: str | None = None, sections: tuple[str, ...] = ()) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=run.__doc__)
    parser.add_argument("--params", default=DEFAULT_PARAMS_FILE, help="params file (default: params.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. teacher.epochs=1")
    args = parser.parse_args()
    setup_logging()
    try:
        params = load_params(args.params, args.overrides)
        execute(run, params, stage, member, sections)
    except TransientError as error:
        # Not "error: <stage>:": orchestrators retry this one (the inputs are not at fault).
        print(f"transient error: {stage}: {error}", file=sys.stderr)
        sys.exit(EX_TEMPFAIL)
    except FinCompressError as error:
        print(f"error: {stage}: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"error: {stage}: interrupted; previous outputs are untouched", file=sys.stderr)
        sys.exit(130)
