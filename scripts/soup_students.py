"""Validation macro-F1 of students trained from one init, and of their uniform weight average (a
"model soup", Wortsman et al. 2022). Run from a project directory whose data/prepared the students
were trained on:

    python -m scripts.soup_students models/student_vanilla models/sv_seed1 models/sv_seed2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pipeline.data.prepared import load_prepared
from pipeline.evaluation.metrics import macro_f1
from pipeline.models import load_trained_with_tokenizer, predict_logits


def validation_f1(model: torch.nn.Module, tokenizer, prepared, max_length: int) -> float:
    logits = predict_logits(model.eval(), tokenizer, prepared.texts("validation"), max_length)
    return macro_f1(prepared.labels("validation"), logits.argmax(-1).numpy())


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
    for directory, (model, _) in zip(args.students, loaded):
        print(f"{directory}: validation macro-F1 {validation_f1(model, tokenizer, prepared, args.max_length):.4f}")
    soup = loaded[0][0]
    soup.load_state_dict(uniform_soup([model.state_dict() for model, _ in loaded]))
    print(f"uniform soup of {len(loaded)}: validation macro-F1 {validation_f1(soup, tokenizer, prepared, args.max_length):.4f}")


if __name__ == "__main__":
    main()
