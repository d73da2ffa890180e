"""On-disk, memory-mapped feature cache of a frozen image trunk.

Per-image trunk features are extracted once (sharded over processes: rank r takes images r, r + W, ...) into
``<cache_dir>/<key>/features.npy`` (float32, memory-mapped, one row per row of ``images.csv``) with the geometric
zoom of each image in ``zoom.npy``. ``meta.json`` is written last, atomically, with the SHA-256 of both arrays.

The key hashes the trunk (architecture + weights digest), the preprocessing, the resize/crop policy and every image
file's identity from one ``stat``: path, size, modification time, inode and status-change time. The last catches an
image rewritten in place with the same size whose modification time was set back (``touch``/``utime`` cannot set
ctime), so a cache is reused by every run with the same trunk and inputs and is never used for anything else. A cache
whose meta is missing or unreadable, whose key differs, whose file is missing, truncated, fails its checksum or
cannot be opened as the array the meta describes is reported (naming the file) and rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..digests import file_sha256
from ..progress import bars_disabled
from ..data import Cohort, ImageTransform
from ..data.images import load_transformed
from ..data.prefetch import thread_map
from ..data.resample import single_threaded_blas
from .checkpoint import write_text_atomic

CACHE_VERSION = 2   # 2: image identity includes inode and ctime


class _ImageRows(Dataset):
    """The images of the cache build, one row each. The DataLoader fetches a batch through ``__getitems__``, which
    loads its images in threads: with ``num_workers=0`` the trunk is idle meanwhile, so its cores load them."""

    def __init__(self, paths: list[str], indices: list[int], transform: ImageTransform, intensity: str, color: str):
        self.paths, self.indices, self.transform = paths, indices, transform
        self.intensity, self.color = intensity, color

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        row = self.indices[i]
        tensor, zoom = load_transformed(self.paths[row], self.transform, self.intensity, self.color)
        return tensor, torch.tensor(zoom, dtype=torch.float32), torch.tensor(row)

    def __getitems__(self, indices: list[int]) -> list:
        with single_threaded_blas():   # once per batch: each loading thread's products on one core
            return thread_map(self.__getitem__, indices)


@dataclass
class FeatureCache:
    path: Path
    features: np.ndarray      # (N, F) float32 memmap, row i = images.csv row i of the cohort
    zoom: np.ndarray          # (N,) source pixels per model pixel
    meta: dict

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def _image_identity(h, cohort: Cohort) -> None:
    for path in cohort.images.path:   # one stat per image, no reading: the key must stay cheap at 600k images
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_ctime_ns}\n".encode())


def image_files_digest(cohort: Cohort) -> str:
    """Digest of every image file's identity (path, size, mtime, inode, ctime): changes when any image is
    replaced or rewritten, even with the same size and its modification time set back."""
    h = hashlib.sha256(b"image files\n")
    _image_identity(h, cohort)
    return h.hexdigest()[:20]


def cache_key(trunk_id: str, transform: ImageTransform, cohort: Cohort, intensity: str, color: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "trunk": trunk_id, "size": transform.image_size,
                         "mean": transform.mean.flatten().tolist(), "std": transform.std.flatten().tolist(),
                         "channels": transform.channels, "policy": transform.policy, "intensity": intensity,
                         "color": color}, sort_keys=True).encode())
    _image_identity(h, cohort)
    return h.hexdigest()[:20]


def feature_cache_key(model, cohort: Cohort, policy: str = "resize", intensity: str = "dtype",
                      color: str = "gray") -> str:
    """The key ``build_feature_cache`` uses for (model trunk, cohort) with the same options."""
    return cache_key(model.trunk_id, ImageTransform.from_preprocess(model.preprocess, policy), cohort, intensity,
                     color)


def check_cache(folder: Path, key: str, n_images: int) -> tuple[bool, str]:
    """(usable, reason): a cache is usable only if complete, keyed identically, untruncated and checksummed."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return False, "no meta.json (extraction never finished)"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:     # JSONDecodeError, UnicodeDecodeError
        return False, f"meta.json is corrupt ({err})"
    if not isinstance(meta, dict):
        return False, f"meta.json is corrupt (a JSON {type(meta).__name__}, not an object)"
    if meta.get("key") != key or meta.get("n_images") != n_images:
        return False, "stale: trunk, preprocessing or images changed"
    try:
        for name in ("features.npy", "zoom.npy"):
            f = folder / name
            if not f.is_file() or f.stat().st_size != meta["bytes"][name]:
                return False, f"{name} is missing or truncated"
            if file_sha256(f) != meta["sha256"][name]:
                return False, f"{name} fails its checksum (corrupt)"
        dim = int(meta["dim"])
    except (KeyError, TypeError, ValueError) as err:
        return False, f"meta.json is corrupt (bad or missing entry: {type(err).__name__}: {err})"
    for name, shape in (("features.npy", (n_images, dim)), ("zoom.npy", (n_images,))):
        try:
            arr = np.load(folder / name, mmap_mode="r")
        except Exception as err:     # a header numpy cannot parse
            return False, f"{name} cannot be opened ({type(err).__name__}: {err})"
        if arr.shape != shape or arr.dtype != np.float32:
            return False, f"{name} holds {arr.dtype} of shape {arr.shape}, not float32 of shape {shape}"
        del arr
    return True, "ok"


def build_feature_cache(model, cohort: Cohort, cache_dir: str | Path, accelerator=None, batch_size: int = 64,
                        num_workers: int = 0, policy: str = "resize", intensity: str = "dtype",
                        color: str = "gray", log=print, key: str | None = None) -> FeatureCache:
    """Load the cache for (model trunk, cohort) or build it, sharded over ``accelerator``'s processes.

    ``key`` may be passed when the caller already computed ``cache_key`` for the same arguments (it stats every
    image)."""
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    is_main = rank == 0
    transform = ImageTransform.from_preprocess(model.preprocess, policy)
    key = key or cache_key(model.trunk_id, transform, cohort, intensity, color)
    folder = Path(cache_dir) / key
    n = len(cohort.images)
    ok, reason = check_cache(folder, key, n)
    if not ok:
        if is_main:
            if folder.exists() or folder.is_symlink():
                log(f"feature cache {folder}: {reason}; rebuilding")
                if folder.is_dir() and not folder.is_symlink():
                    shutil.rmtree(folder)
                else:
                    folder.unlink()
            folder.mkdir(parents=True)
        _barrier(accelerator)
        _extract(model, cohort, folder, transform, rank, world, batch_size, num_workers, intensity, color, key,
                 accelerator, log)
    _barrier(accelerator)
    meta = json.loads((folder / "meta.json").read_text())
    features = np.load(folder / "features.npy", mmap_mode="r")
    zoom = np.load(folder / "zoom.npy")
    return FeatureCache(folder, features, zoom, meta)


def _barrier(accelerator) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


@torch.no_grad()
def _extract(model, cohort, folder, transform, rank, world, batch_size, num_workers, intensity, color, key,
             accelerator, log) -> None:
    n = len(cohort.images)
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    dim = int(model.encode_trunk(torch.zeros(1, transform.channels, transform.image_size, transform.image_size,
                                             device=device)).shape[-1])
    feat_path, zoom_path = folder / "features.npy", folder / "zoom.npy"
    if rank == 0:   # allocate both arrays once; every rank then fills its own rows in place
        np.lib.format.open_memmap(feat_path, mode="w+", dtype=np.float32, shape=(n, dim)).flush()
        np.lib.format.open_memmap(zoom_path, mode="w+", dtype=np.float32, shape=(n,)).flush()
    _barrier(accelerator)
    feats = np.load(feat_path, mmap_mode="r+")
    zooms = np.load(zoom_path, mmap_mode="r+")
    rows = list(range(rank, n, world))
    loader = DataLoader(_ImageRows(list(cohort.images.path), rows, transform, intensity, color),
                        batch_size=batch_size, num_workers=num_workers)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    for images, zoom, idx in tqdm(loader, desc=f"feature cache [{rank}/{world}]", unit="batch",
                                  disable=rank != 0 or bars_disabled()):
        out = model.encode_trunk(images.to(device)).float().cpu().numpy()
        feats[idx.numpy()] = out
        zooms[idx.numpy()] = zoom.numpy()
    feats.flush()
    zooms.flush()
    elapsed = time.perf_counter() - start
    model.train(was_training)
    del feats, zooms
    _barrier(accelerator)
    if rank == 0:
        meta = {"key": key, "version": CACHE_VERSION, "trunk": model.trunk_id, "n_images": n, "dim": dim,
                "preprocess": model.preprocess, "policy": transform.policy, "intensity": intensity, "color": color,
                "processes": world, "seconds": round(elapsed, 2), "images_per_second": round(n / max(elapsed, 1e-9), 2),
                "bytes": {f.name: f.stat().st_size for f in (feat_path, zoom_path)},
                "sha256": {f.name: file_sha256(f) for f in (feat_path, zoom_path)}}
        write_text_atomic(folder / "meta.json", json.dumps(meta, indent=2) + "\n")
        log(f"feature cache {folder}: {n} images x {dim} features in {elapsed:.1f} s "
            f"({meta['images_per_second']:.1f} images/s on rank 0's share)")
