"""The family member kinds (weight files, sizes, benchmark feeds, attention) and the benchmark stage on
the tiny model with a few runs (no timing thresholds)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from pipeline.compression.quantization import load_quantized, quantize_model, resolve_engine, save_quantized
from pipeline.config import params_from_dict
from pipeline.evaluation.family import (
    MEMBER_KINDS,
    OnnxInt8Member,
    OnnxInt8StaticMember,
    OnnxMember,
    TorchInt8Member,
    TorchMember,
    family,
)
from pipeline.evaluation.latency import interleaved_latency, percentiles, thread_settings
from pipeline.evaluation.stopping import Stopping, median_interval, relative_half_width
from pipeline.export.onnx import OnnxClassifier
from pipeline.export.onnx_export import export_fp32, quantize_int8
from pipeline.export.onnx_static import quantize_int8_static
from pipeline.models import load_tokenizer, load_trained, predict_logits, save_model
from stages import benchmark

LABELS = ["negative", "neutral", "positive"]
TEXTS = ["Operating profit rose sharply in the third quarter.", "Net sales fell.", "The company held its AGM."]
MAX_LENGTH = 32


def test_percentiles_and_thread_settings():
    stats = percentiles([float(v) for v in range(1, 101)])
    assert stats["p50"] == pytest.approx(50.5) and stats["p99"] == pytest.approx(99.01) and stats["runs"] == 100
    settings = thread_settings([0, 1, 1])  # 0 means every core; duplicates collapse; 1 thread first
    assert settings[0] == 1 and settings[-1] == (os.cpu_count() or 1) and len(settings) == len(set(settings))


def test_the_median_interval_narrows_with_more_runs():
    rng = np.random.default_rng(0)
    few, many = rng.lognormal(0, 0.2, 30), rng.lognormal(0, 0.2, 3000)
    low, high = median_interval(list(many))
    assert low < np.median(many) < high
    assert relative_half_width(list(many)) < relative_half_width(list(few)) < 0.2
    assert median_interval([1.0]) is None and relative_half_width([1.0]) == float("inf")


def test_a_timing_stops_once_its_median_is_stable_or_at_a_cap():
    rng = np.random.default_rng(0)
    steady = list(rng.normal(10, 0.1, 60))  # p50 interval about +-0.3%
    noisy = list(rng.lognormal(np.log(10), 1.0, 60))  # about +-30%
    stopping = Stopping(min_runs=50, min_rounds=3, round_seconds=0.0, rel_ci=0.02, max_runs=200, max_seconds=5.0)
    assert stopping.round_runs == 17
    assert stopping.reason(steady, rounds=3) == "stable"
    assert stopping.reason(steady, rounds=2) is None, "not before min_rounds"
    assert stopping.reason(steady[:40], rounds=3) is None, "not before min_runs"
    assert stopping.reason(noisy, rounds=3) is None, "a noisy median goes on ..."
    assert stopping.reason(noisy * 4, rounds=9) == "max_runs", "... up to max_runs"
    assert stopping.reason([100.0] * 60, rounds=3) == "max_seconds", "6 s of 100 ms calls is over the 5 s cap"
    fixed = Stopping(min_runs=10, min_rounds=2, round_seconds=0.0)  # the search's short run: no stability test
    assert fixed.reason(noisy[:10], rounds=1) is None and fixed.reason(noisy[:10], rounds=2) == "fixed"
    with pytest.raises(ValueError, match="max_runs or max_seconds"):
        Stopping(min_runs=10, min_rounds=2, round_seconds=0.0, rel_ci=0.02)


class FakeWorker:
    """A loaded member answering `latency` with made-up samples: steady ones, or noisy ones."""

    def __init__(self, name: str, noisy: bool, seed: int) -> None:
        self.name, self.noisy, self.rng, self.visits = name, noisy, np.random.default_rng(seed), []

    def ask(self, op: str, runs: int, seconds: float, **command) -> dict:
        self.visits.append((command["threads"], seconds))
        spread = 1.0 if self.noisy else 0.01
        # Calls of `ms` each (the samples' scale) for at least `runs` calls and `seconds`.
        calls = max(runs, round(seconds * 1000 / self.ms))
        return {"samples": list(self.ms * self.rng.lognormal(0, spread, calls))}

    ms = 1.0


def test_a_stable_member_stays_in_the_rounds_until_every_member_of_its_setting_is_done():
    steady, noisy = FakeWorker("steady", noisy=False, seed=0), FakeWorker("noisy", noisy=True, seed=1)
    stopping = Stopping(min_runs=10, min_rounds=2, round_seconds=0.008, rel_ci=0.02, max_runs=100)
    samples, stopped = interleaved_latency([steady, noisy], 5, [(1, False)], stopping, 0, np.random.default_rng(0))
    assert stopped == {("steady", 1, False): "stable", ("noisy", 1, False): "max_runs"}
    # 8 ms a visit (8 calls of 1 ms): the noisy member is capped after 13 rounds, and the steady one is
    # visited in each, once stable (after the minimum 2 rounds) for a quarter of the time.
    assert len(samples[("noisy", 1, False)]) == 104 and len(steady.visits) == len(noisy.visits) == 13
    assert len(samples[("steady", 1, False)]) == 2 * 8 + 11 * 2
    assert steady.visits[-1] == (1, 0.002)


def test_the_adaptive_rule_visits_by_time_so_slow_and_fast_members_span_the_same_rounds():
    slow, fast = FakeWorker("slow", noisy=False, seed=0), FakeWorker("fast", noisy=False, seed=1)
    slow.ms, fast.ms = 10.0, 0.5
    never_stable = Stopping(min_runs=10, min_rounds=2, round_seconds=0.05, rel_ci=1e-9, max_seconds=1.0)
    samples, stopped = interleaved_latency([slow, fast], 5, [(1, False)], never_stable, 0, np.random.default_rng(0))
    assert stopped == {("slow", 1, False): "max_seconds", ("fast", 1, False): "max_seconds"}
    # Both reach the 1 s cap in the same round (about 20 visits of 50 ms), the fast one with 20x the calls.
    assert abs(len(slow.visits) - len(fast.visits)) <= 1 and 19 <= len(fast.visits) <= 21
    assert len(samples[("fast", 1, False)]) == pytest.approx(20 * len(samples[("slow", 1, False)]), rel=0.1)
    # A fixed number of rounds (the search's short run) still asks for its calls per visit.
    assert Stopping(min_runs=50, min_rounds=3, round_seconds=0.05).visit(stable=False) == (17, 0.05)


# --------------------------------------------------------------------------- member kinds


def write_bytes(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


def test_members_count_only_their_weight_files(tmp_path):
    for name in ("config.json", "tokenizer.json", "checkpoint_info.json"):  # never part of the size
        for kind in ("torch", "int8", "onnx"):
            write_bytes(tmp_path / kind / name, 5_000)
    write_bytes(tmp_path / "torch" / "model.safetensors", 2_000)
    write_bytes(tmp_path / "int8" / "model_int8.safetensors", 500)
    write_bytes(tmp_path / "onnx" / "model.onnx", 300)
    write_bytes(tmp_path / "onnx" / "model.onnx_data", 700)  # external data counts with the graph

    fp32, int8 = TorchMember("a", tmp_path / "torch"), TorchInt8Member("b", tmp_path / "int8")
    onnx_fp32 = OnnxMember("c", tmp_path / "onnx")
    assert fp32.weight_files() == [tmp_path / "torch" / "model.safetensors"] and fp32.size_mb() == 0.002
    assert int8.size_mb() == 0.0005
    assert onnx_fp32.weight_files() == [tmp_path / "onnx" / "model.onnx", tmp_path / "onnx" / "model.onnx_data"]
    assert onnx_fp32.size_mb() == 0.001
    # A directory holding another kind's weights is not this member.
    assert not TorchMember("d", tmp_path / "int8").is_present() and not TorchInt8Member("e", tmp_path / "torch").is_present()
    missing = OnnxInt8Member("f", tmp_path / "absent")
    assert not missing.is_present() and missing.size_mb() == 0


def test_the_family_labels_and_the_worker_registry(tmp_path):
    members = family(params_from_dict({}, root=tmp_path))
    assert members[0].name == "teacher" and members[0].format == "torch"
    for member in members:
        assert MEMBER_KINDS[member.kind] is type(member), "the worker rebuilds the member kind from its name"
    labels = {m.name: (m.format, m.precision, m.servable) for m in members}
    assert labels["student_int8_torch"] == ("torch", "int8", False)
    assert labels["student_onnx_fp32"] == ("onnx", "fp32", True)
    assert labels["student_onnx_int8"] == ("onnx", "int8", True)
    assert labels["student_onnx_int8_static"] == ("onnx", "int8", True)
    assert [m.name for m in members if m.servable] == [
        "teacher_onnx", "student_onnx_fp32", "student_onnx_int8", "student_onnx_int8_static", "tfidf", "static"
    ]


@pytest.fixture(scope="module")
def member_dirs(tiny_bert, tmp_path_factory):
    """The tiny BERT with a random 3-class head as each member kind: torch fp32, torch INT8, ONNX fp32,
    ONNX dynamic and static INT8."""
    import torch
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("members")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=3, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}
    )
    tokenizer = load_tokenizer(str(tiny_bert))
    save_model(model, tokenizer, root / "torch")
    save_quantized(quantize_model(load_trained(root / "torch"), resolve_engine("auto")), root / "int8", "fbgemm")
    tokenizer.save_pretrained(root / "int8")
    export_fp32(root / "torch", root / "onnx_fp32", opset=17, max_length=MAX_LENGTH)
    quantize_int8(root / "onnx_fp32", root / "onnx_int8", "avx2", per_channel=False, quantize_embeddings=False)
    quantize_int8_static(
        root / "onnx_fp32", root / "onnx_int8_static", TEXTS * 4, "avx2", per_channel=True, quantize_embeddings=True,
        method="minmax",
    )
    return root


def test_one_thread_copies_run_side_by_side_and_give_the_same_logits(member_dirs):
    runnable = OnnxInt8StaticMember.load_runnable(member_dirs / "onnx_int8_static", MAX_LENGTH, threads=[1])
    copies = runnable.one_thread_copies(2)
    assert len(copies) == 2 and copies[0].current.session is not copies[1].current.session
    feed = runnable.feed(TEXTS)
    for copy in copies:
        np.testing.assert_array_equal(copy.run(feed), runnable.run(feed))
    with pytest.raises(NotImplementedError):
        TorchMember.load_runnable(member_dirs / "torch", MAX_LENGTH, [1]).one_thread_copies(2)


def feed_logits(member_kind, model_dir) -> np.ndarray:
    """What the benchmark times: the member's feed of TEXTS (one padded batch) through its model."""
    runnable = member_kind.load_runnable(model_dir, MAX_LENGTH, threads=[1])
    runnable.use_threads(1)
    with runnable.inference():
        return runnable.run(runnable.feed(TEXTS))


def test_each_benchmark_feed_gives_the_models_own_logits(member_dirs):
    tokenizer = load_tokenizer(str(member_dirs / "torch"))
    torch_fp32 = predict_logits(load_trained(member_dirs / "torch"), tokenizer, TEXTS, MAX_LENGTH).numpy()
    torch_int8 = predict_logits(load_quantized(member_dirs / "int8"), tokenizer, TEXTS, MAX_LENGTH).numpy()
    # SDPA in the benchmark, eager attention in predict_logits: equal up to float rounding.
    np.testing.assert_allclose(feed_logits(TorchMember, member_dirs / "torch"), torch_fp32, atol=1e-5)
    np.testing.assert_allclose(feed_logits(TorchInt8Member, member_dirs / "int8"), torch_int8, atol=1e-5)
    onnx_kinds = ((OnnxMember, "onnx_fp32"), (OnnxInt8Member, "onnx_int8"), (OnnxInt8StaticMember, "onnx_int8_static"))
    for kind, directory in onnx_kinds:
        expected = OnnxClassifier.load(member_dirs / directory).logits(TEXTS)
        np.testing.assert_allclose(feed_logits(kind, member_dirs / directory), expected, atol=1e-6)
    assert OnnxInt8StaticMember("s", member_dirs / "onnx_int8_static").size_mb() < OnnxMember(
        "f", member_dirs / "onnx_fp32"
    ).size_mb()
    assert not np.allclose(torch_int8, torch_fp32, atol=1e-6), "the INT8 member is really quantized"


def test_torch_members_use_sdpa_where_the_architecture_has_it(member_dirs, tmp_path):
    """ELECTRA (like MPNet and DeBERTa) has no SDPA kernel in transformers: it loads with eager attention."""
    import torch
    from transformers import ElectraConfig, ElectraForSequenceClassification

    tokenizer = load_tokenizer(str(member_dirs / "torch"))
    config = ElectraConfig(
        vocab_size=tokenizer.vocab_size, embedding_size=16, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128, num_labels=3,
    )
    torch.manual_seed(0)
    save_model(ElectraForSequenceClassification(config), tokenizer, tmp_path / "electra")

    bert = TorchMember.load_runnable(member_dirs / "torch", MAX_LENGTH, [1])
    electra = TorchMember.load_runnable(tmp_path / "electra", MAX_LENGTH, [1])
    assert bert.model.config._attn_implementation == "sdpa"
    assert electra.model.config._attn_implementation == "eager"
    expected = predict_logits(load_trained(tmp_path / "electra"), tokenizer, TEXTS, MAX_LENGTH).numpy()
    np.testing.assert_allclose(feed_logits(TorchMember, tmp_path / "electra"), expected, atol=1e-6)


# --------------------------------------------------------------------------- the stage


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

    benchmark.STAGE.execute(params)
    result = json.loads(params.path(params.paths.benchmark).read_text())
    members = {entry["name"]: entry for entry in result["members"]}
    assert set(members) == {"teacher", "teacher_onnx", "student_pruned", "student_int8_torch"}
    assert result["machine"]["cores"] >= 1 and result["settings"]["test_sentences"] == 15
    assert result["machine"]["load"]["other_work_cores_before"] >= 0
    cfg = params.benchmark
    for entry in members.values():
        timings = [entry["latency_ms"][setting] for setting in result["settings"]["thread_counts"]]
        assert list(entry["e2e_latency_ms"]) == ["1"], "end to end at 1 thread only"
        for stats in [*timings, entry["e2e_latency_ms"]["1"]]:
            assert 0 < stats["p50"] <= stats["p95"] <= stats["p99"]
            # Each timing records how many runs it took and why it stopped.
            assert stats["stopped"] in ("stable", "max_runs", "max_seconds")
            assert stats["runs"] >= (cfg.min_runs if stats["stopped"] != "max_seconds" else 1)
            assert stats["runs"] <= cfg.max_runs + cfg.min_runs  # a round may end a little past the cap
            if stats["p50_ci95"] or stats["stopped"] != "max_seconds":  # a busy machine may leave too few runs
                low, high = stats["p50_ci95"]
                assert low <= stats["p50"] <= high
        for setting in result["settings"]["thread_counts"]:
            assert entry["throughput_per_second"][setting] > 0
        assert entry["peak_rss_mb"] > 10
    # Sizes are the weight files alone: the INT8 weights are smaller than the same model's fp32 ones.
    onnx_file = params.path(params.paths.onnx_teacher) / "model.onnx"
    assert members["teacher_onnx"]["size_mb"] == round(onnx_file.stat().st_size / 1e6, 3)
    assert members["student_int8_torch"]["size_mb"] < members["student_pruned"]["size_mb"]
    assert members["teacher_onnx"]["imports_torch"] is False and members["teacher"]["imports_torch"] is True
    assert members["teacher_onnx"]["servable"] and not members["student_int8_torch"]["servable"]
    # All cores, both serving layouts, for the ONNX member only (torch members cannot run side by side).
    layouts = members["teacher_onnx"]["all_cores_throughput"]
    assert layouts["cores"] == result["machine"]["cores"]
    assert layouts["one_session_n_threads"] > 0 and layouts["n_sessions_one_thread"] > 0
    faster = max(("one_session_n_threads", "n_sessions_one_thread"), key=layouts.get)
    assert layouts["best_layout"] == faster
    assert not any("all_cores_throughput" in members[name] for name in ("teacher", "student_pruned", "student_int8_torch"))
