"""The benchmark on the tiny model with a few runs: shape and sanity of the numbers (no timing thresholds)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from pipeline.config import params_from_dict
from pipeline.latency import percentiles, thread_settings
from pipeline.models import load_trained
from pipeline.onnx import export_fp32
from pipeline.quantization import quantize_model, save_quantized
from stages import benchmark


def test_percentiles_and_thread_settings():
    stats = percentiles([float(v) for v in range(1, 101)])
    assert stats["p50"] == pytest.approx(50.5) and stats["p99"] == pytest.approx(99.01) and stats["runs"] == 100
    settings = thread_settings([1, 0, 1])  # 0 means every core; duplicates collapse
    assert settings[0] == 1 and (os.cpu_count() or 1) in settings and len(settings) == len(set(settings))


def test_benchmark_on_the_tiny_family(trained_project, tmp_path):
    for name in ("data", "models"):
        shutil.copytree(trained_project.root / name, tmp_path / name)
    params = params_from_dict(trained_project.model_dump(mode="json"), root=tmp_path)
    teacher_dir = params.path(params.paths.teacher)
    shutil.copytree(teacher_dir, params.path(params.paths.pruned))
    export_fp32(teacher_dir, params.path(params.paths.onnx_teacher), opset=18, max_length=32)
    save_quantized(quantize_model(load_trained(teacher_dir), "fbgemm"), params.path(params.paths.quantized), "fbgemm")
    shutil.copy(teacher_dir / "tokenizer.json", params.path(params.paths.quantized))
    shutil.copy(teacher_dir / "tokenizer_config.json", params.path(params.paths.quantized))
    for faked in (params.paths.onnx_teacher, params.paths.quantized):  # the benchmark reads every member's record
        shutil.copy(teacher_dir / "checkpoint_info.json", params.path(faked))

    metrics = benchmark.STAGE.execute(params)
    result = json.loads(params.path(params.paths.benchmark).read_text())
    members = {entry["name"]: entry for entry in result["members"]}
    assert set(members) == {"teacher", "teacher_onnx", "student_pruned", "student_int8_torch"}
    assert result["machine"]["cores"] >= 1 and result["settings"]["test_sentences"] == 15
    for entry in members.values():
        for setting in result["settings"]["thread_counts"]:
            stats = entry["latency_ms"][setting]
            assert 0 < stats["p50"] <= stats["p95"] <= stats["p99"]
            assert stats["runs"] >= params.benchmark.min_runs
            assert entry["e2e_latency_ms"][setting]["runs"] >= params.benchmark.min_runs
            assert entry["throughput_per_second"][setting] > 0
        assert entry["peak_rss_mb"] > 10 and entry["size_mb"] > 0
    assert members["teacher"]["speedup_vs_teacher"]["1"] == 1.0
    assert members["teacher_onnx"]["imports_torch"] is False and members["teacher"]["imports_torch"] is True
    assert members["teacher_onnx"]["format"] == "onnx" and members["student_int8_torch"]["precision"] == "int8"
    assert metrics["teacher.speedup_t1"] == 1.0
