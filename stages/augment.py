"""New unlabelled texts for the KD students, made offline from the training and transfer texts (never
from validation or test) by masking words, sampling n-grams and replacing words by their nearest
neighbours in the verified teacher's input-embedding space (pipeline/data/augment.py). The teacher
labels them next (stage teacher_logits). With transfer.augment.enabled false it writes an empty set,
so the DAG's shape does not change."""

from __future__ import annotations

import logging
import time
from typing import Any

from tqdm.auto import tqdm

from pipeline.config import Params
from pipeline.data import augment
from pipeline.data.normalize import LeakGuard
from pipeline.data.prepared import load_prepared
from pipeline.io import atomic_dir
from pipeline.stage import Stage

log = logging.getLogger(__name__)


def run(params: Params) -> dict[str, Any]:
    """Read paths.prepared and paths.teacher; write paths.augmented."""
    cfg = params.transfer.augment
    prepared = load_prepared(params.path(params.paths.prepared))
    sources = prepared.texts("train") + prepared.transfer_texts()
    rows: list[dict[str, Any]] = []
    stats = augment.AugmentStats()
    if cfg.enabled:
        start = time.perf_counter()
        neighbours = None
        if "neighbours" in cfg.methods:
            # Here, not at the top: with augmentation off (the default) the stage starts without transformers (~5 s).
            from pipeline.models import load_trained_with_tokenizer

            teacher, tokenizer = load_trained_with_tokenizer(params.path(params.paths.teacher), prepared.label_names)
            embeddings = teacher.get_input_embeddings().weight.detach().float().numpy()
            neighbours = augment.Neighbours(embeddings, tokenizer.get_vocab(), augment.words_of(sources), cfg.neighbours)
            log.info("nearest neighbours of %d corpus words in %.1f s", len(neighbours.neighbours), time.perf_counter() - start)
        # Every held-out text (validation and test) in every spelling: a made text equal to one is dropped.
        heldout = LeakGuard({split: prepared.texts(split) for split in ("validation", "test")})
        with tqdm(total=len(sources), desc="augmenting", unit="text") as bar:
            rows, stats = augment.augment(
                sources, methods=cfg.methods, n_per_text=cfg.n_per_text, max_texts=cfg.max_texts, seed=cfg.seed,
                heldout=heldout, existing=sources, neighbours=neighbours, mask_ratio=cfg.mask_ratio,
                replace_ratio=cfg.replace_ratio, ngram_min_ratio=cfg.ngram_min_ratio, progress=bar.update,
            )
        log.info("augmented: %d texts kept from %d sources (%s); dropped %d equal to a validation or test text, "
                 "%d duplicates, %d over the cap", len(rows), len(sources), stats.kept, stats.dropped_heldout,
                 stats.dropped_duplicate, stats.dropped_cap)
        for example in stats.heldout_examples:
            log.info("augment: dropped %s", example)
    with atomic_dir(params.path(params.paths.augmented)) as tmp:
        augment.write_augmented(tmp, rows, stats, cfg.model_dump(mode="json"))
    return {"enabled": int(cfg.enabled), "sources": len(sources), **stats.as_metrics()}


STAGE = Stage("augment", run, sections=("transfer",), outputs=("augmented",))

if __name__ == "__main__":
    STAGE.main()
