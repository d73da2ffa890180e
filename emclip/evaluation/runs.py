"""A trained run as evaluation sees it: its verified checkpoint, its model, its cohort's embeddings, its prompts and
the supervised bound on its cached features (``evaluation.cached.evaluate_run`` puts them together)."""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ..data import BagDataset, ImageTransform, collate_bags
from ..paths import resolve, write_text_atomic
from ..train.cache import build_feature_cache
from ..train.checkpoint import load_model_weights, resolve_checkpoint
from ..train.collective import gather_to_main
from ..train.config import TrainConfig
from ..train.loop import build_run_model
from ..train.runinfo import load_run_cohort
from ..train.text_cache import CachedTextModel, TextFeatures
from . import bounds
from .embeddings import Embeddings, default_device, embed_cohort
from .zeroshot import load_prompts, prompts_from_diagnoses

__all__ = ["prompt_classes", "run_checkpoint", "load_run_model", "embed_run", "shard_patients", "supervised_bound",
           "bag_features", "stored_bound"]


def prompt_classes(cohort):
    """The bundled renal prompts when they cover the cohort's diagnoses. When they cover only some, the cohort's
    classes keep the curated synonyms and templates of those they share, and a warning names the others (they are
    prompted by their name alone); with none shared, the classes and generic templates come from the cohort."""
    renal = load_prompts("renal_em")
    dx = {str(d) for d in cohort.reports.diagnosis.dropna()}
    if dx and dx <= set(renal.classes):
        return renal
    shared = dx & set(renal.classes)
    if not shared:
        return None
    others = sorted(dx - shared)
    warnings.warn(f"zero-shot prompts: {len(others)} diagnosis value(s) are not among the bundled renal classes and "
                  f"are prompted by name only: {', '.join(repr(o) for o in others)}", UserWarning, stacklevel=2)
    return prompts_from_diagnoses(dx, known=renal, templates=renal.templates)


def run_checkpoint(run_dir: str | Path, checkpoint: str = "best") -> Path:
    """The checkpoint folder ``load_run_model`` reads, verified: ``best`` (or ``latest``, or a step folder's name);
    a missing or damaged one is an error or a named substitute, never a silent one."""
    return resolve_checkpoint(resolve(run_dir) / "checkpoints", checkpoint, log=print)


def load_run_model(run_dir: str | Path, checkpoint: str | Path = "best", device: str | torch.device | None = None):
    """The trained model of a run (its verified ``best`` checkpoint, see :func:`run_checkpoint`, or a checkpoint
    folder that caller resolved with it) and its config, on ``device`` (default: the accelerator when one is present,
    else the CPU)."""
    run = resolve(run_dir)
    cfg = TrainConfig(**json.loads((run / "config.json").read_text()))
    model = build_run_model(cfg)
    ckpt = checkpoint if isinstance(checkpoint, Path) else run_checkpoint(run, checkpoint)
    load_model_weights(model, ckpt, verify=False)   # run_checkpoint has verified it
    return model.to(device if device is not None else default_device()).eval(), cfg


def shard_patients(n_patients: int, batch_size: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous block of patients, cut at batch boundaries: every batch is the one a single process
    would form, so the gathered embeddings are identical to a single-process run's, not merely close."""
    n_batches = -(-n_patients // batch_size)
    first, last = n_batches * rank // world, n_batches * (rank + 1) // world
    return range(first * batch_size, min(last * batch_size, n_patients))


def embed_run(run_dir: str | Path, batch_size: int = 32, model=None, cfg: TrainConfig | None = None,
              cohort=None, cache_key: str | None = None, accelerator=None) -> Embeddings | None:
    """Embed every patient of the run's cohort with its best model (cached trunk features in cache mode).

    ``model``, ``cfg`` and ``cohort`` (and the feature ``cache_key``) may be passed when the caller already has them.
    With an ``accelerator`` of several processes (every process calls this, with the model on its device), each
    process embeds its own block of patients, the cache and text features are checked and built by the main process,
    and the main process receives all embeddings, identical to one process's (the others get None)."""
    if model is None or cfg is None:
        model, cfg = load_run_model(run_dir, device=None if accelerator is None else accelerator.device)
    cohort = cohort if cohort is not None else load_run_cohort(cfg)
    if cfg.mode == "cache":
        cache = build_feature_cache(model, cohort, cfg.cache_path, accelerator, key=cache_key)
        ds = BagDataset(cohort, None, features=cache.features, feature_zoom=cache.zoom)
    else:
        ds = BagDataset(cohort, None, transform=ImageTransform.from_preprocess(model.preprocess))
    if cfg.lock_text:   # the frozen text transformer's report features are cached like the image features
        model = CachedTextModel(model, TextFeatures.build(model, cohort, cfg.eval_batch_size, cfg.cache_path,
                                                          accelerator=accelerator))
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    mine = shard_patients(len(ds), batch_size, rank, world)
    splits = dict(zip(cohort.reports.patient_id, cohort.reports.split))
    part = None
    if len(mine):
        loader = DataLoader(ds if world == 1 else Subset(ds, mine), batch_size=batch_size, collate_fn=collate_bags)
        part = embed_cohort(model, loader, split=splits, meta={"run_dir": str(resolve(run_dir)), **cfg.to_dict(),
                                                               "labels": cohort.summary()["labels"]})
    parts = gather_to_main(accelerator, part)
    return None if parts is None else Embeddings.concat([p for p in parts if p is not None])


def bag_features(cache, cohort, patient_ids) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each patient's cached trunk features (rows of ``cache``, which belongs to ``cohort``) and their physical
    scales (nm/px times the cache's zoom), in ``patient_ids`` order: the inputs of ``bounds.supervised_mil``."""
    feats, scales = [], []
    nm_per_pixel = cohort.images.nm_per_pixel.to_numpy()
    for pid in patient_ids:
        rows = cohort.bag(str(pid)).index.to_numpy()
        feats.append(np.asarray(cache.features[rows], dtype=np.float32))
        zoom = 1.0 if cache.zoom is None else np.asarray(cache.zoom[rows])
        scales.append(nm_per_pixel[rows] * zoom)
    return feats, scales


def stored_bound(cfg: TrainConfig, identity: list, compute) -> dict:
    """``compute()``, kept in ``<cache_dir>/bounds/`` under a digest of ``identity`` (with the bounds code): the
    supervised bound depends on features, labels and splits only, so every arm of an ablation shares it."""
    key = hashlib.sha256(json.dumps(identity).encode() + Path(bounds.__file__).read_bytes())
    out = cfg.cache_path / "bounds" / f"supervised_mil-{key.hexdigest()[:20]}.json"
    if out.is_file():
        return json.loads(out.read_text())
    result = compute()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result))
    return result


def supervised_bound(model, cfg: TrainConfig, cohort, emb: Embeddings, classes: list[str], split: str = "test",
                     cache_key: str | None = None):
    """The supervised MIL upper bound (``evaluation.bounds.supervised_mil``) on the run's cached trunk features.

    It does not depend on the contrastive model, only on the features, labels and splits, so it is computed once
    and kept in ``<cache_dir>/bounds/`` (every arm of an ablation shares it). None in end-to-end mode (no cache)."""
    if cfg.mode != "cache":
        return {"skipped": "end-to-end run: no cached trunk features"}
    cache = build_feature_cache(model, cohort, cfg.cache_path, key=cache_key)
    y = np.array([classes.index(d) if d in classes else -1 for d in emb.diagnosis])

    def compute():
        feats, scales = bag_features(cache, cohort, emb.patient_ids)
        return bounds.supervised_mil(feats, scales, y, emb.split, len(classes), emb.patient_ids, test_split=split)
    return stored_bound(cfg, [cache.path.name, split, classes, emb.patient_ids.tolist(), y.tolist(),
                              emb.split.tolist()], compute)
