"""Benchmark 6: distributed training on paper, from quantities measured here.

    python benchmarks/bench_distributed.py
    python benchmarks/bench_distributed.py --gpu-tflops 5 --intra-gbs 100 --inter-gbs 12

Nothing here runs on a GPU. What is measured on this machine, with the pretrained default (224 px, F = 1280, E = 256):

* parameter counts per training mode (trainable ones are all-reduced every step and carry Adam state);
* trunk forward FLOPs per image (counted by torch; training = 3x forward), head FLOPs per instance (counted);
* training activations saved for backward: trunk per image, head per instance, text tower per report (a
  ``saved_tensors_hooks`` tally of distinct storages, fp32), cross-checked against the RSS growth of a real step;
* CPU step times (trunk forward + backward per image; cache-mode head step per instance) for reference.

Derived, for W = 8 GPUs in one node and W = 16 GPUs in two nodes of 8, at global batches of 32-256 patients with
all 90 images per bag or ``max_instances`` = 16 (each rank holds b = B / W patients):

* communication per step and rank: the differentiable all_gather of b x E float32 patient and report embeddings
  (ring all_gather: each rank receives (W - 1) b E 4 bytes per tensor; its backward, a reduce-scatter, moves as
  much again), and DDP's ring all-reduce of the trainable gradients, 2 (W - 1) / W x 4 P bytes sent per rank;
* time of that traffic at assumed bus bandwidths (intra-node NVLink-class, inter-node 100 Gb/s-class), against the
  step's compute at an assumed effective GPU throughput: assumptions are flags, the byte counts are not;
* memory per GPU: fp32 weights (+ gradients + two Adam moments for trainable ones) + activations of the b x K images
  (end to end) or b x K cached feature rows (cache mode) + text.

Units are decimal (1 KB = 1e3, 1 MB = 1e6, 1 GB = 1e9 bytes), like link bandwidths.
"""
from __future__ import annotations

import argparse
import time

from benchutil import (PeakRSS, build, interleave, median, print_result, ratio, result, rss_bytes,  # before torch
                       set_trunk_trainable)
import torch
from torch.utils.flop_counter import FlopCounterMode
from emclip.loss import ClipLoss

GLOBAL_BATCHES = (32, 64, 128, 256)
SETUPS = ((8, 1), (16, 2))  # (GPUs, nodes)
REPORT_TEXT = ('Electron microscopy: two glomeruli are examined. The glomerular basement membranes are diffusely '
               'thickened, measuring 650 to 900 nm (mean 780 nm). Podocyte foot processes show segmental effacement '
               'involving about 40% of the capillary surface. No electron-dense immune-type deposits are identified. '
               'The mesangial matrix is moderately expanded without deposits. Diagnosis: diabetic nephropathy.')


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs (fp32 activations)."""
    seen = {}

    def pack(t):
        try:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. sparse or meta tensors: not in these models
            pass
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def trainable(model, mode: str, lock_text: bool) -> int:
    """Trainable parameters of ``mode`` ('cache' or 'e2e') from the model's per-part counts."""
    c = model.parameter_counts()
    n = c['scale_embed'] + c['aggregator'] + c['projections'] + c['temperature']
    n += 0 if lock_text else c['text_tower']
    n += c['trunk'] if mode == 'e2e' else 0
    return n


def measure(config: str, rounds: int = 3) -> dict:
    model = set_trunk_trainable(build(config, lock_text=True), True)
    size = model.preprocess['image_size']
    m = {'counts': model.parameter_counts(), 'E': model.embed_dim, 'F': model.num_features, 'size': size}
    for mode in ('cache', 'e2e'):
        for lock in (True, False):
            m[f'trainable {mode} lock_text={lock}'] = trainable(model, mode, lock)
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():  # two images: BatchNorm in training mode refuses a batch of one
        m['trunk_fwd_flops'] = flops(lambda: model.encode_trunk(x[:2])) / 2
    m['trunk_act_bytes'] = saved_bytes(lambda: model.encode_trunk(x)) / len(x)
    gc_rss = rss_bytes()
    with PeakRSS() as mem:  # cross-check: RSS growth of a real forward + backward of 8 images
        model.encode_trunk(torch.randn(8, 3, size, size)).square().mean().backward()
    m['trunk_rss_bytes'] = (mem.peak - gc_rss) / 8
    model.zero_grad(set_to_none=True)

    set_trunk_trainable(model, False)
    b, k = 32, 16
    mask = torch.ones(b, k, dtype=torch.bool)
    scales, feats = torch.full((b, k), 10.0), torch.randn(b, k, model.num_features).relu()
    with torch.no_grad():
        text = model.encode_text_pooled([REPORT_TEXT] * b)
    loss_fn = ClipLoss()

    def head_step():
        model.zero_grad(set_to_none=True)
        bags = model.encode_bags(scales, mask, features=feats)
        loss_fn(bags.patient, model.project_text(text), model.logit_scale.exp()).backward()
    m['head_flops'] = flops(head_step) / (b * k)
    m['head_act_bytes'] = saved_bytes(lambda: model.encode_bags(scales, mask, features=feats)) / (b * k)
    tokens = model.tokenize([REPORT_TEXT] * 4)
    model.text.requires_grad_(True)
    m['text_act_bytes'] = saved_bytes(lambda: model.text(tokens)) / 4
    m['text_tokens'] = int(tokens.shape[1])
    model.text.lock()

    e2e = set_trunk_trainable(build(config, lock_text=True), True)

    def e2e_step():
        e2e.zero_grad(set_to_none=True)
        e2e.encode_trunk(x).square().mean().backward()
    t = interleave({'e2e': e2e_step, 'head': head_step}, rounds=rounds, warmup=1)
    m['cpu_e2e_s_per_image'] = median(t['e2e']) / len(x)
    m['cpu_head_s_per_instance'] = median(t['head']) / (b * k)
    return m


def memory_gb(m: dict, mode: str, b: int, k: int, lock_text: bool = True) -> float:
    """Per-GPU memory (GB) of one training step: weights/grads/Adam + activations + inputs (fp32)."""
    total = m['counts']['total']
    train = m[f'trainable {mode} lock_text={lock_text}']
    weights = 4 * total + 12 * train  # every weight; gradient + Adam m and v for the trainable ones
    if mode == 'e2e':
        acts = b * k * (m['trunk_act_bytes'] + m['head_act_bytes']) + b * k * 3 * m['size'] ** 2 * 4  # + input pixels
    else:
        acts = b * k * (m['F'] * 4 + m['head_act_bytes'])  # the cached feature rows and the head's activations
    acts += 0 if lock_text else b * m['text_act_bytes']
    return (weights + acts) / 1e9


def run(config: str = 'efficientnet_lite0_minilm', gpu_tflops: float = 5.0, intra_gbs: float = 100.0,
        inter_gbs: float = 12.0, rounds: int = 3):
    start = time.perf_counter()
    m = measure(config, rounds)
    e = m['E']
    rows, ratios, notes = [], [], []
    for w, nodes in SETUPS:
        bw = (intra_gbs if nodes == 1 else inter_gbs) * 1e9
        for bglob in GLOBAL_BATCHES:
            b = bglob // w
            if b < 1:
                continue
            gather = 2 * 2 * (w - 1) * b * e * 4  # 2 tensors (patient, report) x (all_gather + its reduce-scatter)
            for mode, k in (('cache', 90), ('e2e', 16), ('e2e', 90)):
                p = m[f'trainable {mode} lock_text=True']
                allreduce = 2 * (w - 1) / w * 4 * p
                allreduce_text = 2 * (w - 1) / w * 4 * m[f'trainable {mode} lock_text=False']
                comm_s = (gather + allreduce) / bw
                if mode == 'e2e':
                    compute_flops = b * k * (3 * m['trunk_fwd_flops'] + m['head_flops'])
                else:
                    compute_flops = b * k * m['head_flops']
                compute_s = compute_flops / (gpu_tflops * 1e12)
                rows.append([f'{w} GPUs / {nodes} node{"s" if nodes > 1 else ""}', bglob, b, f'{mode}, K={k}',
                             round(gather / 1e3, 1), round(allreduce / 1e6, 2), round(allreduce_text / 1e6, 1),
                             round(comm_s * 1e3, 3),
                             round(compute_flops / 1e12, 3), round(compute_s * 1e3, 2),
                             round(memory_gb(m, mode, b, k), 2), round(memory_gb(m, mode, b, k, lock_text=False), 2)])
    worst = memory_gb(m, 'e2e', 256 // 8, 90)
    sampled = memory_gb(m, 'e2e', 256 // 8, 16)
    ratios += [
        ratio('trunk activations per image, fp32 (MB)', m['trunk_act_bytes'] / 1e6,
              meaning=f'saved tensors; RSS growth of a real step {m["trunk_rss_bytes"] / 1e6:.0f} MB/image'),
        ratio('e2e memory per GPU, B=256 on 8 GPUs, K=90 (GB)', worst, meaning='does not fit an 80 GB GPU' if worst > 80
              else 'fits an 80 GB GPU'),
        ratio('e2e memory per GPU, B=256 on 8 GPUs, max_instances=16 (GB)', sampled,
              meaning='fits an 80 GB GPU' if sampled <= 80 else 'does not fit an 80 GB GPU'),
        ratio('trunk FLOPs per image, forward (GFLOP)', m['trunk_fwd_flops'] / 1e9, meaning='training = 3x'),
        ratio('head FLOPs per instance, forward + backward (MFLOP)', m['head_flops'] / 1e6),
        ratio('CPU e2e time per image / cache-mode time per instance', m['cpu_e2e_s_per_image'] /
              m['cpu_head_s_per_instance'], meaning='measured here, batch 4 images vs 32 x 16 instances'),
    ]
    notes += [
        f'trainable parameters (lock_text): cache {m["trainable cache lock_text=True"]:,}, e2e '
        f'{m["trainable e2e lock_text=True"]:,}; with the text tower trainable: cache '
        f'{m["trainable cache lock_text=False"]:,}, e2e {m["trainable e2e lock_text=False"]:,}; all '
        f'{m["counts"]["total"]:,}',
        f'assumed: {gpu_tflops:g} TFLOP/s effective per GPU, bus bandwidth {intra_gbs:g} GB/s within a node and '
        f'{inter_gbs:g} GB/s across nodes (all-reduce time = bytes / bus bandwidth, as nccl-tests reports it); '
        'latency (~10-50 us per collective) not included',
        f'activations per instance: trunk {m["trunk_act_bytes"] / 1e6:.1f} MB/image (fp32, {m["size"]} px), head '
        f'{m["head_act_bytes"] / 1e3:.1f} KB, text tower {m["text_act_bytes"] / 1e6:.1f} MB/report '
        f'({m["text_tokens"]} tokens); bf16 autocast roughly halves activations',
        f'CPU here: e2e {m["cpu_e2e_s_per_image"] * 1e3:.0f} ms/image (forward + backward), cache-mode head '
        f'{m["cpu_head_s_per_instance"] * 1e6:.0f} us/instance',
    ]
    columns = ['setup', 'global batch B', 'patients/GPU b', 'mode', 'all_gather KB/step/rank',
               'all-reduce MB/step/rank', 'all-reduce MB (text trains)', 'comm ms/step (assumed bw)',
               'TFLOP/step/GPU', 'compute ms/step (assumed)',
               'memory GB/GPU (lock_text)', 'memory GB/GPU (text trains)']
    cfg = dict(model=config, gpu_tflops=gpu_tflops, intra_gbs=intra_gbs, inter_gbs=inter_gbs, rounds=rounds,
               seconds=round(time.perf_counter() - start, 1))
    extra = {k: v for k, v in m.items() if k != 'counts'}
    extra['parameter_counts'] = m['counts']
    return result('distributed', '6. Distributed scaling on paper (8 GPUs / 2 nodes)', columns, rows, ratios, notes,
                  cfg, extra)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--gpu-tflops', type=float, default=5.0, help='assumed effective TFLOP/s per GPU')
    ap.add_argument('--intra-gbs', type=float, default=100.0, help='assumed bus bandwidth within a node, GB/s')
    ap.add_argument('--inter-gbs', type=float, default=12.0, help='assumed bus bandwidth across nodes, GB/s')
    args = ap.parse_args(argv)
    res = run(gpu_tflops=args.gpu_tflops, intra_gbs=args.intra_gbs, inter_gbs=args.inter_gbs)
    print_result(res)
    return res


if __name__ == '__main__':
    main()
