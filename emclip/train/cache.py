"""On-disk, memory-mapped feature cache of a frozen image trunk, written in per-process shards.

Per-image trunk features are extracted once, sharded over processes: rank r of W takes a contiguous block of rows of
``images.csv`` and writes only its own files, ``<cache_dir>/<key>/features_rank{r}.npy`` (float32, one row per image
of its block) and ``zoom_rank{r}.npy`` (the geometric zoom of each image), so a multi-node build needs no shared
filesystem. ``manifest.json`` is written last, atomically: the shards with their rows, and every file's size and
SHA-256 (each rank hashes its own shard). The loader memory-maps the shards and reads them through one
:class:`ShardedRows` view (the row-wise concatenation, nothing copied into RAM); a cache built by 1 process and by 2
holds the same features.

The key hashes the trunk (architecture + weights digest), the preprocessing, the resize/crop policy and every image
file's identity from one ``stat``: path, size, modification time, inode and status-change time. The last catches an
image rewritten in place with the same size whose modification time was set back (``touch``/``utime`` cannot set
ctime), so a cache is reused by every run with the same trunk and inputs and is never used for anything else.

What is checked when, and by whom (issue 15): the key (600,000 stats) and the cache check run on the main process
only and their result is sent to the others. The full SHA-256 of every file runs at build, on an explicit
``verify=True``, and whenever a file's identity (size, mtime, ctime, inode) differs from the one recorded when it
was last hashed (``verified.json``); otherwise a start costs one ``stat`` per shard file. A write into a file, even
one of the same size with its mtime set back, changes its ctime, so it is hashed again and a corrupt file is caught;
only damage that bypasses the filesystem (bit rot under an unchanged inode) needs ``verify=True``. A cache whose
manifest is missing or unreadable, whose key differs, whose file is missing, truncated, fails its checksum or cannot
be opened as the array the manifest describes is reported (naming the file) and rebuilt. A single-file cache of the
previous format (``meta.json`` + ``features.npy``) is verified once in full and listed in a manifest as one shard
(no data copied); a damaged one is rebuilt.
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

from ..digests import file_identity, file_sha256
from ..progress import bars_disabled
from ..data import Cohort, ImageTransform
from ..data.images import load_transformed
from ..data.prefetch import thread_map
from ..data.resample import single_threaded_blas
from .checkpoint import write_text_atomic
from .collective import all_gather_objects, is_main, main_first

CACHE_VERSION = 2   # part of the key. 2: image identity includes inode and ctime
FORMAT = 3          # on-disk layout. 3: per-rank shards + manifest.json (2: one features.npy + meta.json)
MANIFEST, VERIFIED, OLD_META = "manifest.json", "verified.json", "meta.json"


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


class ShardedRows:
    """Row-wise concatenation of memory-mapped shards, read without copying them: ``view[rows]`` reads only the
    rows asked for (an int, a slice or an array of row numbers), ``np.asarray(view)`` materialises everything."""

    def __init__(self, shards: list[np.ndarray]):
        if not shards:
            raise ValueError("ShardedRows needs at least one shard")
        self.shards = shards
        self.starts = np.cumsum([0] + [len(s) for s in shards])
        self.shape = (int(self.starts[-1]),) + tuple(shards[0].shape[1:])
        self.dtype = shards[0].dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(sum(s.nbytes for s in self.shards))

    def __getitem__(self, rows):
        if isinstance(rows, (int, np.integer)):
            return self[np.array([rows])][0]
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(len(self)))
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = np.where(rows < 0, rows + len(self), rows).astype(np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        which = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty(rows.shape + self.shape[1:], dtype=self.dtype)
        for s in np.unique(which):
            hit = which == s
            out[hit] = self.shards[s][rows[hit] - self.starts[s]]
        return out

    def __array__(self, dtype=None, copy=None):
        whole = np.concatenate([np.asarray(s) for s in self.shards])
        return whole if dtype is None else whole.astype(dtype)


@dataclass
class FeatureCache:
    path: Path
    features: np.ndarray | ShardedRows   # (N, F) float32 memory-mapped, row i = images.csv row i of the cohort
    zoom: np.ndarray                     # (N,) source pixels per model pixel
    meta: dict                           # the manifest

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
                      color: str = "gray", accelerator=None) -> str:
    """The key ``build_feature_cache`` uses for (model trunk, cohort) with the same options, computed on the main
    process (it stats every image) and sent to the others."""
    transform = ImageTransform.from_preprocess(model.preprocess, policy)
    return main_first(accelerator, lambda: cache_key(model.trunk_id, transform, cohort, intensity, color))


def shard_bounds(n: int, world: int, batch_size: int = 1) -> list[tuple[int, int]]:
    """Rank r's contiguous block of rows [start, stop), cut at multiples of ``batch_size``: every batch of the trunk
    is one a single process would run, so any number of processes writes the same features, bit for bit."""
    n_batches = -(-n // batch_size)
    edges = [min(n_batches * r // world * batch_size, n) for r in range(world + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _read_verified(folder: Path) -> dict:
    try:
        stamps = json.loads((folder / VERIFIED).read_text())
        return stamps if isinstance(stamps, dict) else {}
    except (OSError, ValueError):   # missing or damaged: every file is hashed again, nothing else is lost
        return {}


def _write_verified(folder: Path, names) -> None:
    try:
        write_text_atomic(folder / VERIFIED, json.dumps({n: file_identity(folder / n) for n in names}) + "\n")
    except OSError:   # a read-only cache is still usable; the next start hashes again
        pass


def _check_files(folder: Path, files: dict, verify: bool) -> tuple[bool, str, bool]:
    """(ok, reason, hashed): every listed file present with its recorded size; its SHA-256 checked when ``verify``
    or when its identity differs from the one recorded at its last full check."""
    stamps = {} if verify else _read_verified(folder)
    hashed = False
    for name, rec in files.items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != rec["bytes"]:
            return False, f"{name} is missing or truncated", hashed
        if stamps.get(name) != file_identity(f):
            hashed = True
            if file_sha256(f) != rec["sha256"]:
                return False, f"{name} fails its checksum (corrupt)", hashed
    return True, "ok", hashed


def _check_array(path: Path, shape: tuple) -> str | None:
    try:
        arr = np.load(path, mmap_mode="r")
    except Exception as err:     # a header numpy cannot parse
        return f"{path.name} cannot be opened ({type(err).__name__}: {err})"
    if arr.shape != shape or arr.dtype != np.float32:
        return f"{path.name} holds {arr.dtype} of shape {arr.shape}, not float32 of shape {shape}"
    return None


def _read_json(path: Path) -> tuple[dict | None, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:     # JSONDecodeError, UnicodeDecodeError
        return None, f"{path.name} is corrupt ({err})"
    if not isinstance(data, dict):
        return None, f"{path.name} is corrupt (a JSON {type(data).__name__}, not an object)"
    return data, "ok"


def check_cache(folder: Path, key: str, n_images: int, verify: bool = False) -> tuple[bool, str]:
    """(usable, reason): a cache is usable only if complete, keyed identically, untruncated and checksummed
    (hashed in full when ``verify``, else only the files whose identity changed since they were last hashed)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        if (folder / OLD_META).is_file():
            return False, f"a single-file cache of format 2 ({OLD_META}, features.npy)"
        return False, f"no {MANIFEST} (extraction never finished)"
    manifest, why = _read_json(folder / MANIFEST)
    if manifest is None:
        return False, why
    if manifest.get("key") != key or manifest.get("n_images") != n_images:
        return False, "stale: trunk, preprocessing or images changed"
    try:
        dim, shards, files = int(manifest["dim"]), manifest["shards"], manifest["files"]
        expected, layout = 0, []
        for s in shards:
            start, stop = int(s["start"]), int(s["stop"])
            if start != expected or stop < start:
                return False, f"{MANIFEST} is corrupt (shards do not tile the rows at row {expected})"
            expected = stop
            layout += [(s["features"], (stop - start, dim)), (s["zoom"], (stop - start,))]
        if expected != n_images:
            return False, f"{MANIFEST} is corrupt (its shards hold {expected} rows, not {n_images})"
        listed = {name: {"bytes": int(files[name]["bytes"]), "sha256": str(files[name]["sha256"])}
                  for name, _ in layout}
        ok, reason, hashed = _check_files(folder, listed, verify)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        return False, f"{MANIFEST} is corrupt (bad or missing entry: {type(err).__name__}: {err})"
    if not ok:
        return False, reason
    for name, shape in layout:
        problem = _check_array(folder / name, shape)
        if problem:
            return False, problem
    if hashed:   # record what was just verified, so the next start needs no hashing
        _write_verified(folder, listed)
    return True, "ok"


def _adopt_single_file(folder: Path, key: str, n: int, log) -> tuple[bool, str]:
    """A format-2 cache (one features.npy + meta.json) checked as before (in full) and, when whole, listed in a
    manifest as one shard: read, not rebuilt."""
    meta, why = _read_json(folder / OLD_META)
    if meta is None:
        return False, why
    if meta.get("key") != key or meta.get("n_images") != n:
        return False, "stale: trunk, preprocessing or images changed"
    try:
        names = ("features.npy", "zoom.npy")
        files = {name: {"bytes": int(meta["bytes"][name]), "sha256": str(meta["sha256"][name])} for name in names}
        ok, reason, _ = _check_files(folder, files, verify=True)
        dim = int(meta["dim"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        return False, f"{OLD_META} is corrupt (bad or missing entry: {type(err).__name__}: {err})"
    if not ok:
        return False, reason
    for name, shape in zip(names, ((n, dim), (n,))):
        problem = _check_array(folder / name, shape)
        if problem:
            return False, problem
    manifest = {k: v for k, v in meta.items() if k not in ("bytes", "sha256")}
    manifest.update(format=FORMAT, adopted_from_format=2, files=files,
                    shards=[{"rank": 0, "start": 0, "stop": n, "features": names[0], "zoom": names[1]}])
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    _write_verified(folder, names)
    log(f"feature cache {folder}: a single-file cache of format 2, verified and listed in {MANIFEST} as one shard "
        f"(later starts check sizes and times, not checksums)")
    return True, "ok"


def _prepare(folder: Path, key: str, n: int, verify: bool, log) -> bool:
    """On the main process: True when the cache in ``folder`` is usable, else the folder is emptied for a build."""
    ok, reason = check_cache(folder, key, n, verify)
    if not ok and reason.startswith("a single-file cache of format 2"):
        ok, reason = _adopt_single_file(folder, key, n, log)
    if ok:
        return True
    if folder.exists() or folder.is_symlink():
        log(f"feature cache {folder}: {reason}; rebuilding")
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)
        else:
            folder.unlink()
    folder.mkdir(parents=True)
    return False


def open_cache(folder: Path, manifest: dict | None = None) -> FeatureCache:
    """Memory-map a checked cache's shards (one shard: the memmap itself; several: a :class:`ShardedRows` view)."""
    folder = Path(folder)
    manifest = manifest if manifest is not None else json.loads((folder / MANIFEST).read_text())
    feats, zooms = [], []
    for s in manifest["shards"]:
        for name in (s["features"], s["zoom"]):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"feature cache shard {folder / name} is not visible to this process: a build over several nodes "
                    f"writes each rank's shard on its own node; copy the cache folder to every node (or use a "
                    f"shared filesystem) before training on it")
        feats.append(np.load(folder / s["features"], mmap_mode="r"))
        zooms.append(np.load(folder / s["zoom"]))
    features = feats[0] if len(feats) == 1 else ShardedRows(feats)
    return FeatureCache(folder, features, np.concatenate(zooms), manifest)


def build_feature_cache(model, cohort: Cohort, cache_dir: str | Path, accelerator=None, batch_size: int = 64,
                        num_workers: int = 0, policy: str = "resize", intensity: str = "dtype",
                        color: str = "gray", log=print, key: str | None = None, verify: bool = False) -> FeatureCache:
    """Load the cache for (model trunk, cohort) or build it, sharded over ``accelerator``'s processes.

    The key and the check run on the main process only (``verify``: hash every file, whatever its identity).
    ``key`` may be passed when the caller already computed ``cache_key`` for the same arguments (it stats every
    image)."""
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    transform = ImageTransform.from_preprocess(model.preprocess, policy)
    key = key or main_first(accelerator, lambda: cache_key(model.trunk_id, transform, cohort, intensity, color))
    folder = Path(cache_dir) / key
    n = len(cohort.images)
    usable = main_first(accelerator, lambda: _prepare(folder, key, n, verify, log))
    if not usable:
        folder.mkdir(parents=True, exist_ok=True)   # on a node of its own, a rank has its own folder to fill
        _extract(model, cohort, folder, transform, rank, world, batch_size, num_workers, intensity, color, key,
                 accelerator, log)
    _barrier(accelerator)
    return open_cache(folder)


def _barrier(accelerator) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


def shard_names(rank: int) -> dict:
    return {"features": f"features_rank{rank}.npy", "zoom": f"zoom_rank{rank}.npy"}


def open_shard(folder: Path, rank: int, n_rows: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Writable memory maps (features, zoom) of rank ``rank``'s shard, under temporary names until ``seal_shard``."""
    names = shard_names(rank)
    feats = np.lib.format.open_memmap(folder / f".{names['features']}.partial.npy", mode="w+", dtype=np.float32,
                                      shape=(n_rows, dim))
    zooms = np.lib.format.open_memmap(folder / f".{names['zoom']}.partial.npy", mode="w+", dtype=np.float32,
                                      shape=(n_rows,))
    return feats, zooms


def seal_shard(folder: Path, rank: int, start: int, stop: int, seconds: float = 0.0) -> dict:
    """Rename a filled shard into place and hash it (each rank its own, in parallel): its manifest record."""
    names = shard_names(rank)
    for name in names.values():
        os.replace(folder / f".{name}.partial.npy", folder / name)
    return {"shard": {"rank": rank, "start": start, "stop": stop, **names},
            "files": {name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
                      for name in names.values()},
            "seconds": seconds}


def write_manifest(folder: Path, records: list[dict], meta: dict) -> dict:
    """``manifest.json`` (last, atomically) from the shard records of every rank, and the identities of the files
    just hashed (``verified.json``), so the next start hashes nothing."""
    seconds = max(r["seconds"] for r in records)
    manifest = {"format": FORMAT, "version": CACHE_VERSION, **meta, "processes": len(records),
                "seconds": round(seconds, 2), "images_per_second": round(meta["n_images"] / max(seconds, 1e-9), 2),
                "shards": [r["shard"] for r in records],
                "files": {name: f for r in records for name, f in r["files"].items()}}
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    _write_verified(folder, [name for name in manifest["files"] if (folder / name).is_file()])
    return manifest


@torch.no_grad()
def trunk_features(model, paths: list[str], rows, transform: ImageTransform, batch_size: int = 64,
                   num_workers: int = 0, intensity: str = "dtype", color: str = "gray", device=None,
                   desc: str = "image features", progress: bool = True):
    """Yield ``(rows, features [n, F] float32, zoom [n])`` for the images ``paths[rows]``, a batch at a time, in
    row order: each batch's images are loaded in threads (``_ImageRows``) and go through the frozen trunk in eval
    mode. The feature cache is built from it, and a model applied to a new cohort embeds through it."""
    device = device if device is not None else next(model.parameters()).device
    loader = DataLoader(_ImageRows(paths, list(rows), transform, intensity, color), batch_size=batch_size,
                        num_workers=num_workers)
    was_training = model.training
    model.eval()
    try:
        for images, zoom, idx in tqdm(loader, desc=desc, unit="batch", disable=not progress or bars_disabled()):
            yield idx.numpy(), model.encode_trunk(images.to(device)).float().cpu().numpy(), zoom.numpy()
    finally:
        model.train(was_training)


@torch.no_grad()
def _extract(model, cohort, folder, transform, rank, world, batch_size, num_workers, intensity, color, key,
             accelerator, log) -> None:
    """Rank ``rank`` writes its block of rows to its own two files, hashes them, and the shard records of all
    ranks are gathered into the manifest (written by each node's first process, so every node has one)."""
    n = len(cohort.images)
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    dim = int(model.encode_trunk(torch.zeros(1, transform.channels, transform.image_size, transform.image_size,
                                             device=device)).shape[-1])
    start_row, stop_row = shard_bounds(n, world, batch_size)[rank]
    feats, zooms = open_shard(folder, rank, stop_row - start_row, dim)
    start = time.perf_counter()
    for idx, features, zoom in trunk_features(model, list(cohort.images.path), range(start_row, stop_row), transform,
                                              batch_size, num_workers, intensity, color, device,
                                              desc=f"feature cache [{rank}/{world}]", progress=rank == 0):
        feats[idx - start_row] = features
        zooms[idx - start_row] = zoom
    feats.flush()
    zooms.flush()
    elapsed = time.perf_counter() - start
    del feats, zooms
    records = all_gather_objects(accelerator, seal_shard(folder, rank, start_row, stop_row, elapsed))
    if accelerator is None or accelerator.is_local_main_process:
        meta = write_manifest(folder, records, {
            "key": key, "trunk": model.trunk_id, "n_images": n, "dim": dim, "preprocess": model.preprocess,
            "policy": transform.policy, "intensity": intensity, "color": color})
        if is_main(accelerator):
            log(f"feature cache {folder}: {n} images x {dim} features in {meta['seconds']:.1f} s "
                f"({meta['images_per_second']:.1f} images/s over {world} process(es), {world} shard(s))")
