"""Benchmark 2: training on a frozen-trunk feature cache against training through the image trunk.

    python benchmarks/bench_cache.py                        # generates a 16-patient embedded cohort in a temp dir
    python benchmarks/bench_cache.py --data data/demo_cohort --patients 30

Model: the pretrained default (EfficientNet-Lite0 trunk, 1280 features, 224 px; MiniLM text). Three ways to run a
training step on the same patients (CLIP loss, backward, AdamW step; report features cached by the text tower once,
``lock_text`` as in the training default, so the text transformer is out of every arm):

* ``cache``: cached trunk features read from the memory-mapped cache (``emclip.train.cache``) through
  ``BagDataset`` + ``collate_bags``, then scale embedding + projection + aggregator;
* ``frozen``: the same frozen trunk, but every step decodes the TIFFs, resizes them and runs the trunk forward
  (what the cache saves);
* ``e2e``: end to end, trunk trainable: decode + trunk forward and backward.

The cache arm runs whole epochs. The two image arms are too slow for that on 2 cores, so they run the same few
steps (``--steps`` batches of ``--batch-size`` patients, at most ``--images`` images each); their epoch times are
**extrapolated** from the measured time per image (the work of all three arms is proportional to the images seen).
Also measured: cache build rate (decode + resize + trunk forward, DataLoader workers 0) and bytes per cached image,
and that the cache holds exactly what the trunk computes.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchutil import build, interleave, median, print_result, ratio, result, set_trunk_trainable  # before torch
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from emclip.data import BagDataset, ImageTransform, collate_bags, load_cohort
from emclip.loss import ClipLoss
from emclip.synthetic import generate_cohort
from emclip.train.cache import build_feature_cache

REAL_IMAGES, REAL_PATIENTS = 600_000, 15_000


def make_step(model, text: dict, loss_fn):
    """One optimizer step on a collated batch; returns the number of images it processed."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch):
        batch = dict(batch, text_features=torch.stack([text[p] for p in batch['patient_ids']]))
        opt.zero_grad(set_to_none=True)
        out = model(batch)
        loss_fn(out['patient'], out['report'], out['logit_scale']).backward()
        opt.step()
        model.clamp_logit_scale()
        return int(batch['mask'].sum())
    return step


def run(data: str | None = None, n_patients: int = 16, batch_size: int = 4, steps: int = 2, max_images: int = 3,
        rounds: int = 3, config: str = 'efficientnet_lite0_minilm', image_size: int = 256):
    start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix='emclip-bench-cache-')
    root = Path(data) if data else Path(tmp.name) / 'cohort'
    gen_seconds = None
    if not data:
        t0 = time.perf_counter()
        generate_cohort(root, n_patients=n_patients, seed=0, image_size=image_size, workers=os.cpu_count() or 1,
                        progress=False)
        gen_seconds = time.perf_counter() - t0
    cohort = load_cohort(root, require_splits=False)   # a throughput benchmark needs no val or test patients
    if data and n_patients < len(cohort.reports):  # a subset of a larger cohort: keep its first n patients
        keep = set(cohort.reports.patient_id[:n_patients])
        cohort.reports = cohort.reports[cohort.reports.patient_id.isin(keep)].reset_index(drop=True)
        cohort.images = cohort.images[cohort.images.patient_id.isin(keep)].reset_index(drop=True)
    n_images, n_pat = len(cohort.images), len(cohort.reports)

    model = build(config)  # pretrained weights: the cache must hold the real trunk's features
    with torch.no_grad():
        pooled = model.encode_text_pooled(list(cohort.reports.report))
    text = dict(zip(cohort.reports.patient_id, pooled))

    # --- cache build: decode + resize + frozen trunk forward, one process, DataLoader workers 0 (the default)
    set_trunk_trainable(model, False)
    t0 = time.perf_counter()
    cache = build_feature_cache(model, cohort, Path(tmp.name) / 'cache', batch_size=32, num_workers=0,
                                log=lambda *a: None)
    build_seconds = time.perf_counter() - t0
    build_rate = n_images / build_seconds
    bytes_per_image = sum(f.stat().st_size for f in cache.path.glob('features_rank*.npy')) / n_images  # shards
    zoom_bytes = sum(f.stat().st_size for f in cache.path.glob('zoom_rank*.npy')) / n_images

    transform = ImageTransform.from_preprocess(model.preprocess)
    # exactness: the first patient's cached rows against the trunk run on its images now
    first = BagDataset(cohort, transform=transform)[0]
    with torch.no_grad():
        fresh = model.eval().encode_trunk(first['images']).numpy()
    cache_diff = float(np.abs(fresh - cache.features[first['image_index'].numpy()]).max())

    # --- training arms
    loss_fn = ClipLoss()
    cache_ds = BagDataset(cohort, features=cache.features, feature_zoom=cache.zoom)
    cache_loader = DataLoader(cache_ds, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=collate_bags,
                              generator=torch.Generator().manual_seed(0))
    image_ds = BagDataset(cohort, transform=transform, max_instances=max_images)
    subset = Subset(image_ds, list(range(min(len(image_ds), steps * batch_size))))
    image_loader = DataLoader(subset, batch_size=batch_size, drop_last=True, collate_fn=collate_bags)

    arms = {'cache': set_trunk_trainable(build(config), False),
            'frozen': set_trunk_trainable(build(config), False),
            'e2e': set_trunk_trainable(build(config), True)}
    steppers = {arm: make_step(m, text, loss_fn) for arm, m in arms.items()}
    images_done = {arm: [] for arm in arms}

    def epoch(arm, loader):
        def go():  # data loading is inside the timed call: it is part of each arm's cost
            images_done[arm].append(sum(steppers[arm](b) for b in loader))
        return go

    # no warm-up round (an e2e round costs seconds): the median of the rounds absorbs the first one's extra cost
    times = interleave({'cache': epoch('cache', cache_loader), 'frozen': epoch('frozen', image_loader),
                        'e2e': epoch('e2e', image_loader)}, rounds=rounds, warmup=0)
    per_round = {arm: [t / n for t, n in zip(times[arm], images_done[arm])] for arm in arms}
    per_image = {arm: median(v) for arm, v in per_round.items()}
    # per-round paired ratios of per-image time: the arms of one round shared the machine's load
    paired = {arm: median([a / c for a, c in zip(per_round[arm], per_round['cache'])]) for arm in ('frozen', 'e2e')}

    epoch_images = len(cohort.images)
    rows = []
    for arm in arms:
        measured = 'measured (whole epochs)' if arm == 'cache' else f'extrapolated from {images_done[arm][0]} images'
        rows.append([arm, round(per_image[arm] * 1000, 2), round(per_image[arm] * epoch_images, 2),
                     round(per_image[arm] / per_image['cache'], 1), round(per_image[arm] * REAL_IMAGES / 3600, 2),
                     measured])
    columns = ['arm', 'ms/image (median)', f'epoch s ({n_pat} patients, {epoch_images} images)',
               '× cache (ratio of medians)', 'h/epoch at 600k images (this machine)', 'how']
    ratios = [
        ratio('e2e vs cache epoch time', paired['e2e'], meaning='per-image time ratio, paired per round'),
        ratio('frozen trunk without cache vs cache epoch time', paired['frozen'],
              meaning='per-image time ratio, paired per round'),
        ratio('cache build rate (images/s, workers 0)', build_rate, meaning='decode + resize + trunk forward'),
        ratio('cache size per image (bytes)', bytes_per_image + zoom_bytes,
              meaning=f'features.npy {bytes_per_image:.1f} B (1280 x float32 = 5120 + header) + zoom.npy '
                      f'{zoom_bytes:.1f} B'),
    ]
    notes = [
        f'cohort: {n_pat} patients, {n_images} images '
        f'({"generated in %.1f s" % gen_seconds if gen_seconds else data}); {rounds} interleaved rounds; '
        f'e2e/frozen ran {steps} step(s) of {batch_size} patients x <= {max_images} images',
        f'cache build: {n_images} images in {build_seconds:.1f} s = {build_rate:.1f} images/s; 600k images -> '
        f'{REAL_IMAGES / build_rate / 3600:.1f} h on this machine (one process; shard over GPUs/processes), '
        f'{(bytes_per_image + zoom_bytes) * REAL_IMAGES / 1e9:.2f} GB on disk (float16 would halve it)',
        f'cache holds exactly the trunk output: max |cached - fresh trunk forward| = {cache_diff:.2e}',
    ]
    config_out = dict(data=str(data or 'generated'), n_patients=n_pat, n_images=n_images, batch_size=batch_size,
                      steps=steps, max_images=max_images, rounds=rounds, model=config,
                      seconds=round(time.perf_counter() - start, 1))
    extra = dict(build_seconds=build_seconds, build_images_per_s=build_rate, bytes_per_image=bytes_per_image,
                 zoom_bytes_per_image=zoom_bytes, per_image_seconds=per_image, cache_max_abs_diff=cache_diff,
                 generate_seconds=gen_seconds)
    tmp.cleanup()
    return result('cache', '2. Feature cache vs end-to-end (training step, same images)', columns, rows, ratios,
                  notes, config_out, extra)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--data', default=None, help='an existing cohort folder (default: generate one in a temp dir)')
    ap.add_argument('--patients', type=int, default=16)
    ap.add_argument('--batch-size', type=int, default=4)
    ap.add_argument('--steps', type=int, default=2, help='steps of the image arms per round')
    ap.add_argument('--images', type=int, default=3, help='images per patient in the image arms (max_instances)')
    ap.add_argument('--rounds', type=int, default=3)
    args = ap.parse_args(argv)
    res = run(args.data, args.patients, args.batch_size, args.steps, args.images, args.rounds)
    print_result(res)
    return res


if __name__ == '__main__':
    main()
