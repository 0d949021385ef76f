"""The entry point every stage shares: parse arguments, validate params, open the MLflow run,
run the stage, write `reports/metrics/<stage>.json`. A user-facing error prints its message (no
traceback) and exits with status 1; nothing already written is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.config import DEFAULT_PARAMS_FILE, Params, load_params
from pipeline.errors import FinCompressError, TransientError, unexpected_error_message
from pipeline.io import check_output_paths, read_json, stage_lock, write_json

log = logging.getLogger("fincompress")

StageFn = Callable[[Params], dict[str, Any]]
EX_TEMPFAIL = 75  # sysexits.h: a temporary failure, worth retrying
LOG_DIR = ".cache/logs"  # tracebacks of unexpected errors (the terminal gets one line)


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


@dataclass(frozen=True)
class Stage:
    """A DVC stage's wiring, declared once in its module and used by its `main` and by the tests:
    its name (as in dvc.yaml), the family member it writes (an MLflow tag), the params sections
    logged with its run, the paths.* entries it writes (locked for a direct run; its metrics file
    always counts), whether it writes a reference member, and the function that does the work."""

    name: str
    run: StageFn
    member: str | None = None
    sections: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    reference: bool = False  # it writes a reference member (pipeline/baselines/): its run is tagged reference=true

    def execute(self, params: Params) -> dict[str, Any]:
        """Run the stage in its MLflow run and write its metrics file; return the metrics."""
        if not is_main_process():
            return self.run(params)
        with tracking.stage_run(params, self.name, self.member, self.sections, data_hash(params), self.reference):
            metrics = self.run(params)
            tracking.log_dataset(params)  # after the run: prepare_data has only now written the data
            tracking.log_metrics(metrics)
            path = metrics_path(params, self.name)
            write_json(path, metrics)
            tracking.log_artifact(path, "metrics")
        return metrics

    def main(self) -> None:
        """The command line: `python -m stages.<name> [--params FILE] [key=value ...]`."""
        parser = argparse.ArgumentParser(prog=f"python -m stages.{self.name}", description=self.run.__doc__)
        parser.add_argument("--params", default=DEFAULT_PARAMS_FILE, help="params file (default: params.yaml)")
        parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. teacher.epochs=1")
        args = parser.parse_args()
        setup_logging()
        try:
            params = load_params(args.params, args.overrides)
            check_output_paths(params)
            # One run of a stage per set of outputs, also outside DVC's lock (only rank 0 writes under torchrun).
            lock = stage_lock(params, self.name, self.outputs) if is_main_process() else contextlib.nullcontext()
            with lock:
                self.execute(params)
        except TransientError as error:
            # Not "error: <stage>:": orchestrators retry this one (the inputs are not at fault).
            print(f"transient error: {self.name}: {error}", file=sys.stderr)
            sys.exit(EX_TEMPFAIL)
        except FinCompressError as error:
            print(f"error: {self.name}: {error}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print(f"error: {self.name}: interrupted; previous outputs are untouched", file=sys.stderr)
            sys.exit(130)
        except Exception as error:  # a bug or the environment: a message here, the traceback in the log
            log_dir = Path(args.params).resolve().parent / LOG_DIR
            print(f"error: {unexpected_error_message(self.name, error, log_dir)}", file=sys.stderr)
            sys.exit(1)
