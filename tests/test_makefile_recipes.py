"""`make run-phrasebank RECIPE=...`: every recipe of the Makefile expands to `-S` overrides that
load into valid params (a misspelt key would otherwise surface only minutes into a DVC experiment),
and an unknown recipe stops make with a message naming the recipes."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.config import load_params

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def recipes() -> list[str]:
    return re.findall(r"^RECIPE_([a-z][\w-]*)\s*=", (ROOT / "Makefile").read_text(), re.M)


def dry_run(*variables: str) -> subprocess.CompletedProcess[str]:
    # `make -n` prints the commands (setup's and the experiment's) and runs none of them.
    return subprocess.run(["make", "-n", "-C", str(ROOT), "run-phrasebank", *variables],
                          capture_output=True, text=True, check=False)


def overrides(command: str) -> list[str]:
    words = shlex.split(command.replace("\\\n", " "))
    return [words[i + 1] for i, word in enumerate(words) if word == "-S"]


def test_the_makefile_has_the_documented_recipes():
    assert {"kd", "kd-unpruned", "kd-two-layers", "kd-pruned"} <= set(recipes())


@pytest.mark.parametrize("recipe", recipes())
def test_each_recipe_expands_to_valid_params(recipe):
    result = dry_run(f"RECIPE={recipe}", "TEACHER=mpnet-base", "STUDENT_LAYERS=6")
    assert result.returncode == 0, result.stderr
    keys = overrides(result.stdout)
    assert "transfer.augment.enabled=true" in keys
    params = load_params(ROOT / "params.yaml", keys)
    assert params.transfer.augment.enabled and params.student.num_layers == 6
    if recipe in ("kd-unpruned", "kd-two-layers", "kd-pruned"):  # prune starts from the logit-KD student
        assert params.prune.source == "models/student_vanilla"
        assert not params.distill_intermediate.enabled, "its champion does not come from this student"
    if recipe in ("kd-unpruned", "kd-two-layers"):
        assert params.prune.ffn_ratio == 0 and params.prune.heads_ratio == 0
    if recipe == "kd-unpruned":  # ...and passes it through unpruned
        assert params.prune.num_layers is None
    if recipe == "kd-two-layers":  # ...and cuts it to two layers, re-distilled as the KD stage trains
        assert params.prune.num_layers == 2 and params.prune.recovery.soft_loss == "mse"
        assert params.prune.recovery.epochs == params.student.epochs
        assert params.prune.recovery.learning_rate == params.student.learning_rate
        # the teacher's logits, and the layers of the six-layer student it was cut from
        assert params.prune.recovery.distil_from == "source_layers"
        assert params.prune.recovery.hidden_weight > 0 and params.prune.recovery.attention_weight > 0
    if recipe == "kd-pruned":  # ...or keeps six layers with half their heads and FFN, re-distilled the same way
        assert params.prune.num_layers is None and params.prune.heads_ratio == params.prune.ffn_ratio == 0.5
        assert params.prune.recovery.epochs == 3 and params.prune.recovery.learning_rate == 2e-4
        assert params.prune.recovery.soft_loss == "mse" and params.prune.recovery.distil_from == "source_layers"
        assert params.prune.recovery.hidden_weight > 0 and params.prune.recovery.attention_weight > 0


def test_an_unknown_recipe_stops_make_and_names_the_recipes():
    result = dry_run("RECIPE=nonsense")
    assert result.returncode != 0
    assert "RECIPE=nonsense is not a recipe" in result.stderr and "kd-unpruned" in result.stderr


def test_precision_sets_the_students_and_leaves_the_teacher():
    result = dry_run("PRECISION=bf16")
    assert result.returncode == 0, result.stderr
    params = load_params(ROOT / "params.yaml", overrides(result.stdout))
    assert params.student.precision == params.prune.recovery.precision == "bf16"
    assert params.teacher.precision == "auto", "a bf16 teacher is another teacher: asked for by name only"
