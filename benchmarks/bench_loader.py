"""Benchmark 4: decoding + resizing 2048 x 2048 16-bit TIFFs against the trunk's throughput.

    python benchmarks/bench_loader.py                       # 8 files, uncompressed and deflate-compressed
    python benchmarks/bench_loader.py --files 16 --items 96

The loader is ``read_image`` (decode, scale to float [0, 1]) + ``ImageTransform`` (antialiased resize of the short
side to 224, centre crop, normalise), exactly what ``BagDataset`` and the feature-cache builder run per image. It is
a bottleneck when it delivers fewer images per second than the trunk consumes: the trunk forward alone (frozen trunk:
feature-cache building, or a locked trunk without cache) and forward + backward (end to end).

Measured side by side in one process: per-image stage times (interleaved over the files), trunk throughput on a
ready batch, and the whole pipeline, ``DataLoader(num_workers=w)`` feeding the trunk, for w = 0 (the training
default) and 2. Also timed: ``fused_read_resize``, a proposed loader path for integer TIFFs that resizes the raw
values first and scales the 224 x 224 result (resizing and scaling are both linear, so they commute; integer data
needs no NaN or range clean-up), checked equal to the current path.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchutil import build, interleave, median, print_result, ratio, result, set_trunk_trainable  # before torch
import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from emclip.data import ImageTransform, read_image


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


def fused_read_resize(path, transform: ImageTransform) -> torch.Tensor:
    """Proposed fast path for integer grayscale TIFFs (``policy="resize"``): resize raw values, then scale."""
    arr = tifffile.imread(path, key=0)
    h, w = arr.shape
    size = transform.image_size
    zoom = min(h, w) / size
    t = torch.from_numpy(arr.astype(np.float32))[None, None]
    if min(h, w) != size:
        nh, nw = max(size, round(h / zoom)), max(size, round(w / zoom))
        t = F.interpolate(t, size=(nh, nw), mode='bilinear', antialias=True, align_corners=False)
    top, left = (t.shape[-2] - size) // 2, (t.shape[-1] - size) // 2
    t = t[0, :, top:top + size, left:left + size] * (1.0 / np.iinfo(arr.dtype).max)
    return ((t.expand(transform.channels, -1, -1) - transform.mean) / transform.std).contiguous()


class Files(Dataset):
    """``items`` reads cycling over the files, as a cohort's image rows would be read."""

    def __init__(self, paths, items: int, transform: ImageTransform):
        self.paths, self.items, self.transform = paths, items, transform

    def __len__(self):
        return self.items

    def __getitem__(self, i):
        return self.transform(read_image(self.paths[i % len(self.paths)]))[0]


def run(n_files: int = 8, size: int = 2048, items: int = 48, batch_size: int = 16, rounds: int = 3,
        compressions=(None, 'zlib'), workers=(0, 2), config: str = 'efficientnet_lite0_minilm'):
    start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix='emclip-bench-loader-')
    model = set_trunk_trainable(build(config), False).eval()
    transform = ImageTransform.from_preprocess(model.preprocess)
    px = transform.image_size
    rows, ratios, notes, extra = [], [], [], {}

    # trunk throughput on a ready batch: what the loader has to keep up with
    ready = torch.randn(batch_size, 3, px, px)
    e2e = set_trunk_trainable(build(config), True)
    e2e_batch = ready[:max(2, batch_size // 2)]

    def forward():
        with torch.no_grad():
            model.encode_trunk(ready)

    def forward_backward():
        e2e.zero_grad(set_to_none=True)
        e2e.encode_trunk(e2e_batch).square().mean().backward()
    tt = interleave({'fwd': forward, 'fwdbwd': forward_backward}, rounds=rounds, warmup=1)
    trunk_fwd, trunk_e2e = batch_size / median(tt['fwd']), len(e2e_batch) / median(tt['fwdbwd'])
    rows.append(['trunk forward (frozen; cache build)', '', round(1000 / trunk_fwd, 1), round(trunk_fwd, 1), '', ''])
    rows.append(['trunk forward + backward (e2e)', '', round(1000 / trunk_e2e, 1), round(trunk_e2e, 1), '', ''])

    for comp in compressions:
        paths = write_tiffs(Path(tmp.name), n_files, size, comp)
        label = comp or 'uncompressed'
        mb = np.mean([p.stat().st_size for p in paths]) / 2 ** 20
        for p in paths:  # warm the page cache: the benchmark is about CPU work, not the disk
            p.read_bytes()
        arrays = {}

        def decode():
            arrays['img'] = [read_image(p) for p in paths]

        def resize():
            [transform(a) for a in arrays['img']]

        def fused():
            [fused_read_resize(p, transform) for p in paths]
        decode()
        st = interleave({'decode': decode, 'resize': resize, 'fused': fused}, rounds=rounds, warmup=1)
        dec, res, fus = (median(st[k]) / n_files for k in ('decode', 'resize', 'fused'))
        diff = max(float((fused_read_resize(p, transform) - transform(read_image(p))[0]).abs().max()) for p in paths)
        loader = 1 / (dec + res)
        rows.append([f'read_image ({label}, {mb:.1f} MB/file)', label, round(dec * 1000, 1), round(1 / dec, 1), '', ''])
        rows.append([f'ImageTransform resize {size}->{px}', label, round(res * 1000, 1), round(1 / res, 1), '', ''])
        rows.append(['loader, one process (read_image + ImageTransform)', label, round((dec + res) * 1000, 1),
                     round(loader, 1), round(loader / trunk_fwd, 2), round(loader / trunk_e2e, 2)])
        rows.append(['proposed fused_read_resize, one process', label, round(fus * 1000, 1), round(1 / fus, 1),
                     round(1 / fus / trunk_fwd, 2), round(1 / fus / trunk_e2e, 2)])
        ratios.append(ratio(f'loader / trunk forward throughput, one process [{label}]', loader / trunk_fwd, '>= 1',
                            loader >= trunk_fwd, 'frozen trunk (cache build): < 1 means the loader is the bottleneck'))
        ratios.append(ratio(f'loader / trunk forward+backward throughput, one process [{label}]', loader / trunk_e2e,
                            '>= 1', loader >= trunk_e2e, 'end-to-end training'))
        ratios.append(ratio(f'fused_read_resize speed-up over read_image + ImageTransform [{label}]', (dec + res) / fus,
                            meaning=f'max |difference| {diff:.1e}'))

        # the real pipeline: DataLoader workers feed the frozen trunk, or nothing (loader alone)
        ds = Files(paths, items, transform)
        for w in workers:
            def load_only(w=w):
                for _ in DataLoader(ds, batch_size=batch_size, num_workers=w):
                    pass

            def pipeline(w=w):
                for x in DataLoader(ds, batch_size=batch_size, num_workers=w):
                    with torch.no_grad():
                        model.encode_trunk(x)
            pt = interleave({'load': load_only, 'pipe': pipeline}, rounds=max(1, rounds - 1), warmup=0)
            load_rate, pipe_rate = items / median(pt['load']), items / median(pt['pipe'])
            rows.append([f'DataLoader, workers={w}, loading only', label, round(1000 / load_rate, 1),
                         round(load_rate, 1), round(load_rate / trunk_fwd, 2), round(load_rate / trunk_e2e, 2)])
            rows.append([f'DataLoader, workers={w}, + trunk forward', label, round(1000 / pipe_rate, 1),
                         round(pipe_rate, 1), round(pipe_rate / trunk_fwd, 2), ''])
            ratios.append(ratio(f'pipeline (workers={w}) / trunk-alone forward throughput [{label}]',
                                pipe_rate / trunk_fwd, meaning='1 = the trunk never waits for images'))
        extra[label] = dict(decode_s=dec, resize_s=res, fused_s=fus, fused_max_diff=diff, file_mb=mb)
    columns = ['stage', 'TIFF', 'ms/image', 'images/s', '÷ trunk fwd images/s', '÷ trunk fwd+bwd images/s']
    notes = [f'{n_files} files of {size}x{size} uint16 per compression, page cache warm; pipeline runs {items} images '
             f'in batches of {batch_size}; trunk rates from batches of {batch_size} (forward) and {len(e2e_batch)} '
             f'(forward + backward) at {px} px; {rounds} interleaved rounds',
             f'{torch.get_num_threads()} torch threads in the main process; DataLoader workers run 1 thread each and '
             f'share the same {len(__import__("os").sched_getaffinity(0))} cores with the trunk']
    cfg = dict(n_files=n_files, size=size, items=items, batch_size=batch_size, rounds=rounds,
               compressions=[c or 'none' for c in compressions], workers=list(workers), model=config,
               seconds=round(time.perf_counter() - start, 1))
    extra.update(trunk_forward_images_per_s=trunk_fwd, trunk_e2e_images_per_s=trunk_e2e)
    tmp.cleanup()
    return result('loader', f'4. Loader: {size}x{size} 16-bit TIFF -> {px} px vs trunk throughput', columns, rows,
                  ratios, notes, cfg, extra)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--files', type=int, default=8)
    ap.add_argument('--size', type=int, default=2048)
    ap.add_argument('--items', type=int, default=48, help='images per DataLoader pass')
    ap.add_argument('--rounds', type=int, default=3)
    args = ap.parse_args(argv)
    res = run(args.files, args.size, args.items, rounds=args.rounds)
    print_result(res)
    return res


if __name__ == '__main__':
    main()
