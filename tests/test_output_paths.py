"""A wrong output path never deletes anything: paths.* are checked before any work, only directories
this pipeline wrote are replaced, and two writers of one output are kept apart (issue 18, part 1).

The cases are rows of the bad-input matrix in tests/README.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import params_from_dict
from pipeline.errors import OutputError
from pipeline.io import OUTPUT_MARKER, atomic_dir, check_output_paths, exclusive_lock, stage_lock
from scripts.tiny_project import REPO, sh, tiny_params_tree, write_project


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root but Python's bytecode caches (written wherever a stage imports from)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture
def project(tmp_path, tiny_bert) -> Path:
    root = write_project(tmp_path / "project", tiny_params_tree(tiny_bert))
    (root / "data" / "notes.txt").write_text("a user's file beside the input")
    return root


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("paths.prepared=.", r"paths\.prepared=\. is the project directory itself; point it at a subdirectory"),
        ("paths.prepared=data", r"paths\.prepared=data contains data\.path \(.*tiny\.csv\); writing it would delete"),
        ("paths.prepared=stages", r"stages exists but was not written by this pipeline \(no \.fincompress-output"),
    ],
    ids=["project root", "input directory", "code directory"],
)
def test_an_output_path_over_the_project_deletes_nothing(project, override, message):
    before = snapshot(project)
    result = sh([sys.executable, "-m", "stages.prepare_data", override], project, check=False)
    assert result.returncode == 1, result.stderr
    assert "error: prepare_data: " in result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.stderr
    after = snapshot(project)
    assert {k: v for k, v in after.items() if not k.startswith(".cache")} == before


@pytest.mark.parametrize(
    ("paths", "message"),
    [
        ({"teacher": "/tmp/elsewhere/teacher"}, r"paths\.teacher=/tmp/elsewhere/teacher resolves to .*, outside the project"),
        ({"teacher": "data/prepared/teacher"}, r"paths\.prepared=data/prepared and paths\.teacher=data/prepared/teacher overlap"),
        ({"metrics": "models/teacher/metrics"}, r"paths\.teacher=models/teacher and paths\.metrics=models/teacher/metrics overlap"),
        ({"checkpoints": "models"}, r"paths\.teacher=models/teacher and paths\.checkpoints=models overlap"),
        ({"prepared": "data/prepared", "teacher": "data/prepared"}, r"paths\.prepared=data/prepared and paths\.teacher=data/prepared overlap"),
        ({"reports": ".."}, r"paths\.reports=\.\. resolves to .*, outside the project"),
    ],
    ids=["outside the project", "inside another output", "holds a metrics file", "checkpoints over models",
         "two outputs one directory", "parent of the project"],
)
def test_overlapping_or_outside_output_paths_are_refused(tmp_path, paths, message):
    params = params_from_dict({"data": {"source": "csv", "path": "data/x.csv"}, "paths": paths}, root=tmp_path)
    with pytest.raises(OutputError, match=message):
        check_output_paths(params)


def test_the_default_paths_pass(tmp_path):
    check_output_paths(params_from_dict({}, root=tmp_path))


def test_only_a_directory_this_pipeline_wrote_is_replaced(tmp_path):
    users = tmp_path / "mine"
    users.mkdir()
    (users / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match=r"mine exists but was not written by this pipeline"):
        with atomic_dir(users) as tmp:
            (tmp / "weights").write_text("new")
    assert (users / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"], "nothing left behind"

    a_file = tmp_path / "model"
    a_file.write_text("a file, not a directory")
    with pytest.raises(OutputError, match=r"model exists and is not a directory this pipeline wrote"):
        with atomic_dir(a_file):
            pass
    link = tmp_path / "link"
    link.symlink_to(users)
    with pytest.raises(OutputError, match=r"link exists and is not a directory this pipeline wrote"):
        with atomic_dir(link):
            pass
    assert (users / "thesis.tex").exists() and a_file.read_text() == "a file, not a directory"

    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty) as tmp:
        (tmp / "weights").write_text("new")
    assert sorted(p.name for p in empty.iterdir()) == [OUTPUT_MARKER, "weights"]
    with atomic_dir(empty) as tmp:  # marked now: replaced again
        (tmp / "weights").write_text("newer")
    assert (empty / "weights").read_text() == "newer"


def test_a_live_writers_temporary_directory_is_kept(tmp_path):
    target = tmp_path / "model"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = tmp_path / f".model.tmp-{live.pid}-abcd"
        theirs.mkdir()
        (theirs / "weights").write_text("being written")
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("ours")
        assert (theirs / "weights").read_text() == "being written"
    finally:
        live.kill()
        live.wait()
    with atomic_dir(target):  # its owner is gone now: cleaned up
        pass
    assert not theirs.exists()


def test_a_second_writer_of_one_output_is_refused(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("first")
        with pytest.raises(OutputError, match=rf"another run is writing .*model \(pid {os.getpid()}\)"):
            with atomic_dir(target):
                pass
        assert tmp.is_dir(), "the refused writer must not clean up the live one"
    assert (target / "weights").read_text() == "first"
    assert not (tmp_path / ".model.lock").exists(), "the lock file goes with its holder"


def test_two_direct_runs_of_a_stage_do_not_overlap(project):
    params = params_from_dict(tiny_params_tree(Path("unused")), root=project)
    with stage_lock(params, "prepare_data"):
        result = sh([sys.executable, "-m", "stages.prepare_data"], project, check=False)
    assert result.returncode == 1
    assert ("another run is writing the outputs of stage prepare_data at paths.metrics=reports/metrics "
            f"(pid {os.getpid()})") in result.stderr
    assert not (project / "data" / "prepared").exists()


def test_runs_of_a_stage_go_side_by_side_only_when_their_outputs_differ(tmp_path):
    """A seed sweep runs one stage twice at once with other output paths; two runs that would write
    the same output (here the training scratch directory) are still refused before any work."""
    from stages.distill_intermediate import STAGE

    tree = tiny_params_tree(Path("unused"))
    params = params_from_dict(tree, root=tmp_path)
    seed_1 = {"student_intermediate": "models/s1", "curves": "reports/s1/curves", "metrics": "reports/s1/metrics",
              "checkpoints": ".cache/s1"}
    other = params_from_dict({**tree, "paths": {**tree["paths"], **seed_1}}, root=tmp_path)
    same_scratch = params_from_dict({**tree, "paths": {**tree["paths"], **seed_1, "checkpoints": ".cache/checkpoints"}},
                                    root=tmp_path)
    with stage_lock(params, STAGE.name, STAGE.outputs):
        with stage_lock(other, STAGE.name, STAGE.outputs):
            pass
        with pytest.raises(OutputError, match=r"another run is writing the outputs of stage distill_intermediate "
                                              r"at paths.checkpoints=.cache/checkpoints"):
            with stage_lock(same_scratch, STAGE.name, STAGE.outputs):
                pass
        with stage_lock(params, "distill_vanilla", STAGE.outputs):  # another stage: its own locks
            pass
    with stage_lock(same_scratch, STAGE.name, STAGE.outputs):  # free again once the first run is done
        pass


def test_every_stage_locks_the_outputs_dvc_yaml_gives_it():
    """Stage.outputs (what a direct run locks) covers every paths.* entry under the stage's outs and
    metrics in dvc.yaml; training stages also lock their scratch checkpoints."""
    import importlib

    for name, spec in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        stage = importlib.import_module(f"stages.{name}").STAGE
        written = {match for item in spec.get("outs", []) + spec.get("metrics", [])
                   for match in re.findall(r"\$\{paths\.(\w+)\}", str(item))}
        assert written <= {"metrics", *stage.outputs}, name
        assert ("checkpoints" in stage.outputs) == ("curves" in written), name


def test_a_lock_is_free_again_after_its_holder_is_killed(tmp_path):
    lock = tmp_path / "x.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pipeline.io import exclusive_lock\n"
         f"with exclusive_lock({str(lock)!r}, 'x'):\n print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=rf"another run is writing x \(pid {holder.pid}\)"):
            with exclusive_lock(lock, "x"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(lock, "x"):  # the kernel released the dead holder's lock
        pass
