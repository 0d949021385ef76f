"""The layering holds: the library never imports the stages, scripts never import the tests, and
test modules share helpers through tests/helpers.py (or scripts/tiny_project.py), never through
each other or conftest.py."""

from __future__ import annotations

import ast

from scripts.tiny_project import REPO


def imports(folder: str) -> list[tuple[str, str]]:
    """(file, imported module) for every import statement in `folder`, at any depth of the code."""
    found = []
    for path in sorted((REPO / folder).rglob("*.py")):
        name = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found += [(name, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.append((name, node.module))
    return found


def test_pipeline_never_imports_stages():
    assert [(f, m) for f, m in imports("pipeline") if m.split(".")[0] == "stages"] == []


def test_scripts_never_import_tests():
    assert [(f, m) for f, m in imports("scripts") if m.split(".")[0] == "tests"] == []


def test_test_modules_never_import_each_other_or_conftest():
    allowed = {"tests.helpers"}
    assert [
        (f, m) for f, m in imports("tests")
        if (m.split(".")[0] == "tests" and m not in allowed) or m.split(".")[-1].startswith(("test_", "conftest"))
    ] == []


def test_subpackages_of_pipeline_hold_only_a_docstring():
    """Importing `pipeline.data.labels` must stay light (ONNX serving never imports torch): a package
    __init__ imports nothing. pipeline/config/__init__.py is the exception: it assembles Params."""
    for path in sorted((REPO / "pipeline").rglob("__init__.py")):
        if path.parent.name == "config":
            continue
        body = ast.parse(path.read_text(), filename=str(path)).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), path


def test_what_the_teacher_trains_with_never_imports_student_only_code():
    """pipeline/training/ (the teacher's trainer and loss) must not import pipeline/kd/, or a change to
    student KD code would re-train the teacher under DVC."""
    assert [(f, m) for f, m in imports("pipeline/training") if m.startswith("pipeline.kd")] == []
