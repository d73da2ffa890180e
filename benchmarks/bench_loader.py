"""Benchmark 4: decoding + resizing 2048 x 2048 16-bit TIFFs, the previous loader against the shipped fused one,
and the cache build's loop against the trunk alone.

    python benchmarks/bench_loader.py                       # 8 files, uncompressed and deflate-compressed
    python benchmarks/bench_loader.py --files 16 --items 96 --workers 0 2

Two loaders, side by side in one process:

* **previous**: ``read_image`` (decode, scale to a full-resolution float [0, 1] image) + ``ImageTransform``
  (antialiased resize of the short side to 224, centre crop, normalise);
* **fused (shipped)**: ``emclip.data.images.load_transformed``, what ``BagDataset`` and the feature-cache builder run
  per image: the same tensor to float rounding, from the raw integer samples (memory-mapped when uncompressed),
  resized first and scaled at 224 x 224.

The pipeline is the cache build's loop (``emclip.train.cache._extract``): a ``DataLoader`` over the cache builder's
own dataset (``_ImageRows``, which loads each batch's images in threads, ``emclip.data.prefetch.thread_map``) feeding
the frozen trunk forward in batches, with ``num_workers=0`` (the default) or more; "previous" swaps in a dataset that
reads the previous way, "fused serial" the fused loader one image after another (the first fused run's loop). Its
throughput is compared with the trunk alone on the same number of images already in memory, same batch size, paired
round by round.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchutil import (build, interleave, median, paired_ratio, print_result, ratio, result,  # before torch
                       set_trunk_trainable)
import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from emclip.data import ImageTransform, read_image
from emclip.data.images import load_transformed
from emclip.data.prefetch import Prefetch, loader_threads, thread_map
from emclip.data.resample import single_threaded_blas
from emclip.train.cache import _ImageRows


def write_tiffs(folder: Path, n: int, size: int, compression: str | None, seed: int = 0) -> list:
    """EM-like 16-bit frames: smooth structure plus shot noise, so deflate compresses them as it would real ones."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        coarse = torch.from_numpy(rng.random((1, 1, size // 64, size // 64), dtype=np.float32))
        smooth = F.interpolate(coarse, size=(size, size), mode='bicubic', align_corners=False)[0, 0].numpy()
        img = np.clip(0.2 + 0.6 * smooth + rng.normal(0, 0.03, (size, size)), 0, 1)
        path = folder / f'em_{compression or "raw"}_{i:02d}.tif'
        tifffile.imwrite(path, np.round(img * 65535).astype(np.uint16), compression=compression)
        paths.append(path)
    return paths


def previous_load(path, transform: ImageTransform):
    """The loader before the fused path: a full-resolution float image, then the transform."""
    return transform(read_image(path))


class PreviousRows(_ImageRows):
    """The cache builder's dataset as it read images before the fused loader: one image after another."""
    __getitems__ = None   # the DataLoader then fetches item by item

    def __getitem__(self, i):
        row = self.indices[i]
        tensor, zoom = previous_load(self.paths[row], self.transform)
        return tensor, torch.tensor(zoom, dtype=torch.float32), torch.tensor(row)


class SerialRows(_ImageRows):
    """The shipped dataset without threads: the fused loader one image after another (the loader of the first
    fused run)."""
    __getitems__ = None


def run(n_files: int = 8, size: int = 2048, items: int = 48, batch_size: int = 16, rounds: int = 3,
        compressions=(None, 'zlib'), workers=(0,), config: str = 'efficientnet_lite0_minilm'):
    start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix='emclip-bench-loader-')
    model = set_trunk_trainable(build(config), False).eval()
    transform = ImageTransform.from_preprocess(model.preprocess)
    px = transform.image_size
    rows, ratios, extra = [], [], {}
    ready = torch.randn(batch_size, 3, px, px)
    e2e = set_trunk_trainable(build(config), True)
    e2e_batch = ready[:max(2, batch_size // 2)]

    def forward_backward():
        e2e.zero_grad(set_to_none=True)
        e2e.encode_trunk(e2e_batch).square().mean().backward()

    def trunk_alone():
        """The trunk on the pipeline's images, already in memory: what the pipeline would reach without loading."""
        with torch.no_grad():
            for b in range(0, items, batch_size):
                model.encode_trunk(ready[:min(batch_size, items - b)])
    tt = interleave({'fwd': trunk_alone, 'fwdbwd': forward_backward}, rounds=rounds, warmup=1)
    trunk_fwd, trunk_e2e = items / median(tt['fwd']), len(e2e_batch) / median(tt['fwdbwd'])
    rows.append(['trunk forward alone (frozen; cache build)', '', round(1000 / trunk_fwd, 1), round(trunk_fwd, 1),
                 1.0, ''])
    rows.append(['trunk forward + backward (e2e)', '', round(1000 / trunk_e2e, 1), round(trunk_e2e, 1), '', ''])

    for comp in compressions:
        paths = write_tiffs(Path(tmp.name), n_files, size, comp)
        label = comp or 'uncompressed'
        key = 'deflate' if comp else 'uncompressed'
        mb = np.mean([p.stat().st_size for p in paths]) / 2 ** 20
        for p in paths:  # warm the page cache: the benchmark is about CPU work, not the disk
            p.read_bytes()
        diff = max(float((load_transformed(p, transform)[0] - previous_load(p, transform)[0]).abs().max())
                   for p in paths)

        def threaded():
            with single_threaded_blas():
                thread_map(lambda p: load_transformed(p, transform), paths)
        st = interleave({'previous': lambda: [previous_load(p, transform) for p in paths],
                         'fused': lambda: [load_transformed(p, transform) for p in paths],
                         'threads': threaded}, rounds=rounds, warmup=1)
        prev, fus, thr = (median(st[k]) / n_files for k in ('previous', 'fused', 'threads'))
        rows.append([f'previous: read_image + ImageTransform ({mb:.1f} MB/file)', label, round(prev * 1000, 1),
                     round(1 / prev, 1), round(1 / prev / trunk_fwd, 2), round(1 / prev / trunk_e2e, 2)])
        rows.append(['fused (shipped): load_transformed', label, round(fus * 1000, 1), round(1 / fus, 1),
                     round(1 / fus / trunk_fwd, 2), round(1 / fus / trunk_e2e, 2)])
        rows.append([f'fused, a batch in {loader_threads()} threads (thread_map, as _ImageRows)', label,
                     round(thr * 1000, 1), round(1 / thr, 1), round(1 / thr / trunk_fwd, 2), ''])
        ratios.append(ratio(f'fused loader speed-up over read_image + ImageTransform [{key}]',
                            paired_ratio(st, 'previous', 'fused'), meaning=f'max |difference| {diff:.1e}'))
        ratios.append(ratio(f'fused loader / trunk forward+backward throughput, one process [{key}]',
                            1 / fus / trunk_e2e, '>= 1', 1 / fus >= trunk_e2e, 'end-to-end training'))

        # the cache build's loop: DataLoader over _ImageRows feeding the frozen trunk, vs the trunk alone
        all_paths = [str(p) for p in paths]
        indices = [i % n_files for i in range(items)]
        datasets = {'previous': PreviousRows(all_paths, indices, transform, 'dtype', 'gray'),
                    'fused serial': SerialRows(all_paths, indices, transform, 'dtype', 'gray'),
                    'shipped': _ImageRows(all_paths, indices, transform, 'dtype', 'gray')}
        for w in workers:
            def pipeline(ds, w=w, ahead=False):
                loader = DataLoader(ds, batch_size=batch_size, num_workers=w)
                with torch.no_grad():
                    for images, _, _ in (Prefetch(loader) if ahead else loader):
                        model.encode_trunk(images)
            arms = {'trunk': trunk_alone, 'previous': lambda: pipeline(datasets['previous']),
                    'fused serial': lambda: pipeline(datasets['fused serial']),
                    'shipped': lambda: pipeline(datasets['shipped'])}
            if w == 0:   # a loading thread one batch ahead of the trunk (emclip.data.prefetch)
                arms['shipped+prefetch'] = lambda: pipeline(datasets['shipped'], ahead=True)
            pt = interleave(arms, rounds=max(1, rounds - 1), warmup=0)
            for arm in [a for a in arms if a != 'trunk']:
                rate, rel = items / median(pt[arm]), paired_ratio(pt, 'trunk', arm)
                rows.append([f'cache-build loop, {arm}, workers={w}', label, round(1000 / rate, 1), round(rate, 1),
                             round(rel, 2), ''])
                target = arm.startswith('shipped') and comp is None and w == 0
                ratios.append(ratio(f'cache-build loop ({arm} loader, workers={w}) / trunk-alone forward throughput '
                                    f'[{key}]', rel, '>= 0.9' if target else None, rel >= 0.9 if target else None,
                                    '1 = the trunk never waits for images'))
            for arm in [a for a in arms if a not in ('trunk', 'previous')]:
                ratios.append(ratio(f'cache-build loop speed-up, {arm} over previous loader (workers={w}) [{key}]',
                                    paired_ratio(pt, 'previous', arm)))
        extra[key] = dict(previous_s=prev, fused_s=fus, fused_threads_s=thr, fused_max_diff=diff, file_mb=mb)
    columns = ['stage', 'TIFF', 'ms/image', 'images/s', '÷ trunk fwd images/s', '÷ trunk fwd+bwd images/s']
    notes = [f'{n_files} files of {size}x{size} uint16 per compression, page cache warm; the loop runs {items} images '
             f'in batches of {batch_size}, the trunk alone the same batches from memory; forward + backward on '
             f'batches of {len(e2e_batch)} at {px} px; {rounds} interleaved rounds; loop ratios paired per round',
             f'{torch.get_num_threads()} torch threads in the main process; DataLoader workers run 1 thread each and '
             f'share the same {len(os.sched_getaffinity(0))} cores with the trunk']
    cfg = dict(n_files=n_files, size=size, items=items, batch_size=batch_size, rounds=rounds,
               compressions=[c or 'none' for c in compressions], workers=list(workers), model=config,
               seconds=round(time.perf_counter() - start, 1))
    extra.update(trunk_forward_images_per_s=trunk_fwd, trunk_e2e_images_per_s=trunk_e2e)
    tmp.cleanup()
    return result('loader', f'4. Loader: {size}x{size} 16-bit TIFF -> {px} px, previous vs fused, vs the trunk',
                  columns, rows, ratios, notes, cfg, extra)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--files', type=int, default=8)
    ap.add_argument('--size', type=int, default=2048)
    ap.add_argument('--items', type=int, default=48, help='images per pass of the cache-build loop')
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--workers', type=int, nargs='+', default=[0])
    args = ap.parse_args(argv)
    res = run(args.files, args.size, args.items, rounds=args.rounds, workers=args.workers)
    print_result(res)
    return res


if __name__ == '__main__':
    main()
