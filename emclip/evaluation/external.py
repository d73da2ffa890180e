"""External validation: a trained run scored on another hospital's cohort with the whole evaluation protocol.

Every patient of the external cohort is scored (its own split column, if any, is ignored): they all get the split
name ``"external"`` and are evaluated beside the run's own train and val patients, which only the methods that
learn from labels see — the linear and few-shot probes and the supervised MIL bound are fitted on them, the optimal
transport prior is their class frequency — so no external label reaches a fit. Zero-shot uses the run's own
classes and prompts; an external diagnosis outside them is counted as excluded. Retrieval is among the external
patients. ``evaluation.cached.evaluate_run(run, data_dir=...)`` is the entry point.

Two cohorts may share patient ids (both synthetic cohorts start at P00001): the run's own patients are renamed
with a prefix no external id starts with, inside the evaluation only, so the outputs keep the external ids.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import load_cohort
from ..paths import resolve
from ..train.cache import build_feature_cache, feature_cache_key
from ..train.config import TrainConfig
from . import bounds
from .embeddings import Embeddings
from .runs import bag_features, embed_run, stored_bound
from .settings import EXTERNAL_SPLIT

__all__ = ["ExternalCohort", "load_external_cohort", "external_folder", "embed_external", "combine_for_external",
           "external_supervised_bound", "external_record", "is_inside", "INTERNAL_PREFIX"]

INTERNAL_PREFIX = "internal:"   # the run's own patients' ids in a combined evaluation start with it (or "_" + it)


@dataclass
class ExternalCohort:
    """Another hospital's cohort as a run evaluates it: its folder, the loaded cohort (diagnoses given or derived
    with the run's labeler settings) and, in cache mode, the key of its trunk-feature cache."""
    root: Path
    cohort: object
    feature_key: str | None

    @property
    def name(self) -> str:
        return self.root.name


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` is ``folder`` or below it (symbolic links resolved)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def load_external_cohort(data_dir: str | Path, cfg: TrainConfig, model=None) -> ExternalCohort:
    """Load ``data_dir`` under the same contract as a training cohort, with the run's labeler settings (``cfg``) for
    diagnoses not given. Refuses the run's own cohort (its test split is the internal evaluation) and a folder that
    would receive the run's caches or evaluation (nothing is ever written into a cohort folder)."""
    root = resolve(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"external cohort {root} does not exist (data_dir names a cohort folder: "
                                f"images.csv + reports.csv)")
    if root == cfg.data_path.resolve():
        raise ValueError(f"data_dir {root} is the run's own cohort: evaluate it without data_dir (its test split); "
                         f"external validation needs another cohort")
    for what, path in (("run folder", cfg.run_path), ("feature cache", cfg.cache_path)):
        if is_inside(path, root):
            raise ValueError(f"the run's {what} {path} is inside the external cohort {root}: evaluating would write "
                             f"into the cohort folder; move the run or its cache_dir elsewhere")
    # every patient is scored, so a split left empty by the cohort's own split column is no problem
    cohort = load_cohort(root, check_images="exists", seed=cfg.data_seed, labels=cfg.label_options(),
                         require_splits=False)
    key = feature_cache_key(model, cohort) if cfg.mode == "cache" and model is not None else None
    return ExternalCohort(root, cohort, key)


def external_folder(root: str | Path) -> str:
    """The evaluation's folder name inside the run: ``eval-external-<cohort folder name>`` (relative paths taken
    from the project root; characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``)."""
    return "eval-external-" + re.sub(r"[^A-Za-z0-9._-]", "_", resolve(root).name)


def embed_external(run_dir: str | Path, model, cfg: TrainConfig, external: ExternalCohort) -> Embeddings:
    """Every external patient embedded by the run's model (trunk features cached in the run's cache_dir in cache
    mode, keyed by the image files: never in the cohort folder), all in the split ``"external"``."""
    emb = embed_run(run_dir, model=model, cfg=cfg, cohort=external.cohort, cache_key=external.feature_key)
    emb.split = np.array([EXTERNAL_SPLIT] * emb.n_patients, dtype=np.str_)
    emb.meta = {**emb.meta, "external": str(external.root)}
    return emb


def _free_prefix(external_ids) -> str:
    """A prefix that no external id starts with: renamed internal ids can then never equal an external one."""
    prefix = INTERNAL_PREFIX
    while any(str(p).startswith(prefix) for p in external_ids):
        prefix = "_" + prefix
    return prefix


@dataclass
class Combined:
    """The external patients (ids unchanged, split ``"external"``) followed by the run's own train and val patients
    (ids prefixed); ``original_ids`` are every row's id in its own cohort."""
    embeddings: Embeddings
    original_ids: np.ndarray
    prefix: str


def combine_for_external(internal: Embeddings, external: Embeddings) -> Combined:
    """One :class:`Embeddings` for ``evaluate(..., split="external")``: the external patients to score, and the
    run's train and val patients for the probe, the few-shot probe and the train prior (its test patients are
    not needed). Image rows are re-indexed; the meta is the external embeddings'."""
    if external.n_patients == 0:
        raise ValueError("the external cohort has no patient to score")
    learn = np.isin(internal.split, ["train", "val"])
    keep = _rows(internal, learn)
    prefix = _free_prefix(external.patient_ids)
    original = np.concatenate([external.patient_ids, keep.patient_ids])
    keep.patient_ids = np.asarray([prefix + p for p in keep.patient_ids], dtype=np.str_)
    combined = Embeddings.concat([external, keep])
    combined.meta = dict(external.meta)
    return Combined(combined, original, prefix)


def _rows(emb: Embeddings, keep: np.ndarray) -> Embeddings:
    """The patients where ``keep`` is True, with their images (image rows re-indexed)."""
    return emb.take(keep)


def external_supervised_bound(model, cfg: TrainConfig, cohort, feature_key: str | None, external: ExternalCohort,
                              combined: Combined, classes: list[str]) -> dict:
    """The supervised MIL bound trained on the run's own train patients (val for stopping), on their cached trunk
    features, and applied to the external patients' cached features (cache mode only)."""
    if cfg.mode != "cache":
        return {"skipped": "end-to-end run: no cached trunk features"}
    emb = combined.embeddings
    internal_cache = build_feature_cache(model, cohort, cfg.cache_path, key=feature_key)
    external_cache = build_feature_cache(model, external.cohort, cfg.cache_path, key=external.feature_key)
    y = np.array([classes.index(d) if d in classes else -1 for d in emb.diagnosis])
    is_external = emb.split == EXTERNAL_SPLIT

    def compute():
        feats, scales = [None] * emb.n_patients, [None] * emb.n_patients
        for rows, cache, source in ((np.flatnonzero(is_external), external_cache, external.cohort),
                                    (np.flatnonzero(~is_external), internal_cache, cohort)):
            f, s = bag_features(cache, source, combined.original_ids[rows])
            for i, fi, si in zip(rows, f, s):
                feats[i], scales[i] = fi, si
        return bounds.supervised_mil(feats, scales, y, emb.split, len(classes), emb.patient_ids,
                                     test_split=EXTERNAL_SPLIT)
    return stored_bound(cfg, [internal_cache.path.name, external_cache.path.name, EXTERNAL_SPLIT, classes,
                              emb.patient_ids.tolist(), y.tolist(), emb.split.tolist()], compute)


def external_record(external: ExternalCohort, emb: Embeddings) -> dict:
    """metrics.json ``external``: the cohort folder, its patients and images scored, and where its diagnoses came
    from (the cohort's label summary under the run's labeler settings)."""
    return {"data_dir": str(external.root), "name": external.name, "n_patients": int(emb.n_patients),
            "n_images": int(emb.n_images), "labels": dict(external.cohort.labels)}
