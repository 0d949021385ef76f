"""dvc.yaml's code dependencies are exactly the modules each stage imports (scripts/dvc_deps.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from scripts.dvc_deps import REPO, derived_deps, differences, import_closure, rewrite


def test_dvc_yaml_lists_exactly_what_each_stage_imports():
    """A stage whose deps miss a module it imports keeps a stale model after that module changes
    (train_teacher once missed pipeline/distill.py); one listing a module it does not import re-runs
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
