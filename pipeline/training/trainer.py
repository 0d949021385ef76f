"""The one Hugging Face Trainer of every training stage (the teacher, the students, the pruning
recovery): it sums the loss terms it is given and logs each. Also the Trainer arguments every stage
shares, the metrics computed while training, and the NaN guard."""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, Trainer, TrainingArguments

from pipeline.config.base import TrainingBudget
from pipeline.data import labels as label_utils
from pipeline.errors import FinCompressError
from pipeline.evaluation.metrics import macro_f1
from pipeline.training import checkpoints, precision
from pipeline.training.encoding import ROW_COLUMN
from pipeline.training.loss import KDBatch, KDLoss

# The trainable parameters of the terms (the hidden-state projection), kept beside a resumable checkpoint.
KD_TERMS_FILE = "kd_terms.safetensors"


class DistillationTrainer(Trainer):
    """A Hugging Face Trainer whose loss is the weighted sum of the KD terms in `kd`: the teacher's
    fine-tuning (the hard-label term alone, no teacher), the students' distillation, the pruning recovery.

    It asks the student and the teacher for exactly what the terms need. The teacher is frozen (eval
    mode, no gradients) and only loaded when a term reads it; when only its logits are needed they
    come from the precomputed `teacher_logits` column, else it runs live. Pooled hidden-state targets
    (a student with its own tokenizer) come from the `teacher_pooled` column: such a student never
    runs the teacher (pass teacher=None). The terms' parameters (the hidden-state projection) train
    with the student in the same optimizer but are saved apart from it.
    """

    def __init__(
        self,
        *args: Any,
        kd: KDLoss,
        teacher: PreTrainedModel | None = None,
        pos_weight: torch.Tensor | None = None,
        teacher_inputs: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
        teacher_internals: Callable[[torch.Tensor, int], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        # The teacher's inputs for a student batch: the same by default; ids mapped into the teacher's
        # vocabulary for a student whose tokenizer cuts the same pieces under other ids.
        self.teacher_inputs = teacher_inputs
        # The teacher's cached per-token internals of the batch's rows (`teacher_row`), instead of a live pass.
        self.teacher_internals = teacher_internals
        if kd.needs_internals and teacher is None:
            raise ValueError("these KD terms read the teacher's hidden states or attentions: pass teacher=")
        self.kd = kd.to(self.args.device)
        self.model_accepts_loss_kwargs = False  # our loss is a batch mean already
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            teacher.to(self.args.device)
        self.pos_weight = pos_weight.to(self.args.device) if pos_weight is not None else None
        self._sums: dict[str, float] = defaultdict(float)
        self._batches = 0
        self._fp32_evaluation = False

    # The terms' parameters train with the student: one more parameter group in the same optimizer.
    def create_optimizer(self):  # noqa: D401 (Trainer API)
        optimizer = super().create_optimizer()
        parameters = list(self.kd.parameters())
        if parameters and not any(group.get("name") == "kd_terms" for group in optimizer.param_groups):
            optimizer.add_param_group({"params": parameters, "weight_decay": 0.0, "name": "kd_terms"})
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        cached = inputs.pop("teacher_logits", None)
        pooled = inputs.pop("teacher_pooled", None)
        has_label = inputs.pop("has_label", None)
        rows = inputs.pop(ROW_COLUMN, None)
        kd = self.kd
        training = model.training
        wants = {
            "output_hidden_states": training and kd.needs_hidden_states,
            "output_attentions": training and kd.needs_attentions,
        }
        outputs = full_precision(model(**inputs, **wants))
        logits = outputs.logits
        if not training:
            loss = kd.evaluation_loss(logits, labels, self.pos_weight)
            return (loss, outputs) if return_outputs else loss
        batch = KDBatch(
            student=outputs, labels=labels, attention_mask=inputs["attention_mask"], pos_weight=self.pos_weight,
            has_label=has_label, teacher_pooled=pooled,
        )
        if kd.needs_teacher:
            if kd.needs_internals and rows is not None and self.teacher_internals is not None:
                batch.teacher = self.teacher_internals(rows, inputs["input_ids"].shape[1]).to(logits.device)
            elif cached is None or kd.needs_internals:
                if self.teacher is None:
                    raise ValueError("the batch has no teacher_logits column and no teacher was given to compute them")
                with torch.no_grad():
                    teacher_inputs = self.teacher_inputs(inputs) if self.teacher_inputs else inputs
                    batch.teacher = self.teacher(**teacher_inputs, **wants)
            teacher_logits = cached if cached is not None else batch.teacher.logits
            batch.teacher_logits = teacher_logits.to(logits.dtype)
        loss, parts = kd(batch)
        check_finite(loss, self.state.global_step)
        self._accumulate(parts)
        if return_outputs:
            outputs = type(outputs)(loss=loss, logits=logits)
        return (loss, outputs) if return_outputs else loss

    # Validation runs in fp32 even when training is mixed: the best checkpoint is then chosen on the
    # numbers of the model as it is saved, exported and served (bf16 evaluation moved a two-layer
    # student's validation F1 by up to 0.3 points against the stage's own fp32 evaluation).
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self._fp32_evaluation = True
        try:
            with precision.unwrapped_forward(model):
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        finally:
            self._fp32_evaluation = False

    def compute_loss_context_manager(self):
        if self._fp32_evaluation:
            return contextlib.nullcontext()
        return super().compute_loss_context_manager()

    def _accumulate(self, parts: dict[str, torch.Tensor]) -> None:
        for name, value in parts.items():
            self._sums[name] += float(value.detach())
        self._batches += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the mean of every loss term since the last log (one row per epoch), as loss_<name>."""
        if "loss" in logs and self._batches:
            for name, total in self._sums.items():
                logs[f"loss_{name}"] = total / self._batches
            self._sums.clear()
            self._batches = 0
        super().log(logs, *args, **kwargs)

    # The terms' parameters are not part of the student, but a resumed run needs them.
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        if self.is_world_process_zero() and folder.is_dir():
            state = self.kd.state_dict()
            if state:
                save_file(state, str(folder / KD_TERMS_FILE))
            checkpoints.record_digests(folder)  # last: a resumed run checks the files against them

    def train(self, resume_from_checkpoint=None, **kwargs: Any):
        if resume_from_checkpoint and self.kd.state_dict():
            path = Path(resume_from_checkpoint) / KD_TERMS_FILE
            if path.is_file():
                self.kd.load_state_dict(load_file(str(path), device=str(self.args.device)))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


def full_precision(outputs: Any) -> Any:
    """The model's outputs in fp32: under bf16/fp16 autocast the logits (and some hidden states) come
    out in 16 bits, and the losses (softmax, KL, MSE) are computed in fp32 (no-op in fp32)."""
    for key, value in outputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            outputs[key] = value.float()
        elif isinstance(value, tuple):
            outputs[key] = tuple(v.float() if isinstance(v, torch.Tensor) else v for v in value)
    return outputs


def check_finite(loss: torch.Tensor, step: int) -> None:
    """Stop at the first NaN/inf loss instead of training garbage to the end."""
    if not torch.isfinite(loss):
        raise FinCompressError(
            f"the training loss became {loss.item()} at step {step}; lower the learning rate of this stage, "
            "check the data for empty or extreme inputs, or disable AMP (fp16) on GPU"
        )


def training_arguments(
    budget: TrainingBudget, output_dir: Path, *, section: str = "", **overrides: Any
) -> TrainingArguments:
    """Arguments shared by every training stage: keep the best checkpoint by validation macro-F1.
    `section` names the budget's params section in errors (e.g. `student` for student.precision)."""
    cuda = torch.cuda.is_available()
    mixed = precision.resolve(budget.precision, f"{section}.precision" if section else "precision")
    # torchrun / accelerate launch without CUDA: unless use_cpu is set, accelerate leaves the run
    # undistributed and every rank silently trains on all the data; with it, ranks are DDP over gloo.
    cpu_ddp = not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1
    cadence = "steps" if budget.save_steps else "epoch"
    args: dict[str, Any] = dict(
        output_dir=str(output_dir),
        num_train_epochs=budget.epochs,
        learning_rate=budget.learning_rate,
        per_device_train_batch_size=budget.batch_size,
        per_device_eval_batch_size=budget.eval_batch_size,
        warmup_ratio=budget.warmup_ratio,
        weight_decay=budget.weight_decay,
        seed=budget.seed,
        data_seed=budget.seed,
        eval_strategy=cadence,
        save_strategy=cadence,
        logging_strategy=cadence,
        eval_steps=budget.save_steps or None,
        save_steps=budget.save_steps or 500,
        logging_steps=budget.save_steps or 500,
        load_best_model_at_end=True,
        metric_for_best_model="macro_f1",
        greater_is_better=True,
        save_total_limit=2,  # the best and the latest (for resuming)
        save_only_model=False,
        report_to="none",  # stages log to MLflow themselves, one run per stage
        fp16=mixed == "fp16",
        bf16=mixed == "bf16",
        # Length-grouped batches waste less on padding (it matters on a CPU), but their order comes
        # from the global RNG, so a run resumed mid-epoch would see other batches: with save_steps
        # (resumable runs) the seeded random sampler is used instead.
        group_by_length=not budget.save_steps,
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,  # our collator needs teacher_logits
        label_names=["labels"],
        disable_tqdm=False,
        ddp_find_unused_parameters=False,
        use_cpu=cpu_ddp or (not cuda and mixed == "bf16"),  # Trainer refuses CPU bf16 without it
        ddp_backend="gloo" if cpu_ddp else None,
    )
    args.update(overrides)
    # TrainingArguments starts from ACCELERATE_MIXED_PRECISION and writes its choice back to it: after
    # a bf16 run in this process, an fp32 run would silently train in bf16. The flags above decide.
    os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
    return TrainingArguments(**args)


def compute_metrics_fn(task_type: str, threshold: float = 0.5):
    def compute(eval_pred: Any) -> dict[str, float]:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        predictions = label_utils.decide(np.asarray(logits), task_type, threshold)
        labels = np.asarray(eval_pred.label_ids)
        accuracy = float((predictions == labels).all(axis=-1).mean()) if labels.ndim > 1 else float(
            (predictions == labels).mean()
        )
        return {"macro_f1": macro_f1(labels.astype(int), predictions), "accuracy": accuracy}

    return compute


def train(trainer: Trainer, resume_from: str | None) -> float:
    """Train (resuming when a checkpoint is given); return the wall time in seconds."""
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    # Mixed precision left the model's forward wrapped in autocast (accelerate): take the wrapper off,
    # so the trained fp32 model is evaluated, saved and pruned in fp32, as it will be served.
    trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    return time.perf_counter() - start
