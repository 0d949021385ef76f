"""Params: the shipped file validates, and bad params fail early naming the key."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import Params, load_params, parse_override
from pipeline.errors import ConfigError
from scripts.tiny_project import REPO


def test_shipped_params_validate_and_cover_every_section():
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "demo"
    assert params.teacher.model == "minilm-l6"
    shipped = set(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert shipped == set(Params.model_fields) - {"root"}, "params.yaml should list every section"


def write(tmp_path, tree):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize(
    "tree, key, hint",
    [
        ({"teacher": {"epochs": 0}}, "teacher.epochs", "greater than 0"),
        ({"teacher": {"learning_rate": "fast"}}, "teacher.learning_rate", "valid number"),
        ({"teacher": {"epoch": 3}}, "teacher.epoch", "unknown key"),
        ({"data": {"source": "excel", "path": "x"}}, "data.source", "'demo', 'phrasebank'"),
        ({"data": {"validation_fraction": 0.6}}, "data.validation_fraction", "less than 0.5"),
        ({"verify_teacher": {"min_macro_f1": 1.5}}, "verify_teacher.min_macro_f1", "less than or equal to 1"),
        ({"distill_vanilla": {"alpha": 1.2}}, "distill_vanilla.alpha", "less than or equal to 1"),
        ({"distill_vanilla": {"temperature": 0}}, "distill_vanilla.temperature", "greater than 0"),
        ({"distill_intermediate": {"layer_map": [0, 2]}}, "distill_intermediate.layer_map", "numbered from 1"),
        ({"prune": {"heads_ratio": 1.0}}, "prune.heads_ratio", "less than 1"),
        ({"prune": {"ffn_ratio": -0.1}}, "prune.ffn_ratio", "greater than or equal to 0"),
        ({"benchmark": {"threads": [0]}}, "benchmark.threads", "must include 1"),
        ({"benchmark": {"min_runs": 100, "max_runs": 50}}, "benchmark", "must not exceed max_runs"),
        ({"benchmark": {"rel_ci": 0}}, "benchmark.rel_ci", "greater than 0"),
        ({"colour": {}}, "colour", "unknown key"),
        ({"tracking": {"experiment": ""}}, "tracking.experiment", "at least 1 character"),
        ({"report": {"registered_model_name": "  "}}, "report.registered_model_name", "should match pattern"),
    ],
)
def test_bad_params_name_the_key(tmp_path, tree, key, hint):
    with pytest.raises(ConfigError) as error:
        load_params(write(tmp_path, tree))
    assert key in str(error.value) and hint in str(error.value)


def test_source_rules(tmp_path):
    with pytest.raises(ConfigError, match="data.source=demo reads the bundled set"):
        load_params(write(tmp_path, {"data": {"source": "demo", "path": "mine.csv"}}))
    with pytest.raises(ConfigError, match="needs data.hub_dataset"):
        load_params(write(tmp_path, {"data": {"source": "hub"}}))


def test_overrides_apply_and_validate(tmp_path):
    path = write(tmp_path, {})
    assert load_params(path, ["teacher.epochs=1", "data.label_map={bear: negative}"]).teacher.epochs == 1
    assert load_params(path, ["data.label_map={bear: negative}"]).data.label_map == {"bear": "negative"}
    with pytest.raises(ConfigError, match="teacher.epochs"):
        load_params(path, ["teacher.epochs=-2"])
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("teacher.epochs")


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_schema_defaults_are_the_shipped_params():
    """params.yaml is the one source of every default: the schema's defaults must be its values
    (else a params file that leaves a key out silently means something else), and it must write out
    every setting (`dvc exp run -S key=value` can only set keys that params.yaml already has)."""
    defaults = Params().model_dump(mode="json")
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())

    def drift(typed: dict, written: dict, prefix: str = "") -> list[str]:
        found = []
        for key in sorted(set(typed) | set(written)):
            if key not in written:
                found.append(f"{prefix}{key}: missing from params.yaml")
            elif key not in typed:
                found.append(f"{prefix}{key}: not in the schema")
            elif isinstance(typed[key], dict) and isinstance(written[key], dict):
                found += drift(typed[key], written[key], f"{prefix}{key}.")
            elif typed[key] != written[key]:
                found.append(f"{prefix}{key}: schema default {typed[key]!r}, params.yaml {written[key]!r}")
        return found

    assert drift(defaults, shipped) == []
