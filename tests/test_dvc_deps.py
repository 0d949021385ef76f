"""dvc.yaml's code dependencies are exactly the modules each stage imports (scripts/dvc_deps.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scripts.dvc_deps import (
    REPO,
    DepsError,
    derived_deps,
    differences,
    import_closure,
    rewrite,
    section_modules,
    stage_params,
)


def test_dvc_yaml_lists_exactly_what_each_stage_imports():
    """A stage whose deps miss a module it imports keeps a stale model after that module changes
    (train_teacher once missed the KD loss module); one listing a module it does not import re-runs
    for nothing. Fix with `make deps`."""
    assert differences(REPO, (REPO / "dvc.yaml").read_text()) == {}


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


DVC_YAML = """\
# a comment that stays
stages:
  train:
    cmd: python -m stages.train
    deps:
      - stages/train.py
      - pipeline/model.py  # a comment that stays with its line
      - pipeline/unused.py   # listed but never imported
      - data/input.csv
    params:
      - train
plots:
  - curve:
      x: step
"""


def synthetic_project(root: Path) -> Path:
    """A stage importing pipeline modules at module level, inside a function, through a module, with
    every import form; plus an unused module and modules reached only through the excluded runner."""
    return write(root, {
        "pipeline/__init__.py": '"""docstring"""\n',
        "pipeline/model.py": "from pipeline.loss import kl\n",
        "pipeline/loss.py": "def kl():\n    import pipeline.mathutil\n    from . import io\n",
        "pipeline/mathutil.py": "import torch\n",
        "pipeline/io.py": "",
        "pipeline/labels.py": "",
        "pipeline/unused.py": "",
        "pipeline/stage.py": "from pipeline import logging_only\n",
        "pipeline/logging_only.py": "",
        "stages/__init__.py": "",
        "stages/train.py": (
            "from typing import TYPE_CHECKING\n"
            "from pipeline import model\n"
            "from pipeline.stage import main\n"
            "if TYPE_CHECKING:\n    from pipeline import unused\n"
            "def run():\n    from pipeline.labels import encode\n"
        ),
        "dvc.yaml": DVC_YAML,
    })


def test_closure_follows_every_import_form_and_skips_the_runner(tmp_path):
    root = synthetic_project(tmp_path)
    assert import_closure(root, "stages/train.py") == {
        "stages/train.py", "pipeline/model.py", "pipeline/loss.py", "pipeline/mathutil.py",
        "pipeline/io.py", "pipeline/labels.py",
    }


def test_check_reports_missing_and_extra_modules_then_the_fix_clears_them(tmp_path):
    root = synthetic_project(tmp_path)
    missing = ["pipeline/io.py", "pipeline/labels.py", "pipeline/loss.py", "pipeline/mathutil.py"]
    assert differences(root, DVC_YAML) == {"train": (missing, ["pipeline/unused.py"])}

    script = [sys.executable, str(REPO / "scripts" / "dvc_deps.py"), "--root", str(root)]
    check = subprocess.run([*script, "--check"], capture_output=True, text=True)
    assert check.returncode == 1
    assert f"train: missing {missing}, extra ['pipeline/unused.py']" in check.stdout

    subprocess.run(script, check=True, capture_output=True)
    fixed = (root / "dvc.yaml").read_text()
    assert fixed == DVC_YAML.replace(
        "      - pipeline/model.py  # a comment that stays with its line\n"
        "      - pipeline/unused.py   # listed but never imported\n",
        "".join(f"      - {m}\n" for m in missing) + "      - pipeline/model.py  # a comment that stays with its line\n",
    )
    assert subprocess.run([*script, "--check"], capture_output=True).returncode == 0


def test_a_stage_without_code_deps_gets_them_at_the_top_of_its_deps(tmp_path):
    root = synthetic_project(tmp_path)
    text = "".join(line for line in DVC_YAML.splitlines(keepends=True) if "- stages/" not in line
                   and "- pipeline/" not in line)
    fixed = rewrite(text, derived_deps(root, text))
    assert fixed.splitlines()[4:7] == ["    deps:", "      - stages/train.py", "      - pipeline/io.py"]
    assert fixed.count("      - data/input.csv\n") == 1 and differences(root, fixed) == {}


def test_each_params_section_maps_to_the_module_defining_its_schema():
    """The static reading of pipeline/config/__init__.py agrees with the classes Params really uses."""
    from pipeline.config import Params

    expected = {
        name: field.annotation.__module__.replace(".", "/") + ".py"
        for name, field in Params.model_fields.items() if field.annotation.__module__.startswith("pipeline.")
    }
    assert section_modules(REPO) == expected
    assert stage_params((REPO / "dvc.yaml").read_text())["train_teacher"] == ["teacher", "task", "evaluation"]


def test_the_teachers_stages_depend_on_no_student_or_compression_code():
    """Issue 26: a change to student-only KD code (or to a student's params schema) must not re-train
    or re-verify the teacher; the students do depend on it."""
    deps = derived_deps(REPO, (REPO / "dvc.yaml").read_text())
    student_only = ("pipeline/kd/", "pipeline/compression/", "pipeline/export/", "pipeline/orchestration/",
                    "pipeline/config/students.py", "pipeline/config/compression.py", "pipeline/config/__init__.py")
    for stage in ("prepare_data", "train_teacher", "verify_teacher"):
        assert [m for m in deps[stage] if m.startswith(student_only)] == [], stage
    assert {"pipeline/config/teacher.py", "pipeline/config/data.py", "pipeline/config/evaluation.py",
            "pipeline/config/base.py", "pipeline/training/trainer.py", "pipeline/training/loss.py"} <= set(deps["train_teacher"])
    for stage in ("student_baseline", "distill_vanilla", "distill_intermediate", "prune"):
        assert {"pipeline/kd/terms.py", "pipeline/config/students.py"} <= set(deps[stage]), stage


def test_schema_deps_follow_the_params_sections_not_the_aggregator(tmp_path):
    """A stage depends on the schema module of each section its params list names (and what that
    imports), never on the aggregator pipeline/config/__init__.py nor on docstring-only packages."""
    root = write(synthetic_project(tmp_path), {
        "pipeline/config/__init__.py": (
            '"""Assembles the sections."""\n'
            "from pathlib import Path\n"
            "from pipeline.config.base import Section\n"
            "from pipeline.config.train import TrainConfig\n"
            "from pipeline.config.serve import ServeConfig\n"
            "class Params(Section):\n"
            "    train: TrainConfig = TrainConfig()\n"
            "    serve: ServeConfig = ServeConfig()\n"
            "    root: Path = Path()\n"
        ),
        "pipeline/config/base.py": "class Section: pass\n",
        "pipeline/config/train.py": "from pipeline.config.base import Section\nclass TrainConfig(Section): pass\n",
        "pipeline/config/serve.py": "from pipeline.config.base import Section\nclass ServeConfig(Section): pass\n",
        "pipeline/nn/__init__.py": '"""A package of docstring only."""\n',
        "pipeline/nn/layers.py": "",
        "stages/train.py": "from pipeline.config import Params\nfrom pipeline.nn import layers\n",
    })
    text = DVC_YAML.replace("      - train\n", "      - train.epochs\n      - train.seed\n")
    assert section_modules(root) == {"train": "pipeline/config/train.py", "serve": "pipeline/config/serve.py"}
    assert derived_deps(root, text)["train"] == [
        "stages/train.py", "pipeline/config/base.py", "pipeline/config/train.py", "pipeline/nn/layers.py",
    ]
    unknown = text.replace("      - train.seed\n", "      - nosuch.key\n")
    with pytest.raises(DepsError, match=r"reads params \['nosuch'\], which are not sections of Params"):
        derived_deps(root, unknown)
