"""Benchmark 3: what the bag model adds on top of the bare image trunk, on the same images.

    python benchmarks/bench_overhead.py                     # 4 bags of 6, 3, 5, 2 images at 224 px
    python benchmarks/bench_overhead.py --bags 16 9 12 5 --rounds 7

Arms, each one forward + backward on the same padded batch of images (pretrained default, 224 px):

* ``trunk``: the bare trunk on the real images only (``encode_trunk`` of a tensor packed beforehand), loss = mean
  of the squared features: the least a training step through the trunk costs;
* ``bag model``: ``model.encode_bags(scales, mask, images=padded)``: gather of the real images by the mask, trunk,
  scatter back, scale embedding, projection, gated-attention aggregator with masks, L2 normalisation; then the
  text projection of cached report features and the CLIP loss. The difference to ``trunk`` is the overhead (which
  thus also counts the projection and the loss: an upper bound on scale embedding + aggregator + masks).

Both in end-to-end mode (trunk trainable: forward + backward through it) and frozen-trunk mode (the trunk runs
forward only, as when the cache is built or the trunk is locked without a cache). Three estimates of the overhead:
the median of per-round paired time ratios (noisy on a shared CPU: the overhead is smaller than the noise), the
head measured alone on features of the same shape divided by the trunk time (low noise), and the ratio of counted
FLOPs (matmuls and convolutions only; hardware independent). torch's FlopCounterMode ignores the groups of a
convolution in its backward formula (a depthwise 3x3 backward is overcounted ~C-fold), so the trunk's backward is
counted as twice its forward, the usual rule, rather than taken from the counter.
"""
from __future__ import annotations

import argparse
import time

from benchutil import build, interleave, median, paired_ratio, print_result, ratio, result, set_trunk_trainable
import torch
from torch.utils.flop_counter import FlopCounterMode
from emclip.loss import ClipLoss


def make_batch(sizes, image_size: int, feature_dim: int, text_dim: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, k = len(sizes), max(sizes)
    mask = torch.arange(k)[None] < torch.tensor(sizes)[:, None]
    images = torch.randn(b, k, 3, image_size, image_size, generator=g).masked_fill(~mask[..., None, None, None], 0)
    scales = torch.exp(torch.empty(b, k).uniform_(0.693, 4.605, generator=g))
    return dict(images=images, packed=images[mask].contiguous(), mask=mask, scales=scales,
                features=torch.randn(b, k, feature_dim, generator=g).relu(),
                text=torch.randn(b, text_dim, generator=g))


def trunk_step(model, batch):
    model.zero_grad(set_to_none=True)
    if model.lock_image:
        with torch.no_grad():
            return model.encode_trunk(batch['packed'])
    model.encode_trunk(batch['packed']).square().mean().backward()


def bag_step(model, batch, loss_fn, features: bool = False):
    model.zero_grad(set_to_none=True)
    data = dict(features=batch['features']) if features else dict(images=batch['images'])
    bags = model.encode_bags(batch['scales'], batch['mask'], **data)
    loss_fn(bags.patient, model.project_text(batch['text']), model.logit_scale.exp()).backward()


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def run(sizes=(6, 3, 5, 2), rounds: int = 5, config: str = 'efficientnet_lite0_minilm'):
    start = time.perf_counter()
    loss_fn = ClipLoss()
    model = build(config, lock_text=True)
    size = model.preprocess['image_size']
    with torch.no_grad():
        tdim = model.encode_text_pooled(['x']).shape[-1]
    batch = make_batch(sizes, size, model.num_features, tdim)
    # the training default: 32 patients x max_instances 16 (features only: 512 images would take minutes end to end)
    big = make_batch([16] * 32, 8, model.num_features, tdim, seed=1)
    n = int(batch['mask'].sum())
    rows, ratios, extra = [], [], {}
    for mode in ('e2e', 'frozen'):
        set_trunk_trainable(model, mode == 'e2e')
        n_rounds = rounds if mode == 'e2e' else 2 * rounds  # frozen rounds are 4x cheaper: buy less noise
        times = interleave({'trunk': lambda: trunk_step(model, batch),
                            'bag model': lambda: bag_step(model, batch, loss_fn)}, rounds=n_rounds, warmup=1)
        # the head alone in its own loop: right after a trunk backward it runs 3-5x slower (caches and allocator are
        # cold after hundreds of MB of activations were freed), which says nothing about its cost inside a step
        times.update(interleave({'head only': lambda: bag_step(model, batch, loss_fn, features=True)}, rounds=rounds))
        with torch.no_grad():
            trunk_fwd = count_flops(lambda: model.encode_trunk(batch['packed']))
        head_flops = count_flops(lambda: bag_step(model, batch, loss_fn, features=True))
        trunk_flops = 3 * trunk_fwd if mode == 'e2e' else trunk_fwd  # backward = 2 x forward (see the docstring)
        flops = {'trunk': trunk_flops, 'bag model': trunk_flops + head_flops, 'head only': head_flops}
        paired = paired_ratio(times, 'bag model', 'trunk') - 1
        per_round = sorted(a / b - 1 for a, b in zip(times['bag model'], times['trunk']))
        q1, q3 = per_round[len(per_round) // 4], per_round[(3 * len(per_round)) // 4]
        head = median(times['head only']) / median(times['trunk'])
        flop_over = flops['bag model'] / flops['trunk'] - 1
        for arm in times:
            rows.append([mode, arm, round(median(times[arm]) * 1000, 1), round(median(times[arm]) / n * 1000, 2),
                         round(flops[arm] / 1e9, 3),
                         round(median(times[arm]) / median(times['trunk']), 4)])
        what = 'forward + backward through the trunk' if mode == 'e2e' else 'trunk forward only (frozen)'
        ratios += [ratio(f'{mode}: bag model extra time over bare trunk (paired rounds)', paired, '<= 0.05',
                         paired <= 0.05, f'{what}; per-round spread (quartiles) {q1:+.3f} to {q3:+.3f}: the noise'),
                   ratio(f'{mode}: head alone / trunk time', head, '<= 0.05', head <= 0.05,
                         'scale embedding + projection + aggregator + masks + loss, measured apart'),
                   ratio(f'{mode}: extra FLOPs over bare trunk', flop_over, '<= 0.05', flop_over <= 0.05,
                         'matmul/conv FLOPs counted by torch FlopCounterMode')]
        # most of the head's time is per call, not per image: at a training batch it is a far smaller share
        big_t = interleave({'head': lambda: bag_step(model, big, loss_fn, features=True)}, rounds=rounds)['head']
        share = median(big_t) / (int(big['mask'].sum()) * median(times['trunk']) / n)
        rows.append([mode, f'head only, {len(big["mask"])} bags x {big["mask"].shape[1]} images',
                     round(median(big_t) * 1000, 1), round(median(big_t) / int(big['mask'].sum()) * 1000, 3), None,
                     round(share, 4)])
        ratios.append(ratio(f'{mode}: head / trunk time at a training batch ({len(big["mask"])} x '
                            f'{big["mask"].shape[1]} images)', share, '<= 0.05', share <= 0.05,
                            'head measured on features; trunk time per image from the rows above'))
        extra[mode] = dict(times=times, flops=flops, big_head_times=big_t)
    columns = ['mode', 'arm', 'ms/step (median)', 'ms/image', 'GFLOP/step', '× trunk (ratio of medians)']
    notes = [f'{len(sizes)} bags of {", ".join(map(str, sizes))} images ({n} real, {batch["mask"].numel()} padded '
             f'slots) at {size} px; {rounds} (e2e) and {2 * rounds} (frozen) interleaved rounds after a warm-up round',
             'overhead = bag model / trunk - 1; it includes the projection and the loss, so it bounds scale embedding '
             '+ aggregator + masks from above']
    cfg = dict(sizes=list(sizes), rounds=rounds, model=config, seconds=round(time.perf_counter() - start, 1))
    return result('overhead', '3. Model overhead: bag model vs bare trunk (same images)', columns, rows, ratios, notes,
                  cfg, extra)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--bags', type=int, nargs='+', default=[6, 3, 5, 2], help='images per bag')
    ap.add_argument('--rounds', type=int, default=5)
    args = ap.parse_args(argv)
    res = run(tuple(args.bags), args.rounds)
    print_result(res)
    return res


if __name__ == '__main__':
    main()
