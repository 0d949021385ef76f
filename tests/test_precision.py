"""Mixed precision (`precision` of teacher, student and prune.recovery): what each setting resolves to,
the Trainer flags it sets, and a student stage trained in bf16 (the teacher's labels under bf16:
tests/test_distill.py)."""

from __future__ import annotations

import pytest
import torch

from pipeline.config.base import TrainingBudget
from pipeline.errors import ConfigError
from pipeline.training import precision
from pipeline.training.trainer import full_precision, training_arguments
from tests.helpers import copy_project

needs_cpu_bf16 = pytest.mark.skipif(
    torch.cuda.is_available() or not precision.cpu_has_bf16(), reason="needs a CPU with AMX or AVX512_BF16 (and no GPU)"
)


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_and_fp32_train_in_fp32_on_a_cpu(cpu_only, tmp_path):
    assert precision.resolve("auto", "student.precision") == "fp32"
    assert precision.resolve("fp32", "student.precision") == "fp32"
    args = training_arguments(TrainingBudget(), tmp_path)
    assert not args.bf16 and not args.fp16


def test_bf16_on_a_cpu_without_native_bf16_is_refused_with_the_fix(cpu_only, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    with pytest.raises(ConfigError, match=r"teacher.precision=bf16: this CPU has no native bf16.*teacher.precision=fp32"):
        precision.resolve("bf16", "teacher.precision")


def test_bf16_on_a_bf16_cpu_sets_the_trainer_flags(cpu_only, monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    args = training_arguments(TrainingBudget(precision="bf16"), tmp_path)
    assert args.bf16 and not args.fp16 and args.use_cpu  # HF Trainer refuses CPU bf16 without use_cpu


def test_an_fp32_run_after_a_bf16_one_in_the_same_process_trains_in_fp32(tiny_bert, cpu_only, monkeypatch, tmp_path):
    """TrainingArguments writes its precision to ACCELERATE_MIXED_PRECISION and reads it back as the
    default: stages run in one process (a notebook, a test session) must not inherit the last one's."""
    from transformers import AutoModelForSequenceClassification, Trainer

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)  # restored after the test
    no_eval = dict(eval_strategy="no", load_best_model_at_end=False)

    def mixed_precision_of(budget: TrainingBudget) -> str:
        model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=3)
        return Trainer(model=model, args=training_arguments(budget, tmp_path, **no_eval)).accelerator.mixed_precision

    assert mixed_precision_of(TrainingBudget(precision="bf16")) == "bf16"
    assert mixed_precision_of(TrainingBudget(precision="fp32")) == "no"


def test_unknown_precision_is_a_config_error():
    with pytest.raises(ValueError, match="precision"):
        TrainingBudget(precision="fp8")


def test_full_precision_upcasts_every_output_tensor():
    from transformers.modeling_outputs import SequenceClassifierOutput

    outputs = SequenceClassifierOutput(
        logits=torch.ones(2, 3, dtype=torch.bfloat16), hidden_states=(torch.ones(2, 4, 8, dtype=torch.bfloat16),) * 2
    )
    outputs = full_precision(outputs)
    assert outputs.logits.dtype == torch.float32 and outputs["logits"].dtype == torch.float32
    assert all(h.dtype == torch.float32 for h in outputs.hidden_states)


@needs_cpu_bf16
def test_a_student_trains_in_bf16_and_is_saved_in_fp32(trained_project, tmp_path):
    from pipeline.evaluation.record import ModelRecord
    from pipeline.models import load_trained
    from stages import distill_intermediate

    params = copy_project(trained_project, tmp_path, student={"precision": "bf16"})
    distill_intermediate.STAGE.execute(params)
    out = params.path(params.paths.student_intermediate)
    record = ModelRecord.read(out)
    assert record.params["student"]["precision"] == "bf16"
    assert 0 <= record.validation["macro_f1"] <= 1
    assert all(p.dtype == torch.float32 for p in load_trained(out).parameters())


@pytest.mark.parametrize(
    "stage_name, overrides, key",
    [("train_teacher", {"teacher": {"precision": "bf16"}}, "teacher.precision"),
     ("distill_vanilla", {"student": {"precision": "bf16"}}, "student.precision"),
     # The tiny project has no student yet: its teacher is pruned instead.
     ("prune", {"prune": {"source": "models/teacher", "recovery": {"precision": "bf16"}}}, "prune.recovery.precision")],
)
def test_bf16_refused_by_a_stage_names_the_section_it_came_from(trained_project, tmp_path, monkeypatch, cpu_only,
                                                                stage_name, overrides, key):
    import importlib

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    params = copy_project(trained_project, tmp_path, **overrides)
    stage = importlib.import_module(f"stages.{stage_name}").STAGE
    with pytest.raises(ConfigError, match=rf"{key}=bf16: this CPU has no native bf16.*use {key}=fp32"):
        stage.execute(params)


def test_validation_while_training_in_bf16_runs_in_fp32(tiny_bert, cpu_only, monkeypatch, tmp_path):
    """The best checkpoint is chosen on fp32 validation (the model as saved and served), not on the
    bf16 numbers of the training's autocast; the training steps themselves stay bf16."""
    import csv
    from pathlib import Path

    from pipeline.config import DistillVanillaConfig
    from pipeline.data.labels import problem_type
    from pipeline.kd.terms import build_kd_loss
    from pipeline.models import load_pretrained_classifier, load_tokenizer
    from pipeline.training.encoding import Collator, encode
    from pipeline.training.trainer import DistillationTrainer

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)  # autocast emulates bf16 where it is not native
    names = ["negative", "neutral", "positive"]
    torch.manual_seed(0)
    model = load_pretrained_classifier(str(tiny_bert), names, problem_type("single_label"))
    with torch.no_grad():  # a random head's logits are all near zero: spread them so rows differ
        model.classifier.weight.mul_(30)
    tokenizer = load_tokenizer(str(tiny_bert))
    with open(Path(__file__).parent / "data" / "tiny_sentiment.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))[:16]
    dataset = encode(rows, tokenizer, 32, names, "single_label")
    args = training_arguments(
        TrainingBudget(precision="bf16", batch_size=8, eval_batch_size=16), tmp_path, max_steps=1,
        eval_strategy="no", save_strategy="no", load_best_model_at_end=False, disable_tqdm=True,
        group_by_length=False,  # else the evaluation batches come in a random order too
    )
    trainer = DistillationTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=Collator(tokenizer),
        kd=build_kd_loss(DistillVanillaConfig(alpha=0.0), "single_label", label_names=names, key="test"),
    )
    trainer.train()
    predicted = torch.as_tensor(trainer.predict(dataset).predictions)
    model.eval()
    with torch.no_grad():
        batches = [{key: value for key, value in batch.items() if key != "labels"}
                   for batch in trainer.get_test_dataloader(dataset)]
        # accelerate's bf16 autocast wrapper is still on the model's forward; its own forward is fp32
        mixed = torch.cat([model(**batch).logits.float() for batch in batches])
        fp32 = torch.cat([model._original_forward(**batch).logits for batch in batches])
    assert fp32.dtype == torch.float32
    assert torch.allclose(predicted, fp32, atol=1e-5)
    assert not torch.allclose(mixed, fp32, atol=1e-5)  # so the check above can tell the two apart
