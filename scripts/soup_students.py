"""Validation macro-F1 of students trained from one init, and of their uniform weight average (a
"model soup", Wortsman et al. 2022). Run from a project directory whose data/prepared the students
were trained on:

    python -m scripts.soup_students models/student_vanilla models/sv_seed1 models/sv_seed2

It also prints the students' ensemble (their softmax probabilities averaged): not a member, since it
costs every student's latency, but a reference for what the students hold together that one of them
could at best learn.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pipeline.data.prepared import load_prepared
from pipeline.evaluation.metrics import macro_f1
from pipeline.models import load_trained_with_tokenizer, predict_logits


def validation_probabilities(model: torch.nn.Module, tokenizer, prepared, max_length: int) -> torch.Tensor:
    return predict_logits(model.eval(), tokenizer, prepared.texts("validation"), max_length).softmax(-1)


def validation_f1(probabilities: torch.Tensor, prepared) -> float:
    return macro_f1(prepared.labels("validation"), probabilities.argmax(-1).numpy())


def uniform_soup(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of every floating-point tensor; integer buffers (position ids) from the first state."""
    return {
        key: (sum(s[key].float() for s in states) / len(states)).to(value.dtype) if value.is_floating_point() else value
        for key, value in states[0].items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("students", nargs="+", type=Path, help="model directories with one architecture and tokenizer")
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    prepared = load_prepared(args.prepared)
    loaded = [load_trained_with_tokenizer(d, prepared.label_names) for d in args.students]
    tokenizer = loaded[0][1]
    probabilities = [validation_probabilities(model, tokenizer, prepared, args.max_length) for model, _ in loaded]
    for directory, students_probabilities in zip(args.students, probabilities):
        print(f"{directory}: validation macro-F1 {validation_f1(students_probabilities, prepared):.4f}")
    ensemble = validation_f1(sum(probabilities) / len(probabilities), prepared)
    soup = loaded[0][0]
    soup.load_state_dict(uniform_soup([model.state_dict() for model, _ in loaded]))
    soup_f1 = validation_f1(validation_probabilities(soup, tokenizer, prepared, args.max_length), prepared)
    print(f"uniform soup of {len(loaded)}: validation macro-F1 {soup_f1:.4f}")
    print(f"ensemble of {len(loaded)} (probabilities averaged; a reference, not a member): validation macro-F1 {ensemble:.4f}")


if __name__ == "__main__":
    main()
