"""One rank of the sharded cache / text / embedding test; launch:
``torchrun --standalone --nproc_per_node 2 dist_cache_worker.py COHORT CACHE OUT [RUN]``.

Every rank builds the feature cache of the tiny model (each writes its own shard), starts on it a second time, builds
the text features, and (with RUN) embeds the run's cohort sharded. It counts, per rank, the calls of the expensive
steps (the cache key that stats every image, SHA-256 of cache files, the text tower) and writes them to
OUT/rank{r}.json; rank 0 also writes the features, text features and embeddings it got.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from emclip.data import load_cohort
from emclip.model import build_model
from emclip.train import cache as cache_mod
from emclip.train import text_cache


TARGETS = ((cache_mod, "cache_key"), (cache_mod, "file_sha256"), (text_cache, "_encode"))


def counting(fn, counts: dict):
    """``fn()`` with every call of TARGETS counted into ``counts``."""
    originals = [getattr(module, name) for module, name in TARGETS]

    def wrap(name, original):
        def wrapper(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return original(*args, **kwargs)
        return wrapper

    for (module, name), original in zip(TARGETS, originals):
        setattr(module, name, wrap(name, original))
    try:
        return fn()
    finally:
        for (module, name), original in zip(TARGETS, originals):
            setattr(module, name, original)


def main(cohort_dir: str, cache_dir: str, out_dir: str, run_dir: str | None = None) -> None:
    acc = Accelerator(cpu=True)
    out = Path(out_dir)
    phases: dict[str, dict] = {"build": {}, "restart": {}, "text": {}}
    torch.manual_seed(0)
    model = build_model("tiny", lock_image=True, lock_text=True).eval()
    cohort = load_cohort(cohort_dir)
    build = lambda: cache_mod.build_feature_cache(model, cohort, cache_dir, acc, batch_size=4)  # noqa: E731
    cache = counting(build, phases["build"])
    again = counting(build, phases["restart"])
    text = counting(lambda: text_cache.TextFeatures.build(model, cohort, 8, Path(cache_dir) / "text",
                                                          accelerator=acc), phases["text"])
    emb = None
    if run_dir:
        from emclip.evaluation.runs import embed_run
        emb = embed_run(run_dir, batch_size=3, accelerator=acc)
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(
        {"phases": phases, "same_folder": str(cache.path) == str(again.path), "emb_is_none": emb is None}))
    if acc.is_main_process:
        np.save(out / "features.npy", np.asarray(again.features))
        np.save(out / "text.npy", text.features.numpy())
        if emb is not None:
            emb.save(out / "embeddings.npz")
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
