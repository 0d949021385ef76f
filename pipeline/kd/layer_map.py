"""Which teacher layer each student layer is paired with: for copying layers into a student built from
the teacher or a pretrained model, and for the hidden-state and attention KD terms."""

from __future__ import annotations

import math

from pipeline.errors import ConfigError


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer (1-based) for each student layer, evenly spaced and ending at the last layer.

    A 3-layer student of a 6-layer teacher gets [2, 4, 6].
    """
    if student_layers > teacher_layers:
        raise ConfigError(
            f"a {student_layers}-layer student cannot map onto a {teacher_layers}-layer teacher uniformly; "
            "give distill_intermediate.layer_map explicitly"
        )
    return [math.ceil((i + 1) * teacher_layers / student_layers - 1e-9) for i in range(student_layers)]


def init_layer_choice(init_layers: str | list[int], student_layers: int, source_layers: int, source: str) -> list[int]:
    """The source layers (1-based) a student of `student_layers` starts from (`student.init_layers`)."""
    if student_layers > source_layers:
        raise ConfigError(
            f"student.num_layers={student_layers} is deeper than its init source, {source} ({source_layers} layers)"
        )
    if init_layers == "evenly":
        return uniform_layer_map(student_layers, source_layers)
    if init_layers == "bottom":
        return list(range(1, student_layers + 1))
    if len(init_layers) != student_layers or init_layers[-1] > source_layers:
        raise ConfigError(
            f"student.init_layers={init_layers} must name {student_layers} layers (student.num_layers) of "
            f"{source}, which has {source_layers}; or use evenly or bottom"
        )
    return list(init_layers)


def resolve_layer_map(layer_map: str | list[int], student_layers: int, teacher_layers: int) -> list[int]:
    if layer_map == "auto":
        return uniform_layer_map(student_layers, teacher_layers)
    if len(layer_map) != student_layers:
        raise ConfigError(
            f"distill_intermediate.layer_map has {len(layer_map)} entries but the student has {student_layers} "
            "layers; give one teacher layer per student layer"
        )
    beyond = [layer for layer in layer_map if layer > teacher_layers]
    if beyond:
        raise ConfigError(
            f"distill_intermediate.layer_map {layer_map} points past the teacher's depth "
            f"({teacher_layers} layers): {beyond}"
        )
    return list(layer_map)
