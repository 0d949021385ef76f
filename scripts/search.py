"""Compress to a goal, from the command line (`make search`): the search of pipeline/orchestration/search/ with the
compression stages wired in.

    python -m scripts.search [--params params.yaml] [--jobs N] [--dask-address tcp://host:8786]
                             [--build-winner] [key=value ...]

First `dvc repro teacher_logits` makes sure the prepared data, the verified teacher and its logits are
current (DVC skips what is), then the trials run the chosen student stage, prune and export_onnx
in-process on trial-private paths, with the test split withheld. `key=value` overrides apply to this
search (e.g. search.budget.trials=2); overrides outside `search` also apply to the upstream stages and
to the winner's `dvc exp run`. `--build-winner` then runs that `dvc exp run --temp` (for the closest
trial when none meets every goal) and reads its test metrics, once, from the experiment.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from pipeline.config import DEFAULT_PARAMS_FILE, Params, load_params, parse_override
from pipeline.errors import FinCompressError, log_file_for
from pipeline.orchestration.search.answer import (
    exp_command,
    read_exp_test_metrics,
    record_test_metrics,
    to_build,
)
from pipeline.orchestration.search.runner import run_search
from pipeline.orchestration.search.space import KD_STAGE
from pipeline.stage import LOG_DIR, one_line, report_error, setup_logging
from stages import distill_intermediate, distill_vanilla, export_onnx, prune, student_baseline

log = logging.getLogger("fincompress")

STUDENT_STAGES = {
    "student_baseline": student_baseline.STAGE,
    "distill_vanilla": distill_vanilla.STAGE,
    "distill_intermediate": distill_intermediate.STAGE,
}


def compress(params: Params, kd_method: str) -> None:
    """One trial's stages, in-process: its student, prune (prune.source is that student), export_onnx.
    `run` rather than `execute`: the trial's MLflow run (a child of the search's) is their run."""
    STUDENT_STAGES[KD_STAGE[kd_method]].run(params)
    prune.STAGE.run(params)
    export_onnx.STAGE.run(params)


def ensure_upstream(root: Path, overrides: list[str]) -> None:
    """`dvc repro teacher_logits` (and what it needs: prepare_data, train_teacher, verify_teacher),
    with the non-search overrides applied to params.yaml for its duration (pipeline.orchestration.flow)."""
    from pipeline.orchestration.flow import applied_overrides, stage_environment

    with applied_overrides(root / "params.yaml", overrides):
        done = subprocess.run([sys.executable, "-m", "dvc", "repro", "teacher_logits"], cwd=root,
                              env=stage_environment({}))
    if done.returncode != 0:
        raise FinCompressError("`dvc repro teacher_logits` failed (its output is above): the search needs the "
                               "prepared data, the verified teacher and its logits")


def build_winner(root: Path, summary: dict, out: Path, extra: list[str], metrics_dir: str) -> None:
    """Rebuild the winner as the family's compressed member (a temporary DVC experiment) and add its test
    figures to the summary: the only time the search's answer meets the test split."""
    winner = to_build(summary)
    command = exp_command(winner["dvc_exp_name"], winner["overrides"], extra, temp=True)
    log.info("building the %s: %s", "winner" if summary["winner"] else "closest trial", " ".join(command))
    done = subprocess.run([sys.executable, "-m", *command], cwd=root)
    if done.returncode != 0:
        raise FinCompressError(f"`{' '.join(command)}` failed (its output is above)")
    record_test_metrics(out, summary, read_exp_test_metrics(root, winner["dvc_exp_name"], winner["member"], metrics_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS_FILE, help="params file (default: params.yaml)")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: search.jobs)")
    parser.add_argument("--dask-address", default=None, help="run the workers on this Dask scheduler instead")
    parser.add_argument("--build-winner", action="store_true", help="dvc exp run the winner (else the closest trial), read its test metrics")
    parser.add_argument("--skip-upstream", action="store_true", help="do not run `dvc repro teacher_logits` first")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. search.budget.trials=2")
    args = parser.parse_args(argv)
    # The search's log in full (a failed trial's traceback included); the terminal gets one line a record.
    setup_logging(log_file_for("search", Path(args.params).resolve().parent / LOG_DIR))
    try:
        params = load_params(args.params, args.overrides)
        if args.jobs is not None and args.jobs < 1:
            raise FinCompressError(f"--jobs must be at least 1, got {args.jobs}")
        extra = [o for o in args.overrides if not parse_override(o)[0].startswith("search.")]
        root = params.root
        if not args.skip_upstream:
            ensure_upstream(root, extra)
        summary = run_search(params, compress, jobs=args.jobs, dask_address=args.dask_address, extra_overrides=extra)
        out = params.path(params.paths.reports) / "search"
        print((out / "summary.md").read_text(encoding="utf-8"))
        if to_build(summary) and args.build_winner:
            build_winner(root, summary, out, extra, params.paths.metrics)
            print((out / "summary.md").read_text(encoding="utf-8"))
    except FinCompressError as error:
        report_error(f"error: search: {one_line(error)}")
        return 1
    except KeyboardInterrupt:
        report_error("error: search: interrupted; finished trials stay in the study, run again to resume")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
