"""Derive each DVC stage's code dependencies from its imports and params, so dvc.yaml cannot go stale.

For every stage in dvc.yaml, the stage module is stages/<stage>.py; its code dependencies are that
module plus every module of `pipeline/` (or `stages/`) it imports, directly or through other modules,
at module level or inside functions, plus the params schema module of every params section the stage
lists under `params:` (and what those import). The `- stages/...py` and `- pipeline/...py` lines of
each stage's `deps:` are rewritten from that set (the stage module first, the rest sorted); every other
line of dvc.yaml, comments included, is left as it is.

Why the schema goes by section: pipeline/config/__init__.py only assembles the section classes into
`Params` and loads params files, and every stage imports it, so as a dependency it would tie every
stage to every section's schema (editing a student KD section would re-train the teacher). It is left
out, like the modules that only log and report (NOT_DEPS), and each stage depends instead on the
schema modules of the sections it reads (e.g. train_teacher reads `teacher`, `task`, `evaluation`:
config/teacher.py, config/data.py, config/evaluation.py, and config/base.py they import). Param values
need no code dependency: DVC tracks them through each stage's `params:` list. A package __init__.py
holding only a docstring runs no code, so it is not a dependency either.

    python scripts/dvc_deps.py            rewrite dvc.yaml in place (`make deps`)
    python scripts/dvc_deps.py --check    exit 1 listing, per stage, the missing and the extra modules
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# Packages whose modules count as code dependencies; imports of anything else (torch, ...) are ignored.
FIRST_PARTY = ("pipeline", "stages")
# The params schema's aggregator: it assembles the section classes into `Params` (whose fields name
# the section modules) and loads params files. Not a dependency: see the module docstring.
SCHEMA = "pipeline/config/__init__.py"
# Modules that are imported but are not dependencies, and whose own imports are not followed. The
# runner, MLflow tracking and error classes only log and report, and the process lifetime helper only
# ties a stage to its parent: editing them must not invalidate trained models (see the comment at the
# top of dvc.yaml); the schema aggregator, above.
NOT_DEPS = frozenset({
    "pipeline/errors.py",
    "pipeline/processes.py",
    "pipeline/stage.py",
    "pipeline/tracking.py",
    SCHEMA,
})
# A code-dependency line of dvc.yaml, with an optional trailing comment (kept when the line stays).
CODE_DEP = re.compile(r"^(?P<indent>\s*)- (?P<path>(?:stages|pipeline)/\S+\.py)(?P<comment>\s+#.*)?\s*$")


class DepsError(Exception):
    """dvc.yaml or a stage module is not laid out as this tool expects."""


def module_file(root: Path, name: str) -> str | None:
    """`pipeline.data.sources` -> "pipeline/data/sources.py" (or its package's __init__.py); None if not a project module."""
    parts = name.split(".")
    if parts[0] not in FIRST_PARTY:
        return None
    for candidate in (Path(*parts).with_suffix(".py"), Path(*parts, "__init__.py")):
        if (root / candidate).is_file():
            return candidate.as_posix()
    return None


def _imported_names(path: Path, name: str) -> list[str]:
    """Dotted names of every module `path` imports, wherever the import statement is, except under
    `if TYPE_CHECKING:` (never executed). `from a import b` yields both `a` and `a.b` (b may be a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + (node.module.split(".") if node.module else []))
            found.append(module)
            found.extend(f"{module}.{alias.name}" for alias in node.names if alias.name != "*")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _with_parents(name: str) -> list[str]:
    """Importing `a.b.c` runs a/__init__.py, a/b/__init__.py and a/b/c.py."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def only_docstring(path: Path) -> bool:
    """True for a module whose whole code is its docstring (a package __init__.py that runs nothing)."""
    body = ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def import_closure(root: Path, *starts: str) -> set[str]:
    """Every project module (as a path relative to `root`) that running the `starts` imports, the
    `starts` included, minus NOT_DEPS (whose imports are not followed either) and docstring-only
    package __init__ files."""
    seen: set[str] = set()
    todo = list(starts)
    while todo:
        relative = todo.pop()
        if relative in seen or relative in NOT_DEPS:
            continue
        if relative.endswith("/__init__.py") and only_docstring(root / relative):
            continue
        seen.add(relative)
        name = relative.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for imported in _imported_names(root / relative, name):
            for module in _with_parents(imported):
                file = module_file(root, module)
                if file is not None:
                    todo.append(file)
    return seen


def section_modules(root: Path) -> dict[str, str]:
    """Params section -> the module defining its schema class, read from the fields of `Params` in
    SCHEMA (`teacher: TeacherConfig = ...`) and the module SCHEMA imports that class from. Empty when
    the project has no SCHEMA."""
    path = root / SCHEMA
    if not path.is_file():
        return {}
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    imported = {
        alias.asname or alias.name: node.module
        for node in tree.body if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
    }
    params = next((node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Params"), None)
    if params is None:
        raise DepsError(f"{SCHEMA} defines no class Params")
    found = {}
    for field in params.body:
        if not (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)):
            continue
        annotation = ast.unparse(field.annotation)
        if imported.get(annotation, "").split(".")[0] not in FIRST_PARTY:
            continue  # not a section class (e.g. root: Path)
        file = module_file(root, imported[annotation])
        if file is None:
            raise DepsError(f"{SCHEMA}: the class of params section {field.target.id!r}, {annotation}, is not "
                            f"imported from a project module; define each section in a pipeline/config/ module")
        found[field.target.id] = file
    return found


def stage_params(dvc_yaml: str) -> dict[str, list[str]]:
    """Stage -> the params sections its `params:` list names (`task.type` -> `task`), in order."""
    stages = (yaml.safe_load(dvc_yaml) or {}).get("stages") or {}
    found: dict[str, list[str]] = {}
    for stage, spec in stages.items():
        keys: list[str] = []
        for item in (spec or {}).get("params") or []:
            keys += [item] if isinstance(item, str) else [key for listed in item.values() for key in listed or []]
        found[stage] = list(dict.fromkeys(key.split(".")[0] for key in keys))
    return found


def stage_code_deps(root: Path, stage: str, sections: list[str] = (), schemas: dict[str, str] | None = None) -> list[str]:
    """The code dependencies of one stage: its module first, then the modules it imports and the
    schema modules of the params `sections` it reads (with their imports), sorted."""
    start = f"stages/{stage}.py"
    if not (root / start).is_file():
        raise DepsError(f"stage {stage!r} of dvc.yaml has no module {start}; stage modules are stages/<stage>.py")
    schemas = section_modules(root) if schemas is None else schemas
    unknown = [section for section in sections if schemas and section not in schemas]
    if unknown:
        raise DepsError(f"stage {stage!r} of dvc.yaml reads params {unknown}, which are not sections of Params ({SCHEMA})")
    modules = [schemas[section] for section in sections if section in schemas]
    return [start] + sorted(import_closure(root, start, *modules) - {start})


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_content(line: str) -> bool:
    return bool(line.strip()) and not line.lstrip().startswith("#")


def _stages(lines: list[str]) -> dict[str, tuple[int, int] | None]:
    """Every stage of dvc.yaml, in order -> (first, end) line indices of its `deps:` items, or None."""
    stages: dict[str, tuple[int, int] | None] = {}
    in_stages, stage_indent, stage = False, None, None
    for i, line in enumerate(lines):
        if not _is_content(line):
            continue
        indent = _indent(line)
        if indent == 0:
            in_stages, stage_indent = line.rstrip() == "stages:", None
        elif in_stages and (stage_indent is None or indent <= stage_indent):
            stage_indent, stage = indent, line.strip().rstrip(":")
            stages[stage] = None
        elif in_stages and line.strip() == "deps:":
            end = i + 1
            for j in range(i + 1, len(lines)):
                if not _is_content(lines[j]):
                    continue
                if _indent(lines[j]) < indent or (_indent(lines[j]) == indent and not lines[j].lstrip().startswith("- ")):
                    break
                end = j + 1
            stages[stage] = (i + 1, end)
    return stages


def derived_deps(root: Path, dvc_yaml: str) -> dict[str, list[str]]:
    """The code dependencies each stage of dvc.yaml should list."""
    schemas, sections = section_modules(root), stage_params(dvc_yaml)
    return {
        stage: stage_code_deps(root, stage, sections.get(stage, []), schemas) for stage in _stages(dvc_yaml.splitlines())
    }


def listed_deps(dvc_yaml: str) -> dict[str, list[str]]:
    """The code dependencies dvc.yaml lists now, per stage."""
    lines = dvc_yaml.splitlines()
    return {
        stage: [match["path"] for i in range(*(block or (0, 0))) if (match := CODE_DEP.match(lines[i]))]
        for stage, block in _stages(lines).items()
    }


def rewrite(dvc_yaml: str, wanted: dict[str, list[str]]) -> str:
    """dvc.yaml with each stage's code-dependency lines replaced by `wanted[stage]`, where the first
    of them was (or at the top of its deps list); every other line stays as it is."""
    lines = dvc_yaml.splitlines(keepends=True)
    stages = _stages(lines)
    for stage in reversed(stages):  # bottom up, so the line indices of the stages above stay valid
        if stage not in wanted:
            continue
        if stages[stage] is None:
            raise DepsError(f"stage {stage!r} in dvc.yaml has no `deps:` list; add one (with its data inputs)")
        first, end = stages[stage]
        code = [i for i in range(first, end) if CODE_DEP.match(lines[i])]
        comments = {m["path"]: m["comment"] or "" for i in code if (m := CODE_DEP.match(lines[i]))}
        if code:
            indent = CODE_DEP.match(lines[code[0]])["indent"]
        else:  # a new stage: indent like its other items, or two deeper than `deps:`
            items = [lines[i] for i in range(first, end) if lines[i].lstrip().startswith("- ")]
            indent = " " * (_indent(items[0]) if items else _indent(lines[first - 1]) + 2)
        others = [lines[i] for i in range(first, end) if i not in code]
        at = code[0] - first if code else 0
        new = [f"{indent}- {path}{comments.get(path, '')}\n" for path in wanted[stage]]
        lines[first:end] = others[:at] + new + others[at:]
    return "".join(lines)


def differences(root: Path, dvc_yaml: str) -> dict[str, tuple[list[str], list[str]]]:
    """stage -> (missing from dvc.yaml, listed but not imported), for the stages that differ."""
    listed = listed_deps(dvc_yaml)
    found = {}
    for stage, wanted in derived_deps(root, dvc_yaml).items():
        missing = sorted(set(wanted) - set(listed[stage]))
        extra = sorted(set(listed[stage]) - set(wanted))
        if missing or extra:
            found[stage] = (missing, extra)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report differences; exit 1 if any")
    parser.add_argument("--root", type=Path, default=REPO, help="the project (holding dvc.yaml); default: this repo")
    args = parser.parse_args(argv)
    path = args.root / "dvc.yaml"
    text = path.read_text(encoding="utf-8")
    try:
        if args.check:
            found = differences(args.root, text)
            for stage, (missing, extra) in found.items():
                print(f"{stage}: missing {missing or '[]'}, extra {extra or '[]'}")
            if found:
                print(f"{path}: code deps differ from the stages' imports; run `make deps` to fix them")
            return 1 if found else 0
        new = rewrite(text, derived_deps(args.root, text))
    except DepsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if new != text:
        path.write_text(new, encoding="utf-8")
        print(f"{path}: code deps rewritten from the stages' imports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
