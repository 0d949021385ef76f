"""One module per DVC stage: read params, call `pipeline/`, write outputs and metrics."""

import sys

# Run as `python -m stages.<name>` (what dvc.yaml says): end with the process that started it, so a
# killed `dvc repro` does not leave its stage running and writing untracked outputs. Asked for here,
# while Python is still locating the module (sys.argv[0] is "-m" until then), before the stage's
# heavy imports: a parent killed during those seconds is noticed too.
if sys.argv[:1] == ["-m"]:
    from pipeline.processes import die_with_parent

    die_with_parent()
