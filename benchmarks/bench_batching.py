"""Benchmark 1: batched bags (packed, as shipped) against one bag at a time, on cached trunk features.

    python benchmarks/bench_batching.py                     # 128 patients, batch 32, 3 epochs, both heads
    python benchmarks/bench_batching.py --heads mlp+mean add+gated_attention mlp+transformer --profile

What is compared. The trainable part of the pretrained default in feature-cache mode: cached 1280-dim trunk features
-> scale conditioning -> image projection (1280 -> 256) -> MIL aggregator -> patient embedding, against cached pooled
report features -> text projection; CLIP loss; one AdamW step per batch. Two heads: the default (scale mode mlp:
x = h + e(s), x + MLP(x), MLP 1280 -> 512 -> 1280; mean pooling) and the first release's (add: h + e(s); gated
attention). Every arm sees the same patients in the same batches of B = 32 (the CLIP loss needs the batch for its
negatives), from the same initial weights, and computes the same gradient:

* ``batch1-accum``: one bag at a time, forward *and* backward, as ABMIL/CLAM/TransMIL train (batch size 1). A
  contrastive loss has no per-bag value, so the per-bag gradients are accumulated GradCache-style: embed the B bags
  one by one without gradient, take the loss over those cached embeddings, then re-run each bag forward and backward
  with its embedding's gradient. The arm the brief defines;
* ``batch1-graph``: one bag per forward call, the B graphs kept and one backward of the batch loss: the cheapest
  exact one-bag-at-a-time arm (no second forward), so the strictest comparison;
* ``padded (previous)``: the B bags padded to the longest with a boolean mask, every layer on the padded layout
  (``encode_padded`` below: a faithful copy of ``encode_bags`` before the packed bags);
* ``packed (shipped)``: ``model.encode_bags`` as shipped, batched: the per-instance layers run on the real instances
  only, the aggregator pools them per bag; with mean pooling and a linear projection the bag is pooled before the
  projection (and before the mlp's last layer), W·mean(x) + b = mean(W·x + b); in the add mode the scale embedding
  is folded into the projection, W(x + P e(s) + c) = Wx + (WP) e(s) + Wc, from 140 instances on.

The one-bag arms call the same ``model.encode_bags`` (with ``instances=False``, as training does), so they get every
algebraic saving the batched arm gets; what batching removes is the per-bag dispatch and the small, inefficient
per-bag matrix products. "Equal results": the loss of the same bags in eval mode and the gradients of one step agree
between arms to float rounding, and the per-epoch training losses of the arms, trained side by side, stay equal.
Two bag-size settings: all instances (1-90 per bag, uniform, mean ~45; the real cohort averages 40) and the
training default ``max_instances=16`` (bags of min(n, 16)).

The FLOP floor: ``FlopCounterMode`` counts the matrix-product FLOPs of one step of every arm; the packed step's
achieved GFLOP/s is set against a plain matmul of the head's widest layer, timed in the same run. A batched step at
that rate cannot get faster, so (one-bag step time) x (matmul GFLOP/s) / (packed step FLOPs) bounds the ratio.
"""
from __future__ import annotations

import argparse
import cProfile
import copy
import io
import pstats
import time

from benchutil import build, interleave, median, print_result, ratio, result, text_width  # before torch
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from emclip.data import collate_bags
from emclip.loss import ClipLoss

ARMS = ('batch1-accum', 'batch1-graph', 'padded (previous)', 'packed (shipped)')
ONE_BAG, BATCHED = ARMS[:2], ARMS[2:]
HEADS = ('mlp+mean', 'add+gated_attention')  # the default head, and the first release's


def make_patients(n: int, max_bag: int, feature_dim: int, text_dim: int, cap: int | None, seed: int = 0) -> list:
    """Synthetic cached features with learnable structure: 10 latent diagnoses shared by images and reports."""
    g = torch.Generator().manual_seed(seed)
    img_proto, txt_proto = torch.randn(10, feature_dim, generator=g), torch.randn(10, text_dim, generator=g)
    patients = []
    for i in range(n):
        c = int(torch.randint(10, (1,), generator=g))
        size = int(torch.randint(1, max_bag + 1, (1,), generator=g))
        size = min(size, cap) if cap else size
        feats = (img_proto[c] + 2.0 * torch.randn(size, feature_dim, generator=g)).relu()  # post-ReLU-like, >= 0
        nm = torch.exp(torch.empty(size).uniform_(0.693, 4.605, generator=g))  # log-uniform 2-100 nm/px
        patients.append(dict(features=feats, scales=nm, nm_per_pixel=nm, image_index=torch.arange(size),
                             report='', patient_id=f'P{i:05d}', diagnosis=str(c), image_paths=[],
                             text=txt_proto[c] + 0.5 * torch.randn(text_dim, generator=g)))
    return patients


def encode_padded(model, scales, mask, features):
    """Patient embeddings [B, E] as ``encode_bags(scales, mask, features=...)`` computed them before the packed bags
    (issue 15): padding zeroed, every per-instance layer on all B x K slots, masked pooling, instances normalised."""
    h = features.masked_fill(~mask[..., None], 0)
    z = model.image_proj(model.scale(h, scales))
    context = model.scale.attention_context(scales)
    pooled, attention = model.aggregator(z, mask) if context is None else model.aggregator(z, mask, context)
    F.normalize(z, dim=-1).masked_fill(~mask[..., None], 0)  # the instances it returned (part of its cost)
    return F.normalize(pooled, dim=-1)


def one_bag(model, bag) -> torch.Tensor:
    mask = torch.ones(1, len(bag['features']), dtype=torch.bool)  # batch size 1: no padding
    return model.encode_bags(bag['scales'][None], mask, features=bag['features'][None], instances=False).patient


def patient_embeddings(arm: str, model, bags: list) -> torch.Tensor:
    if arm.startswith('batch1'):
        return torch.cat([one_bag(model, b) for b in bags])
    # collating is part of the batched arms' cost, as in their DataLoader: the previous way padded the features,
    # the shipped one packs them (collate_bags(padded=False): the real rows concatenated, no padded copy)
    if arm == 'padded (previous)':
        batch = collate_bags(bags)
        return encode_padded(model, batch['scales'], batch['mask'], batch['features'])
    batch = collate_bags(bags, padded=False)
    return model.encode_bags(batch['scales'], batch['mask'], packed_features=batch['packed_features'],
                             instances=False).patient


def loss_backward(arm: str, model, bags: list, loss_fn) -> torch.Tensor:
    """Forward + backward of one batch of bags; returns the (detached) batch loss."""
    reports = model.project_text(torch.stack([b['text'] for b in bags]))
    if arm == 'batch1-accum':
        with torch.no_grad():
            cached = torch.cat([one_bag(model, b) for b in bags])
        cached.requires_grad_(True)
        loss = loss_fn(cached, reports, model.logit_scale.exp())
        loss.backward()  # text side and temperature get their gradient here, the bags below
        for j, b in enumerate(bags):
            one_bag(model, b).backward(cached.grad[j:j + 1])
        return loss.detach()
    loss = loss_fn(patient_embeddings(arm, model, bags), reports, model.logit_scale.exp())
    loss.backward()
    return loss.detach()


def equality_check(base, bags, arms, loss_fn) -> dict:
    """Loss (eval mode) and gradients (one backward) of the same bags, as differences to ``batch1-graph``."""
    losses, grads = {}, {}
    for arm in arms:
        model = copy.deepcopy(base).eval()
        with torch.no_grad():
            reports = model.project_text(torch.stack([b['text'] for b in bags]))
            embed_arm = 'batch1-graph' if arm == 'batch1-accum' else arm  # its eval forward is the per-bag one
            losses[arm] = float(loss_fn(patient_embeddings(embed_arm, model, bags), reports, model.logit_scale.exp()))
        model.train().zero_grad()
        loss_backward(arm, model, bags, loss_fn)
        grads[arm] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # relative to the largest gradient entry of the model, not per tensor: some gradients are exactly zero in theory
    # (the attention's output bias: a softmax shift) and hold only rounding noise, which a per-tensor ratio inflates
    ref = grads['batch1-graph']
    scale = max(float(g.abs().max()) for g in ref.values())
    return {arm: dict(loss=losses[arm], loss_diff=abs(losses[arm] - losses['batch1-graph']),
                      grad_rel_diff=max(float((grads[arm][n] - g).abs().max()) for n, g in ref.items()) / scale)
            for arm in arms}


def train_side_by_side(base, patients, arms, batch_size, epochs, lr, seed=0) -> dict:
    """Train one copy of ``base`` per arm on identical batches, interleaving the arms step by step."""
    loss_fn = ClipLoss()
    models = {arm: copy.deepcopy(base).train() for arm in arms}
    opts = {arm: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
            for arm, m in models.items()}
    curves, step_times = {arm: [] for arm in arms}, {arm: [] for arm in arms}
    for epoch in range(epochs):
        order = torch.randperm(len(patients), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        batches = [[patients[i] for i in order[a:a + batch_size]]
                   for a in range(0, len(order) - batch_size + 1, batch_size)]  # drop_last, as in training
        epoch_losses = {arm: [] for arm in arms}
        for bags in batches:
            def step(arm, bags=bags):
                opts[arm].zero_grad(set_to_none=True)
                epoch_losses[arm].append(loss_backward(arm, models[arm], bags, loss_fn).item())
                opts[arm].step()
                models[arm].clamp_logit_scale()
            times = interleave({arm: (lambda arm=arm: step(arm)) for arm in arms}, rounds=1, warmup=0)
            for arm in arms:
                step_times[arm].append(times[arm][0])
        for arm in arms:
            curves[arm].append(sum(epoch_losses[arm]) / len(epoch_losses[arm]))
    # the first step of each arm grows allocators and picks kernels: not a training-throughput sample
    return dict(curves=curves, step_times={a: t[1:] if len(t) > 1 else t for a, t in step_times.items()})


def profile_step(base, bags, arm, top=10) -> str:
    model = copy.deepcopy(base).train()
    loss_fn = ClipLoss()
    loss_backward(arm, model, bags, loss_fn)  # warm-up
    model.zero_grad()
    prof = cProfile.Profile()
    prof.enable()
    loss_backward(arm, model, bags, loss_fn)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats('tottime').print_stats(top)
    return buf.getvalue()


def step_flops(base, bags, arm) -> float:
    """Matrix-product FLOPs (forward + backward) of one training step of ``arm``, as torch counts them."""
    model = copy.deepcopy(base).train()
    with FlopCounterMode(display=False) as counter:
        loss_backward(arm, model, bags, ClipLoss())
    return float(counter.get_total_flops())


def floor_check(base, bags, flops: float, rounds: int = 7) -> dict:
    """The packed step against plain matmuls of the same total FLOPs ([N, F] x [F, W], W the head's widest
    per-instance layer), interleaved round by round: how far the step is from its FLOP floor on this machine now."""
    n = sum(len(b['features']) for b in bags)
    w = max(m.out_features for m in base.modules() if isinstance(m, torch.nn.Linear)
            and m.in_features == base.num_features)
    a, b = torch.randn(n, base.num_features), torch.randn(base.num_features, w)
    repeats = max(1, round(flops / (2 * n * base.num_features * w)))
    model, loss_fn = copy.deepcopy(base).train(), ClipLoss()

    def step():
        model.zero_grad(set_to_none=True)
        loss_backward('packed (shipped)', model, bags, loss_fn)

    def matmuls():
        for _ in range(repeats):
            a @ b
    t = interleave({'step': step, 'matmuls': matmuls}, rounds=rounds)
    mm_rate = repeats * 2 * n * base.num_features * w / median(t['matmuls']) / 1e9
    return dict(step_ms=median(t['step']) * 1e3, matmul_ms=median(t['matmuls']) * 1e3, matmul_gflops=mm_rate,
                step_gflops=flops / median(t['step']) / 1e9, step_over_matmuls=median(
                    [x / y for x, y in zip(t['step'], t['matmuls'])]))


def build_head(config: str, head: str):
    """The trainable part for feature-cache training: architecture only (its ordinary random init)."""
    mode, aggregator = head.split('+')
    return build(config, load_pretrained=False, lock_image=True, lock_text=True, aggregator=aggregator,
                 scale_mode=mode)


def run(n_patients: int = 128, batch_size: int = 32, epochs: int = 3, max_bag: int = 90, caps=(None, 16),
        heads=HEADS, lr: float = 1e-3, profile: bool = False, config='efficientnet_lite0_minilm'):
    start = time.perf_counter()
    rows, ratios, notes, extra = [], [], [], {}
    for head in heads:
        base = build_head(config, head)
        feature_dim, tdim = base.num_features, text_width(base)
        for cap in caps:
            patients = make_patients(n_patients, max_bag, feature_dim, tdim, cap)
            sizes = torch.tensor([len(p['features']) for p in patients], dtype=torch.float)
            first = patients[:batch_size]
            fill = sum(len(p['features']) for p in first) / (batch_size * max(len(p['features']) for p in first))
            eq = equality_check(base, first, ARMS, ClipLoss())
            trained = train_side_by_side(base, patients, ARMS, batch_size, epochs, lr)
            tag = f'{head}, bags 1-{cap or max_bag}'
            st = trained['step_times']
            ref_curve = trained['curves']['batch1-graph']
            flops = {arm: step_flops(base, first, arm) for arm in ARMS}
            for arm in ARMS:
                curve = trained['curves'][arm]
                rows.append([tag, arm, round(median(st[arm]) * 1000, 1), round(batch_size / median(st[arm]), 1),
                             round(median([a / b for a, b in zip(st['batch1-accum'], st[arm])]), 2),
                             round(median([a / b for a, b in zip(st['batch1-graph'], st[arm])]), 2),
                             round(flops[arm] / 1e9, 2), eq[arm]['loss'], eq[arm]['loss_diff'],
                             eq[arm]['grad_rel_diff'], ' > '.join(f'{x:.3f}' for x in curve),
                             max(abs(a - b) for a, b in zip(curve, ref_curve))])
            # paired per-step ratios: the arms of one step ran back to back under the same machine load
            for batched in BATCHED:
                for ref in ONE_BAG:
                    r = median([a / b for a, b in zip(st[ref], st[batched])])
                    shipped = batched == 'packed (shipped)'  # the target is the shipped code's; padded is history
                    ratios.append(ratio(f'{batched} vs {ref}, patients/s [{tag}]', r, '>= 5' if shipped else None,
                                        r >= 5 if shipped else None, 'median of paired per-step ratios'))
            r = median([a / b for a, b in zip(st['padded (previous)'], st['packed (shipped)'])])
            ratios.append(ratio(f'packed vs padded step time [{tag}]', r, meaning='gain of the packed encode_bags'))
            # the floor: the packed step against plain matmuls of its FLOPs, interleaved (same machine load)
            n_inst = int(sum(len(p['features']) for p in first))
            floor = floor_check(base, first, flops['packed (shipped)'])
            # if the packed step ran at the plain-matmul rate, one-bag time / floor time would bound the speed-up
            ceiling = {ref: median(st[ref]) / (floor['matmul_ms'] / 1e3) for ref in ONE_BAG}
            extra[f'floor [{tag}]'] = dict(floor, ceiling=ceiling, flops_per_instance={a: flops[a] / n_inst
                                                                                       for a in ARMS})
            notes.append(f'[{tag}] mean bag {sizes.mean():.1f} images; the first batch ({n_inst} instances) fills '
                         f'{fill:.0%} of its padded slots; matrix-product FLOPs per real instance, forward + '
                         f'backward: ' + ', '.join(f'{a} {flops[a] / n_inst / 1e6:.2f} M' for a in ARMS) +
                         f'. Floor, interleaved: the packed step {floor["step_ms"]:.1f} ms '
                         f'({floor["step_gflops"]:.1f} GFLOP/s), plain matmuls of the same FLOPs '
                         f'{floor["matmul_ms"]:.1f} ms ({floor["matmul_gflops"]:.1f} GFLOP/s), ratio '
                         f'{floor["step_over_matmuls"]:.2f}; a step at the matmul rate would bound the speed-up at '
                         f'{ceiling["batch1-accum"]:.1f}x vs batch1-accum, {ceiling["batch1-graph"]:.1f}x vs '
                         f'batch1-graph')
            if profile:
                for arm in ARMS:
                    extra[f'profile {tag} {arm}'] = profile_step(base, first, arm)
                    print(f'\n--- cProfile, one step, {tag}, {arm}\n' + extra[f'profile {tag} {arm}'])
    columns = ['setting', 'arm', 'ms/step (median)', 'patients/s', '× vs batch1-accum', '× vs batch1-graph',
               'GFLOP/step', 'eval loss (first batch)', '|Δ eval loss|', 'max rel. |Δ grad|',
               f'train loss per epoch ({epochs} ep.)', 'max |Δ train loss|']
    notes.append(f'{n_patients} patients, batch {batch_size}, {epochs} epochs (same batches, same init, AdamW lr {lr});'
                 ' '
                 f'differences are to batch1-graph; speed-ups are medians of paired per-step ratios, step times '
                 f'exclude each arm\'s first step')
    cfg = dict(n_patients=n_patients, batch_size=batch_size, epochs=epochs, max_bag=max_bag, caps=list(caps),
               heads=list(heads), lr=lr, model=config, seconds=round(time.perf_counter() - start, 1))
    return result('batching', '1. Batched bags vs one bag at a time (cached features, training step)', columns, rows,
                  ratios, notes, cfg, extra)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--patients', type=int, default=128)
    ap.add_argument('--batch-size', type=int, default=32)
    ap.add_argument('--epochs', type=int, default=3)
    ap.add_argument('--max-bag', type=int, default=90)
    ap.add_argument('--caps', type=int, nargs='+', default=[0, 16], help='bag-size caps, 0 = none')
    ap.add_argument('--heads', nargs='+', default=list(HEADS), help='scale_mode+aggregator pairs')
    ap.add_argument('--config', default='efficientnet_lite0_minilm')
    ap.add_argument('--profile', action='store_true', help='cProfile one step of every arm')
    args = ap.parse_args(argv)
    res = run(args.patients, args.batch_size, args.epochs, args.max_bag, caps=[c or None for c in args.caps],
              heads=args.heads, profile=args.profile, config=args.config)
    print_result(res)
    return res


if __name__ == '__main__':
    main()
