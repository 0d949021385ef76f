"""Resumable training: the Trainer's scratch checkpoints of a stage, resumed only by a run with the same
params, data and code, and removed once the final model is written."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from pipeline.config import Params
from pipeline.io import read_json, sha256_file, write_json

log = logging.getLogger(__name__)
# In every checkpoint this pipeline saves: the SHA-256 of its files, checked before it is resumed.
DIGESTS_FILE = "fincompress-digests.json"


def fingerprint(*parts: Any) -> str:
    """The key of a stage's checkpoints: the params and data it trains on (`parts`) and this pipeline's code,
    so a run interrupted before an upgrade or an edit of the code is not resumed by the new code."""
    return hashlib.sha256(json.dumps([code_digest(), *parts], sort_keys=True, default=str).encode()).hexdigest()


@functools.cache
def code_digest() -> str:
    """SHA-256 over the Python sources of `pipeline` and of `stages` beside it (one distribution installs
    both in one place; pipeline never imports stages), wherever they are installed."""
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for source in sorted([*(root / "pipeline").rglob("*.py"), *(root / "stages").rglob("*.py")]):
        digest.update(source.relative_to(root).as_posix().encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()


def checkpoint_dir(params: Params, stage: str, key: str) -> tuple[Path, str | None]:
    """The stage's Trainer scratch directory and the checkpoint to resume from, if any.

    A checkpoint is only resumed when it was written for the same params, data and code (`key`, from
    `fingerprint`); otherwise the directory is cleared so a stale run can never leak into a new one.
    """
    directory = params.path(params.paths.checkpoints) / stage
    stamp = directory / "fingerprint.txt"
    matches = stamp.is_file() and stamp.read_text().strip() == key
    if int(os.environ.get("RANK", "0")) == 0:  # under DDP only rank 0 clears and stamps the directory
        if directory.exists() and not matches:
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        stamp.write_text(key + "\n")
        for checkpoint in sorted(directory.glob("checkpoint-*")):
            if checkpoint.is_dir() and not complete_checkpoint(checkpoint):
                log.warning("removing the incomplete checkpoint %s (a run was stopped while writing it)", checkpoint)
                shutil.rmtree(checkpoint)
            elif checkpoint.is_dir() and (changed := changed_files(checkpoint)):
                log.warning("removing the checkpoint %s: %s changed since it was saved (digests in %s); training "
                            "resumes from an intact one or from the start", checkpoint, changed, DIGESTS_FILE)
                shutil.rmtree(checkpoint)
    last = get_last_checkpoint(str(directory)) if matches and directory.is_dir() else None
    if last:
        log.info("resuming from %s (written by an interrupted run with the same params)", last)
    return directory, last


def complete_checkpoint(checkpoint: Path) -> bool:
    """True when the Trainer state and the model weights of `checkpoint` exist and load."""
    from safetensors import safe_open

    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        index = checkpoint / "model.safetensors.index.json"
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
            "model.safetensors"
        ]
        for shard in shards:
            with safe_open(str(checkpoint / shard), framework="pt") as weights:
                weights.keys()  # opening checks the header against the file size: truncation fails
        return True
    except Exception:  # missing, truncated or unparsable (safetensors raises its own error type)
        return False


def record_digests(checkpoint: Path) -> None:
    """Record the SHA-256 of every file of a checkpoint just saved, written last: its presence also says
    the checkpoint was saved completely."""
    digests = {path.name: sha256_file(path) for path in sorted(checkpoint.iterdir()) if path.is_file()}
    write_json(checkpoint / DIGESTS_FILE, digests)


def changed_files(checkpoint: Path) -> list[str]:
    """The files of `checkpoint` that are missing or differ from the digests recorded when it was saved
    (all of it when there are none: saved by an older version, or stopped before they were written)."""
    try:
        digests = read_json(checkpoint / DIGESTS_FILE)
    except (OSError, ValueError):
        return [f"{DIGESTS_FILE} (missing or unreadable)"]
    return [name for name, digest in digests.items()
            if not (checkpoint / name).is_file() or sha256_file(checkpoint / name) != digest]


def finish(trainer: Trainer, directory: Path) -> None:
    """Remove the scratch checkpoints once the final model is safely written."""
    del trainer
    shutil.rmtree(directory, ignore_errors=True)
