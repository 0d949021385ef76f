"""KD losses against hand computations, the layer map, the projection path, the frozen teacher,
student construction, and the three student stages on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import StudentConfig
from pipeline.distill import (
    attention_mse,
    hidden_mse,
    relation_loss,
    resolve_layer_map,
    soft_loss,
    soft_loss_multilabel,
)
from pipeline.errors import ConfigError
from pipeline.models import (
    build_student,
    load_trained,
    load_trained_with_tokenizer,
    logits_fn,
    uniform_layer_map,
)
from pipeline.prepared import load_prepared
from pipeline.record import ModelRecord, evaluate_splits
from stages import distill_intermediate, distill_vanilla, student_baseline
from tests.helpers import copy_project


def test_soft_loss_matches_hand_computation_with_t_squared():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    teacher = torch.tensor([[2.0, 0.5, -2.0], [0.0, 1.0, 1.0]])
    temperature = 2.0
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        zs = sum(math.exp(v / temperature) for v in s_row)
        zt = sum(math.exp(v / temperature) for v in t_row)
        p_s = [math.exp(v / temperature) / zs for v in s_row]
        p_t = [math.exp(v / temperature) / zt for v in t_row]
        expected += sum(t * math.log(t / s) for t, s in zip(p_t, p_s))
    expected = expected / 2 * temperature**2
    assert soft_loss(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-5)
    assert soft_loss(teacher, teacher, temperature).item() == pytest.approx(0.0, abs=1e-6)


def test_multilabel_soft_loss_matches_hand_computation():
    student = torch.tensor([[1.0, -2.0]])
    teacher = torch.tensor([[0.0, 3.0]])
    temperature = 2.0

    def sig(x):
        return 1 / (1 + math.exp(-x))

    expected = 0.0
    for s, t in zip(student[0].tolist(), teacher[0].tolist()):
        q, p = sig(s / temperature), sig(t / temperature)
        expected += -(p * math.log(q) + (1 - p) * math.log(1 - q))
    expected = expected / 2 * temperature**2
    assert soft_loss_multilabel(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_relation_loss_is_zero_for_matching_structure():
    logits = torch.randn(5, 3)
    assert relation_loss(logits, logits).item() == pytest.approx(0.0, abs=1e-7)
    assert relation_loss(logits * 3.0, logits).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert relation_loss(torch.randn(5, 3), logits).item() > 0


def test_hidden_and_attention_losses_are_zero_for_identical_inputs_and_ignore_padding():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    hidden = torch.randn(2, 4, 8)
    attention = torch.softmax(torch.randn(2, 2, 4, 4), dim=-1)
    assert hidden_mse(hidden, hidden, mask).item() == 0
    assert attention_mse(attention, attention, mask).item() == 0
    other_hidden, other_attention = torch.randn(2, 4, 8), torch.softmax(torch.randn(2, 2, 4, 4), -1)
    base_h = hidden_mse(hidden, other_hidden, mask)
    base_a = attention_mse(attention, other_attention, mask)
    # Changing padded positions (and attention to or from them) changes nothing.
    noisy_h, noisy_a = hidden.clone(), attention.clone()
    noisy_h[0, 3] += 100
    noisy_h[1, 2:] -= 50
    noisy_a[0, :, 3, :] = 7
    noisy_a[0, :, :, 3] = 7
    noisy_a[1, :, :, 2:] = 3
    assert hidden_mse(noisy_h, other_hidden, mask).item() == pytest.approx(base_h.item())
    assert attention_mse(noisy_a, other_attention, mask).item() == pytest.approx(base_a.item())
    # Different head counts compare head-averaged maps.
    three_heads = torch.softmax(torch.randn(2, 3, 4, 4), dim=-1)
    assert attention_mse(attention, three_heads, mask).item() > 0


def test_projection_maps_student_states_into_teacher_space():
    mask = torch.ones(1, 3)
    projection = torch.nn.Linear(4, 8, bias=False)
    student = torch.randn(1, 3, 4)
    assert hidden_mse(student, projection(student).detach(), mask, projection).item() == 0


def test_auto_layer_map_and_explicit_map_checks():
    assert uniform_layer_map(3, 6) == [2, 4, 6]
    assert uniform_layer_map(2, 6) == [3, 6]
    assert uniform_layer_map(4, 6) == [2, 3, 5, 6]
    assert uniform_layer_map(6, 6) == [1, 2, 3, 4, 5, 6]
    assert resolve_layer_map("auto", 1, 2) == [2]
    assert resolve_layer_map([1, 2], 2, 2) == [1, 2]
    with pytest.raises(ConfigError, match="points past the teacher's depth"):
        resolve_layer_map([2, 7], 2, 6)
    with pytest.raises(ConfigError, match="one teacher layer per student layer"):
        resolve_layer_map([2], 2, 6)


def test_student_construction(trained_project):
    teacher = load_trained(trained_project.path(trained_project.paths.teacher))
    names = ["negative", "neutral", "positive"]
    student, info = build_student(teacher, StudentConfig(num_layers=1), names)
    assert student.config.num_hidden_layers == 1 and info["init_layers"] == [2]
    # Embeddings and the chosen layer are copies of the teacher's.
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    assert torch.equal(
        student.bert.encoder.layer[0].output.dense.weight, teacher.bert.encoder.layer[1].output.dense.weight
    )
    same, _ = build_student(teacher, StudentConfig(num_layers=2), names)  # self-distillation shape
    assert same.config.num_hidden_layers == 2
    narrow, info = build_student(teacher, StudentConfig(num_layers=1, hidden_size=16, num_heads=2, init="random"), names)
    assert narrow.config.hidden_size == 16 and info["init"] == "random"
    with pytest.raises(ConfigError, match="deeper than its init source"):
        build_student(teacher, StudentConfig(num_layers=3), names)
    with pytest.raises(ConfigError, match="must keep the teacher's widths"):
        build_student(teacher, StudentConfig(hidden_size=16), names)
    with pytest.raises(ConfigError, match="not divisible"):
        build_student(teacher, StudentConfig(hidden_size=30, num_heads=4, init="random"), names)


@pytest.mark.parametrize(
    "module, stage, out_key, member",
    [
        (student_baseline, "student_baseline", "student_baseline", "student_baseline"),
        (distill_vanilla, "distill_vanilla", "student_vanilla", "student_vanilla"),
        (distill_intermediate, "distill_intermediate", "student_intermediate", "student_intermediate"),
    ],
)
def test_student_stages(trained_project, tmp_path, module, stage, out_key, member):
    params = copy_project(trained_project, tmp_path)
    metrics = module.STAGE.execute(params)
    out = params.path(getattr(params.paths, out_key))
    record = ModelRecord.read(out)
    assert record.member == member and record.stage == stage and record.details["student"]["num_layers"] == 1
    assert metrics == record.metrics()
    # The record describes the saved model: evaluating the reloaded student gives the recorded numbers.
    model, tokenizer = load_trained_with_tokenizer(out)
    prepared = load_prepared(params.path(params.paths.prepared))
    results, _ = evaluate_splits(logits_fn(model, tokenizer, params.teacher.max_length), prepared, params.evaluation)
    assert results["test"] == record.test and results["validation"] == record.validation
    curve = (params.path(params.paths.curves) / f"{stage}.csv").read_text().splitlines()
    expected = {"student_baseline": ["loss_ce"], "distill_vanilla": ["loss_kl", "loss_ce"],
                "distill_intermediate": ["loss_kl", "loss_hidden", "loss_attention"]}[stage]
    assert all(column in curve[0] for column in expected + ["loss_total", "eval_macro_f1"])
    assert not list(params.path(params.paths.checkpoints).glob(f"{stage}/checkpoint-*")), "scratch not cleaned"


def test_projection_students_train_and_do_not_save_the_projection(trained_project, tmp_path):
    params = copy_project(
        trained_project, tmp_path, student={"hidden_size": 16, "num_heads": 2, "init": "random", "epochs": 1}
    )
    distill_intermediate.STAGE.execute(params)
    out = params.path(params.paths.student_intermediate)
    assert ModelRecord.read(out).details["kd"]["projection"] is True
    reloaded = load_trained(out)
    assert reloaded.config.hidden_size == 16
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert not [key for key in handle.keys() if "projection" in key]


def test_teacher_is_unchanged_by_a_training_step(trained_project):
    """One optimizer step of intermediate KD moves the student and leaves every teacher weight alone."""
    from pipeline.distill import DistillationTrainer, KDConfig
    from pipeline.models import load_tokenizer, state_fingerprint
    from pipeline.prepared import load_split
    from pipeline.training import Collator, encode, training_arguments

    teacher_dir = trained_project.path(trained_project.paths.teacher)
    teacher = load_trained(teacher_dir)
    tokenizer = load_tokenizer(str(teacher_dir))
    names = ["negative", "neutral", "positive"]
    student, _ = build_student(teacher, StudentConfig(num_layers=1), names)
    rows = load_split(trained_project.path(trained_project.paths.prepared), "train")[:8]
    dataset = encode(rows, tokenizer, 32, names, "single_label")
    before_teacher, before_student = state_fingerprint(teacher), state_fingerprint(student)
    trainer = DistillationTrainer(
        model=student,
        args=training_arguments(
            trained_project.student, trained_project.root / "scratch", max_steps=1, eval_strategy="no",
            save_strategy="no", load_best_model_at_end=False, learning_rate=1e-2, disable_tqdm=True,
        ),
        train_dataset=dataset,
        data_collator=Collator(tokenizer),
        kd=KDConfig(temperature=2, alpha=0.5, hidden_weight=1, attention_weight=1, layer_map=[2]),
        teacher=teacher,
    )
    trainer.train()
    assert state_fingerprint(teacher) == before_teacher
    assert state_fingerprint(student) != before_student
    assert all(not p.requires_grad for p in teacher.parameters())
