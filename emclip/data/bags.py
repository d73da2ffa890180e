"""Patient bags: a dataset yielding one patient's images (or cached features), scales and report, and a collate
that pads variable bags into a batch with a boolean mask."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .cohort import Cohort
from .images import ImageTransform, load_transformed

PAD_SCALE = 1.0   # nm/px written at padded positions (log = 0); masked out, so any finite value works


class BagDataset(Dataset):
    """One item per patient of ``split`` (all patients when None).

    With ``transform`` items carry ``images`` (n, C, H, W); with ``features`` (an array indexed by image row of
    ``cohort.images``, e.g. a memory-mapped feature cache) items carry ``features`` (n, F) instead.
    ``max_instances`` samples at most k images per bag, deterministically from (seed, epoch, patient index):
    call :meth:`set_epoch` each epoch to draw a new subset. ``patients`` (ids, in order) replaces ``split``: a
    chunk of a large cohort embedded a part at a time.
    """

    def __init__(self, cohort: Cohort, split: str | None = None, transform: ImageTransform | None = None,
                 features=None, feature_zoom=None, max_instances: int | None = None, seed: int = 0,
                 intensity: str = "dtype", color: str = "gray", random_crop: bool = False,
                 patients: list[str] | None = None):
        if (transform is None) == (features is None):
            raise ValueError("give exactly one of transform (pixels) or features (cached trunk outputs)")
        if max_instances is not None and max_instances < 1:
            raise ValueError(f"max_instances must be >= 1 or None, got {max_instances}")
        self.cohort, self.split = cohort, split
        self.patients = cohort.patient_ids(split) if patients is None else [str(p) for p in patients]
        if not self.patients:
            raise ValueError(f"cohort {cohort.root} has no patients in split {split!r}")
        self.transform, self.features = transform, features
        # zoom applied to each image when its features were cached (effective scale = nm/px x zoom)
        self.feature_zoom = None if feature_zoom is None else np.asarray(feature_zoom, np.float32)
        self.max_instances, self.seed, self.epoch = max_instances, seed, 0
        self.intensity, self.color, self.random_crop = intensity, color, random_crop
        # plain arrays, read once: pandas row lookups cost ~2 ms per bag, as much as a cache-mode training step
        groups = cohort._groups
        self._rows = [np.asarray(groups.get(pid, ()), dtype=np.int64) for pid in self.patients]
        self._nm = cohort.images.nm_per_pixel.to_numpy(np.float32)
        self._paths = cohort.images.path.to_numpy(object)
        reports = cohort.reports.set_index("patient_id").loc[self.patients]
        self._texts = reports.report.tolist()
        self._diagnoses = [None if pd.isna(d) else d for d in reports.diagnosis]
        sources = reports.diagnosis_source if "diagnosis_source" in reports.columns else [None] * len(reports)
        self._sources = [src if isinstance(src, str) else ("given" if d else "none")
                         for src, d in zip(sources, self._diagnoses)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.patients)

    def _select(self, index: int, n: int) -> np.ndarray:
        if self.max_instances is None or n <= self.max_instances:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return np.sort(rng.choice(n, self.max_instances, replace=False))

    def __getitem__(self, index: int) -> dict:
        pid = self.patients[index]
        rows = self._rows[index]
        if len(rows) == 0:
            raise ValueError(f"patient {pid} has an empty bag (no images)")
        rows = rows[self._select(index, len(rows))]
        image_index = torch.from_numpy(rows.copy())
        nm = torch.from_numpy(self._nm[rows])
        paths = self._paths[rows].tolist()
        item = {"patient_id": pid, "nm_per_pixel": nm, "image_index": image_index, "image_paths": paths,
                "report": self._texts[index], "diagnosis": self._diagnoses[index],
                "diagnosis_source": self._sources[index]}
        if self.features is not None:
            item["features"] = torch.tensor(np.asarray(self.features[rows]), dtype=torch.float32)
            zoom = 1.0 if self.feature_zoom is None else torch.from_numpy(self.feature_zoom[rows])
            item["scales"] = nm * zoom
        else:
            rng = np.random.default_rng([self.seed, self.epoch, index, 1]) if self.random_crop else None
            tensors, zooms = [], []
            for path in paths:
                t, z = load_transformed(path, self.transform, self.intensity, self.color, rng)
                tensors.append(t)
                zooms.append(z)
            item["images"] = torch.stack(tensors)
            item["scales"] = nm * torch.tensor(zooms, dtype=torch.float32)
        return item


def collate_bags(items: list[dict], padded: bool = True) -> dict:
    """Pad bags to the longest in the batch.

    Returns ``images`` (B, K, C, H, W) or ``features`` (B, K, F), ``scales`` (B, K) effective nm/px,
    ``nm_per_pixel`` (B, K), ``mask`` (B, K) True for real images, ``image_index`` (B, K) with -1 at padding,
    and the lists ``reports``, ``patient_ids``, ``diagnoses``, ``image_paths``.

    ``padded=False`` (cached features only) gives ``packed_features`` (N, F), the bags' rows concatenated in mask
    order, instead of ``features``: what ``EMClip.encode_bags`` computes on, without building the padded copy it
    would only gather the real rows back out of. Images are always padded.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    key = "features" if "features" in items[0] else "images"
    sizes = [len(it[key]) for it in items]
    empty = [it["patient_id"] for it, n in zip(items, sizes) if n == 0]
    if empty:
        raise ValueError(f"empty bag(s) for patient(s) {', '.join(empty)}: every patient needs at least one image")
    b, k = len(items), max(sizes)
    first = items[0][key]
    pack = key == "features" and not padded
    data = torch.cat([it[key] for it in items]) if pack else first.new_zeros((b, k, *first.shape[1:]))
    scales = torch.full((b, k), PAD_SCALE, dtype=torch.float32)
    nm = torch.full((b, k), PAD_SCALE, dtype=torch.float32)
    mask = torch.zeros((b, k), dtype=torch.bool)
    index = torch.full((b, k), -1, dtype=torch.long)
    for i, (it, n) in enumerate(zip(items, sizes)):
        if not pack:
            data[i, :n] = it[key]
        scales[i, :n] = it["scales"]
        nm[i, :n] = it["nm_per_pixel"]
        mask[i, :n] = True
        index[i, :n] = it["image_index"]
    return {"packed_features" if pack else key: data, "scales": scales, "nm_per_pixel": nm, "mask": mask,
            "image_index": index,
            "reports": [it["report"] for it in items], "patient_ids": [it["patient_id"] for it in items],
            "diagnoses": [it["diagnosis"] for it in items], "image_paths": [it["image_paths"] for it in items],
            "diagnosis_sources": [it.get("diagnosis_source", "given" if it.get("diagnosis") else "none")
                                  for it in items]}  # items built by hand (benchmarks) may not say
