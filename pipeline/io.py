"""Atomic file and directory output: a killed stage never leaves a half-written artifact behind, and
a wrong path never deletes what this pipeline did not write.

Every output directory carries a marker file (OUTPUT_MARKER); only a marked directory (or an empty
one) is ever replaced. Temporary directories are named after the process writing them and are only
cleaned up once that process is gone; a lock file beside the output keeps two writers apart.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import OutputError

if TYPE_CHECKING:
    from pipeline.config import Params

log = logging.getLogger(__name__)

OUTPUT_MARKER = ".fincompress-output"
STAGE_LOCKS = ".cache/locks"
# paths.* entries that are whole directories replaced on every run (the rest are files or parents of
# files): they must never hold anything else.
REPLACED_DIRS = (
    "prepared", "teacher", "student_baseline", "student_vanilla", "student_intermediate", "pruned",
    "quantized", "onnx_student", "onnx_teacher", "checkpoints", "teacher_logits",
)


def check_output_paths(params: Params) -> None:
    """Refuse paths.* that would overwrite the project, an input or another output; before any work."""
    root = params.root.resolve()
    outputs = {name: params.path(value).resolve() for name, value in params.paths.model_dump().items()}
    inputs = {"the params file": root / "params.yaml"}
    if params.data.source != "hub":
        inputs["data.path"] = params.path(params.data.path).resolve()
    from pipeline.config.data import transfer_path

    transfer = transfer_path(params.transfer, params.data)
    if transfer is not None:
        inputs["transfer.path"] = params.path(transfer).resolve()
    for name, path in outputs.items():
        where = f"paths.{name}={getattr(params.paths, name)}"
        if path == root:
            raise OutputError(f"{where} is the project directory itself; point it at a subdirectory "
                              f"(the default is {type(params.paths)().model_dump()[name]})")
        if not path.is_relative_to(root):
            raise OutputError(f"{where} resolves to {path}, outside the project {root}; "
                              "outputs must live inside the project (use a relative path)")
        if name not in REPLACED_DIRS:
            continue
        for what, source in inputs.items():
            if source.is_relative_to(path):
                raise OutputError(f"{where} contains {what} ({source}); writing it would delete that "
                                  "file. Point the output at its own directory")
        for other, other_path in outputs.items():
            if other == name:
                continue
            if other_path.is_relative_to(path) or (other in REPLACED_DIRS and path.is_relative_to(other_path)):
                raise OutputError(f"{where} and paths.{other}={getattr(params.paths, other)} overlap; every "
                                  "output directory must be separate from the others")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner_pid(name: str, prefix: str) -> int | None:
    head = name[len(prefix):].split("-", 1)[0]
    return int(head) if head.isdigit() else None


@contextlib.contextmanager
def exclusive_lock(lock_path: str | os.PathLike[str], what: str, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock file (fcntl) holding our PID. When another process has it: fail at once,
    or with `wait`, wait for it (logging who holds it). The kernel releases the lock of a killed holder.

    The file is removed on release; the inode check after locking keeps that race-free.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            try:
                holder = lock_path.read_text().strip() or "unknown"
            except OSError:
                holder = "unknown"
            if wait:
                log.warning("waiting for another process (pid %s) to finish %s", holder, what)
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                os.close(fd)
                raise OutputError(
                    f"another run is writing {what} (pid {holder}); wait for it to finish or stop it, then run again"
                ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and lock: retry
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)


def output_lock(target: Path) -> contextlib.AbstractContextManager[None]:
    """The per-output lock: a `.<name>.lock` file beside `target`."""
    return exclusive_lock(target.parent / f".{target.name}.lock", str(target))


@contextlib.contextmanager
def stage_lock(params: Params, stage: str, outputs: tuple[str, ...] = ()) -> Iterator[None]:
    """Held for a whole direct stage run: a second run of the same stage that would write any of the
    same outputs fails before any work. `outputs` are the paths.* entries the stage writes (its
    metrics file under paths.metrics always counts); each is locked at its resolved path, so runs
    with other output paths (a seed sweep: `paths.student_intermediate=models/s1 ...`) go side by side."""
    with contextlib.ExitStack() as locks:
        for key in dict.fromkeys(("metrics", *outputs)):
            value = getattr(params.paths, key)
            resolved = str(params.path(value).resolve())
            name = f"{stage}.{key}.{hashlib.sha256(resolved.encode()).hexdigest()[:16]}.lock"
            locks.enter_context(exclusive_lock(
                params.path(STAGE_LOCKS) / name, f"the outputs of stage {stage} at paths.{key}={value}"
            ))
        yield


def check_replaceable(target: Path) -> None:
    """Refuse to replace anything but a directory this pipeline wrote (or an empty one)."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise OutputError(f"{target} exists and is not a directory this pipeline wrote; refusing to replace "
                          "it. Move it away or point the output path elsewhere")
    if target.is_dir() and not (target / OUTPUT_MARKER).is_file() and any(target.iterdir()):
        raise OutputError(
            f"{target} exists but was not written by this pipeline (no {OUTPUT_MARKER} marker); refusing to "
            "replace it. Point the output path at another directory, or delete it yourself if it is an old output"
        )


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it replaces `target` in one rename.

    On an exception the temporary directory is removed and `target` is left exactly as it was.
    `target` must be absent, empty, or a directory this pipeline wrote (see OUTPUT_MARKER).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(target)
    with output_lock(target):
        # Leftovers of a writer killed mid-write (SIGKILL runs no cleanup); a live writer's are kept.
        prefix = f".{target.name}.tmp-"
        for stale in target.parent.glob(f"{prefix}*"):
            owner = _owner_pid(stale.name, prefix)
            if owner is None or (owner != os.getpid() and not pid_alive(owner)):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=target.parent))
        try:
            (tmp / OUTPUT_MARKER).write_text("written by the FinCompress pipeline; safe to replace\n")
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, target)


def replace_dir(source: Path, target: Path) -> None:
    """Move `source` to `target`, swapping out any previous `target` with renames only.

    Only a previous `target` this pipeline wrote (or an empty directory) is replaced.
    """
    check_replaceable(target)
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(source, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dir_size_mb(path: str | os.PathLike[str], pattern: str = "*") -> float:
    """Size on disk of the files in `path` matching `pattern` (a file path is measured alone), in MB."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob(pattern) if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6
