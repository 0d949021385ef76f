"""The README and docs/ name only things that exist: files and directories of the repository, targets
of the Makefile; the README stays a short guide; no doc names a path of a developer's machine.

What counts as a repository path, in README.md and every docs/**/*.md:

- the target of a relative Markdown link `[text](target)` (not a URL, not `#anchor`), resolved
  against the document's folder;
- a word of inline code or of a fenced code block, resolved against the repository root, when it
  contains a '/' and either starts with a top-level entry of the repository (`scripts/x.py`,
  `data/demo/`) or ends in a known file extension; or when it has no '/' and ends in a source
  extension (`params.yaml`, `dvc_deps.py`);
- a module of the repository's packages in code (`python -m scripts.search`, `stages.prepare_data`,
  `pipeline.evaluation.record.evaluate_and_record`): the .py file or package folder it walks down to,
  the rest being attributes.

Left out: URLs and absolute paths, words with a placeholder or pattern character (`<split>.npy`,
`{fp32,int8}`, `*`, `$PWD/...`, `...`), key=value overrides (`data.path=data/my.csv`: a value for
you to choose), bare names of data and output files (`config.json`, `comparison.md`: ambiguous), and
outputs a run creates: paths under a `paths:` entry of params.yaml (`models/teacher`,
`reports/metrics`, `data/prepared`, ...) or under the top folder of one that git tracks nothing in
(`models/`, `.cache/`).

A `make <target>` in inline code or a code block must name targets of the Makefile (words with '='
are variables, words from '#' on are comments).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300
KNOWN_EXTENSIONS = (".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".csv", ".json", ".jsonl", ".sh", ".png", ".lock", ".cfg")
SOURCE_EXTENSIONS = (".py", ".yaml", ".yml", ".toml", ".sh")  # bare names checked at the root
PLACEHOLDER = re.compile(r"[<>{}*$\[\]?=@~…|]|\.\.\.")
PATH_CHARS = re.compile(r"^[\w./+-]+$")
FENCE = re.compile(r"^\s*```[^\n]*\n(.*?)^\s*```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
MODULE = re.compile(r"^(?:pipeline|stages|scripts|tests)(?:\.\w+)+$")
MAKE = re.compile(r"\bmake\s+([^\n#;&|)`]*)")


def docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def code_texts(text: str) -> list[str]:
    """Fenced code blocks and inline code spans of a Markdown text."""
    blocks = FENCE.findall(text)
    prose = FENCE.sub("", text)
    return blocks + INLINE.findall(prose)


def output_prefixes() -> tuple[str, ...]:
    """Where runs write: params.yaml's `paths:` values, and the top folders of those under which git
    tracks nothing (`models`, `.cache`)."""
    paths = yaml.safe_load((ROOT / "params.yaml").read_text())["paths"].values()
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    tracked_tops = {name.split("/")[0] for name in tracked}
    prefixes = {p.rstrip("/") for p in paths}
    prefixes |= {p.split("/")[0] for p in paths if "/" in p and p.split("/")[0] not in tracked_tops}
    return tuple(sorted(prefixes))


def is_output(path: str, prefixes: tuple[str, ...]) -> bool:
    path = path.removeprefix("./").rstrip("/")
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def module_path(dotted: str) -> str:
    """The file or folder a dotted module name walks down to (`pipeline.export.onnx.create_session`:
    pipeline/export/onnx.py), or the first step that does not exist."""
    parts = dotted.split(".")
    path = parts[0]
    for part in parts[1:]:
        if (ROOT / path / part).is_dir():
            path = f"{path}/{part}"
        else:
            return f"{path}/{part}.py"
    return path + "/"


def code_path_words(code: str) -> list[str]:
    """The words of a code text that name repository paths (the rule of the module docstring)."""
    top_level = {entry.name for entry in ROOT.iterdir()}
    found = []
    for word in code.split():
        word = word.strip("'\"(),;:")
        if MODULE.match(word):
            found.append(module_path(word))
            continue
        if not word or "://" in word or word.startswith(("/", "-")) or PLACEHOLDER.search(word):
            continue
        if not PATH_CHARS.match(word) or not re.search(r"[A-Za-z]", word):
            continue
        if "/" in word:
            if word.removeprefix("./").split("/")[0] in top_level or word.rstrip("/").endswith(KNOWN_EXTENSIONS):
                found.append(word)
        elif word.endswith(SOURCE_EXTENSIONS):
            found.append(word)
    return found


def named_paths(doc: Path) -> list[tuple[str, Path]]:
    """(as written, resolved) for every repository path the document names."""
    text = doc.read_text(encoding="utf-8")
    named = []
    for target in LINK.findall(FENCE.sub("", text)):
        target = target.split("#")[0]
        if target and "://" not in target and not target.startswith(("mailto:", "/")):
            named.append((target, (doc.parent / target).resolve()))
    for code in code_texts(text):
        named += [(word, ROOT / word) for word in code_path_words(code)]
    return named


def makefile_targets() -> set[str]:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\- ]+?)\s*:(?!=)", line)
        if match and not line.startswith("\t"):
            targets |= set(match.group(1).split())
    return targets


def named_make_targets(doc: Path) -> list[str]:
    targets = []
    for code in code_texts(doc.read_text(encoding="utf-8")):
        for args in MAKE.findall(code):
            for word in args.split():
                if "=" in word or word.startswith("-"):
                    continue
                if not re.fullmatch(r"[a-z][\w-]*", word):
                    break
                targets.append(word)
    return targets


def missing_paths(doc: Path, prefixes: tuple[str, ...]) -> list[str]:
    missing = []
    for written, resolved in named_paths(doc):
        inside = resolved == ROOT or ROOT in resolved.parents
        relative = resolved.relative_to(ROOT).as_posix() if inside else written
        if inside and is_output(relative, prefixes):
            continue
        if not resolved.exists():
            missing.append(written)
    return missing


@pytest.mark.parametrize("doc", docs(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_named_path_and_make_target_exists(doc):
    prefixes = output_prefixes()
    assert missing_paths(doc, prefixes) == [], f"{doc.relative_to(ROOT)} names paths that do not exist"
    unknown = sorted(set(named_make_targets(doc)) - makefile_targets())
    assert unknown == [], f"{doc.relative_to(ROOT)} names make targets the Makefile lacks"


@pytest.mark.parametrize("doc", docs(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_path_of_a_developers_machine(doc):
    text = doc.read_text(encoding="utf-8")
    assert [m for m in ("/work/", "/tmp/") if m in text] == []


def test_readme_is_a_short_guide():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES
    assert "## Results" in lines


def test_the_checks_catch_a_made_up_path_and_target(tmp_path):
    doc = tmp_path / "made_up.md"
    doc.write_text(
        "See [the guide](docs/no_such_guide.md), run `python scripts/no_such_script.py` and\n"
        "```bash\nmake no-such-target\npython -m stages.prepare_data  # reads data/no_such_dir/\npython -m scripts.no_such\n```\n"
        "Fine: `models/teacher/config.json`, `reports/metrics/<stage>.json`, `-S data.path=data/mine.csv`.\n"
    )
    missing = missing_paths(doc, output_prefixes())
    assert sorted(missing) == ["data/no_such_dir/", "docs/no_such_guide.md", "scripts/no_such.py", "scripts/no_such_script.py"]
    assert set(named_make_targets(doc)) - makefile_targets() == {"no-such-target"}
