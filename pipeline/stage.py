"""The entry point every stage shares: parse arguments, validate params, open the MLflow run,
run the stage, write `reports/metrics/<stage>.json`. A user-facing error prints its message (no
traceback) and exits with status 1; nothing already written is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from pipeline import tracking
from pipeline.config import DEFAULT_PARAMS_FILE, Params, load_params
from pipeline.errors import FinCompressError, TransientError, log_file_for, unexpected_error_message
from pipeline.io import check_output_paths, read_json, stage_lock, write_json
from pipeline.processes import exit_process

log = logging.getLogger("fincompress")

StageFn = Callable[[Params], dict[str, Any]]
EX_TEMPFAIL = 75  # sysexits.h: a temporary failure, worth retrying
LOG_DIR = ".cache/logs"  # tracebacks of unexpected errors (the terminal gets one line)


def is_main_process() -> bool:
    """False on the non-zero ranks of a torchrun / accelerate launch: only rank 0 writes and tracks."""
    return int(os.environ.get("RANK", "0")) == 0


class ConsoleFilter(logging.Filter):
    """What the terminal shows of a log record: never a traceback, and of a library's record only its
    first line (MLflow logs whole SQL statements). Everything goes to the log file in full."""

    def __init__(self, log_file: Path | None) -> None:
        super().__init__()
        self.where = f" (details in {log_file})" if log_file else ""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name.split(".")[0] in ("pipeline", "stages", "scripts", "fincompress")
        if record.exc_info or record.stack_info or (not ours and "\n" in record.getMessage()):
            first = record.getMessage().strip().split("\n", 1)[0]
            record.msg, record.args = f"{first}{self.where}", ()
            record.exc_info = record.exc_text = record.stack_info = None
        return True


def setup_logging(log_file: Path | None = None) -> None:
    """Log to the terminal (one line per record, no tracebacks) and, with `log_file`, everything in full
    (tracebacks included) to that file. Libraries that print through handlers of their own (MLflow)
    log through these instead."""
    from rich.logging import RichHandler

    # Before mlflow is imported: it would otherwise attach its own stderr handler to its loggers.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    handlers: list[logging.Handler] = []
    if log_file is not None:  # first: it takes each record in full before the console filter shortens it
        log_file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file, encoding="utf-8", delay=True)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(to_file)
    console = RichHandler(show_path=False)
    console.addFilter(ConsoleFilter(log_file))
    handlers.append(console)
    logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="[%X]", handlers=handlers, force=True)
    for noisy in ("alembic", "mlflow", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def report_error(message: str) -> None:
    """Print `message` on stderr on a line of its own: close any progress bar still open (a failing
    Trainer leaves its bar mid-line) and start a new line if one was."""
    try:
        from tqdm import tqdm

        bars = list(tqdm._instances)  # the bars not closed yet
    except (ImportError, AttributeError):
        bars = []
    for bar in bars:
        bar.close()
    sys.stderr.flush()
    print(("\n" if bars else "") + message, file=sys.stderr, flush=True)


def one_line(text: str) -> str:
    """A message (or an exception's text) on one line."""
    return " ".join(str(text).split())


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

    def main(self) -> NoReturn:
        """The command line: `python -m stages.<name> [--params FILE] [key=value ...]`. Ends the process:
        status 0, 1 (an error), 75 (a transient one, worth retrying) or 130 (interrupted)."""
        parser = argparse.ArgumentParser(prog=f"python -m stages.{self.name}", description=self.run.__doc__)
        parser.add_argument("--params", default=DEFAULT_PARAMS_FILE, help="params file (default: params.yaml)")
        parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. teacher.epochs=1")
        args = parser.parse_args()
        log_file = log_file_for(self.name, Path(args.params).resolve().parent / LOG_DIR)
        setup_logging(log_file)
        status = 0
        try:
            params = load_params(args.params, args.overrides)
            check_output_paths(params)
            # One run of a stage per set of outputs, also outside DVC's lock (only rank 0 writes under torchrun).
            lock = stage_lock(params, self.name, self.outputs) if is_main_process() else contextlib.nullcontext()
            with lock:
                self.execute(params)
        except TransientError as error:
            # Not "error: <stage>:": orchestrators retry this one (the inputs are not at fault).
            report_error(f"transient error: {self.name}: {one_line(error)}")
            status = EX_TEMPFAIL
        except FinCompressError as error:
            report_error(f"error: {self.name}: {one_line(error)}")
            status = 1
        except KeyboardInterrupt:
            report_error(f"error: {self.name}: interrupted; previous outputs are untouched")
            status = 130
        except Exception as error:  # a bug or the environment: a message here, the traceback in the log
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                where = f" writing {error.filename}" if error.filename else ""
                report_error(f"error: {self.name}: no space left on the device{where}: free some disk space (or "
                             "raise your quota), then run again; previous outputs are untouched")
            else:
                report_error(f"error: {unexpected_error_message(self.name, error, log_file)}")
            status = 1
        exit_process(status)
