"""Messages a person can read (issue 30 class 5): an error is printed on a line of its own even when a
progress bar is open (the bar is closed first), a full disk says so in one line, a library's traceback
(MLflow's SQLAlchemy error on a read-only database) goes to the stage's log file and never to the
terminal. The cases are rows of the bad-input matrix in tests/README.md."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import mlflow
import pytest

from scripts.tiny_project import sh, tiny_params_tree, write_project


def error_line(stderr: str, prefix: str) -> str:
    """The line holding `prefix`; it must start the line (not be glued to a progress bar's)."""
    (line,) = [line for line in stderr.split("\n") if prefix in line]
    assert line.startswith(prefix), f"not on a line of its own: {line!r}"
    return line


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_bert) -> Path:
    return write_project(tmp_path_factory.mktemp("messages") / "project", tiny_params_tree(tiny_bert))


def run_stage(project: Path, code: str, name: str, env: dict[str, str] | None = None):
    (project / "stages" / f"{name}.py").write_text(textwrap.dedent(code))
    return sh([sys.executable, "-m", f"stages.{name}"], project, check=False, env=env)


@pytest.mark.parametrize(
    ("raised", "prefix", "status"),
    [
        ("DataError('the cached teacher logits are broken')", "error: bar_stage: the cached teacher logits", 1),
        ("TransientError('the tracking server is down')", "transient error: bar_stage: the tracking server", 75),
        ("KeyboardInterrupt()", "error: bar_stage: interrupted", 130),
        ("IndexError('list index out of range')", "error: bar_stage: unexpected IndexError", 1),
        ("OSError(28, 'No space left on device', '/data/models/teacher/model.safetensors')",
         "error: bar_stage: no space left on the device writing /data/models/teacher/model.safetensors", 1),
    ],
    ids=["input error", "transient error", "interrupted", "a bug", "disk full"],
)
def test_an_error_raised_while_a_progress_bar_is_open_starts_its_own_line(project, raised, prefix, status):
    result = run_stage(project, f"""
        from tqdm.auto import tqdm
        from pipeline.errors import DataError, TransientError
        from pipeline.stage import Stage

        def run(params):
            bar = tqdm(total=10, desc="training")
            bar.update(4)  # left open, as a Trainer leaves its bar when a step raises
            raise {raised}

        if __name__ == "__main__":
            Stage("bar_stage", run).main()
    """, "bar_stage")
    assert result.returncode == status, result.stderr
    error_line(result.stderr, prefix)
    assert "Traceback" not in result.stderr + result.stdout


def test_a_full_disk_during_train_teacher_is_one_readable_line(project):
    sh([sys.executable, "-m", "stages.prepare_data"], project)
    # The third training step fails to write, as a checkpoint on a full disk would, with the Trainer's bar open.
    result = run_stage(project, """
        import errno
        from pipeline.training.trainer import DistillationTrainer
        from stages import train_teacher

        step = DistillationTrainer.training_step

        def full_disk(self, *args, **kwargs):
            if self.state.global_step == 2:
                raise OSError(errno.ENOSPC, "No space left on device", "models/teacher/checkpoint-2/model.safetensors")
            return step(self, *args, **kwargs)

        DistillationTrainer.training_step = full_disk
        if __name__ == "__main__":
            train_teacher.STAGE.main()
    """, "full_disk_teacher")
    assert result.returncode == 1, result.stderr
    line = error_line(result.stderr, "error: train_teacher:")
    assert "no space left on the device writing models/teacher/checkpoint-2/model.safetensors: free some disk space" in line
    assert "previous outputs are untouched" in line
    assert "Traceback" not in result.stderr + result.stdout
    assert not (project / "models" / "teacher").exists()


@pytest.mark.parametrize("experiment", [True, False], ids=["experiment exists", "no experiment yet"])
def test_a_read_only_tracking_database_prints_our_message_and_no_traceback(project, tmp_path, experiment):
    database = tmp_path / "mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{database}")
    client.search_experiments()  # the tables exist
    if experiment:
        client.create_experiment("fincompress", artifact_location=(project / "mlartifacts").as_uri())
    read_only = f"sqlite:///file:{database}?mode=ro&uri=true"
    result = sh([sys.executable, "-m", "stages.prepare_data"], project, check=False,
                env={"MLFLOW_TRACKING_URI": read_only})
    assert result.returncode == 75, result.stderr
    line = error_line(result.stderr, "transient error: prepare_data:")
    assert "(OperationalError: attempt to write a readonly database)" in line and "then run again" in line
    terminal = result.stderr + result.stdout
    assert "Traceback" not in terminal and "[SQL:" not in terminal
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    log = sorted((project / ".cache" / "logs").glob("fincompress-prepare_data-*.log"))[-1]
    assert "Traceback" in log.read_text() and "[SQL: INSERT INTO" in log.read_text()


def test_a_library_traceback_goes_to_the_log_file_only(project):
    result = run_stage(project, """
        import logging
        from pipeline.stage import Stage

        def run(params):
            try:
                {}["missing"]
            except KeyError:
                logging.getLogger("some.library").exception("a library failed\\nwith a second line")
            return {}

        if __name__ == "__main__":
            Stage("library_log", run).main()
    """, "library_log")
    assert result.returncode == 0, result.stderr
    terminal = result.stderr + result.stdout
    assert "a library failed" in terminal and "Traceback" not in terminal and "second line" not in terminal
    logs = sorted((project / ".cache" / "logs").glob("fincompress-library_log-*.log"))
    assert "Traceback" in logs[-1].read_text() and "with a second line" in logs[-1].read_text()
