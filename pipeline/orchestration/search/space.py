"""The search space and its mapping onto params: a trial's values become params overrides, checked
against the params schema before any trial; the study's name and storage."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline.config import Params, params_from_dict
from pipeline.config.search import INTEGER_DIMENSIONS, Choices, Range
from pipeline.errors import ConfigError

# Dimensions that map onto one params key whatever the KD method.
DIRECT_KEYS = {
    "num_layers": "student.num_layers",
    "init": "student.init",
    "heads_ratio": "prune.heads_ratio",
    "ffn_ratio": "prune.ffn_ratio",
    "vocab": "prune.vocab",
    "vocab_keep_top": "prune.vocab_keep_top",
    "quantization": "export_onnx.quantization",
}
# The KD weights each method reads (from its own params section); the baseline reads none.
KD_WEIGHTS = {
    "baseline": (),
    "vanilla": ("alpha", "temperature"),
    "intermediate": ("alpha", "temperature", "hidden_weight", "attention_weight"),
}
KD_STAGE = {"baseline": "student_baseline", "vanilla": "distill_vanilla", "intermediate": "distill_intermediate"}
KD_SECTION = {"vanilla": "distill_vanilla", "intermediate": "distill_intermediate"}
INT8_DIR = {"dynamic": "int8", "static": "int8_static"}
# The sections whose values shape a trial's result (with search.goals/space/seed/sampler/latency): the
# study name is a hash of them, so changing any starts a new study and an unchanged search resumes.
SHAPING_SECTIONS = (
    "task", "data", "transfer", "teacher", "verify_teacher", "student", "distill_vanilla",
    "distill_intermediate", "prune", "export_onnx", "evaluation",
)


def suggest(trial: Any, space: Any) -> dict[str, Any]:
    """The trial's value of every dimension (a fixed one as given); KD weights only for the methods
    that read them, so the sampler never learns from a weight that had no effect."""

    def pick(name: str) -> Any:
        spec = getattr(space, name)
        if isinstance(spec, Choices):
            return trial.suggest_categorical(name, spec.choices)
        if isinstance(spec, Range):
            if name in INTEGER_DIMENSIONS:
                return trial.suggest_int(name, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
            return trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)
        return spec

    values = {name: pick(name) for name in (*DIRECT_KEYS, "kd_method")}
    for name in KD_WEIGHTS[values["kd_method"]]:
        values[name] = pick(name)
    return values


def overrides_for(values: dict[str, Any], params: Params) -> dict[str, Any]:
    """The params overrides (dotted key -> value) of one configuration: what `dvc exp run -S` needs to
    rebuild it as the family's compressed member."""
    method = values["kd_method"]
    overrides = {DIRECT_KEYS[name]: values[name] for name in DIRECT_KEYS}
    overrides["prune.source"] = getattr(params.paths, f"student_{method}")
    for name in KD_WEIGHTS[method]:
        overrides[f"{KD_SECTION[method]}.{name}"] = values[name]
    return overrides


def params_tree(params: Params) -> dict[str, Any]:
    return params.model_dump(mode="json", exclude={"root"})


def with_overrides(params: Params, overrides: dict[str, Any], source: str = "search") -> Params:
    """`params` with dotted-key overrides applied, validated like params.yaml."""
    tree = params_tree(params)
    for key, value in overrides.items():
        node = tree
        *sections, last = key.split(".")
        for section in sections:
            node = node[section]
        if last not in node:
            raise ConfigError(f"{source}: {key} is not a params key")
        node[last] = value
    return params_from_dict(tree, root=params.root, source=source)


def _extremes(spec: Any) -> list[Any]:
    if isinstance(spec, Choices):
        return list(spec.choices)
    if isinstance(spec, Range):
        return [spec.low, spec.high]
    return [spec]


def check_space(params: Params) -> None:
    """Fail before any trial when a value of the space is not a valid params value (e.g. a heads_ratio
    range reaching 1.0), naming the dimension and the params key."""
    space = params.search.space
    methods = _extremes(space.kd_method)
    for name in (*DIRECT_KEYS, "kd_method", "alpha", "temperature", "hidden_weight", "attention_weight"):
        for value in _extremes(getattr(space, name)):
            if name in DIRECT_KEYS:
                keys = [DIRECT_KEYS[name]]
            elif name == "kd_method":
                keys = []
            else:
                keys = [f"{KD_SECTION[m]}.{name}" for m in methods if name in KD_WEIGHTS[m]]
            if isinstance(value, float) and name in INTEGER_DIMENSIONS:
                value = int(value)
            try:
                with_overrides(params, dict.fromkeys(keys, value))
            except ConfigError as error:
                detail = str(error).split("\n", 1)[-1].strip()
                raise ConfigError(
                    f"search.space.{name}: the value {value!r} is not valid for {', '.join(keys)} ({detail}); "
                    "narrow the range or the choices"
                ) from None


def study_name(params: Params) -> str:
    """search.study, or a name derived from everything that shapes a trial's result (the prepared data's
    content hash included)."""
    from pipeline.stage import data_hash

    if params.search.study:
        return params.search.study
    shaping = {name: params.section(name) for name in SHAPING_SECTIONS} | {"data_hash": data_hash(params)}
    search = params.search.model_dump(mode="json", include={"goals", "space", "seed", "sampler", "latency"})
    digest = hashlib.sha256(json.dumps([shaping, search], sort_keys=True).encode()).hexdigest()[:10]
    return f"search-{digest}"


def storage_path(params: Params) -> Path:
    """The Optuna database: search.db beside the MLflow database (a local sqlite file), else in the
    project root."""
    from pipeline.tracking import project_root

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent / "search.db"
    return project_root(params) / "search.db"
