"""Benchmark 1: padded + masked batches of bags against one bag at a time, on cached trunk features.

    python benchmarks/bench_batching.py                     # 128 patients, batch 32, 3 epochs, gated attention
    python benchmarks/bench_batching.py --aggregators mean gated_attention transformer --profile

What is compared. The trainable part of the pretrained default in feature-cache mode: cached 1280-dim trunk features
+ scale embedding -> image projection (1280 -> 256) -> MIL aggregator -> patient embedding, against cached pooled
report features -> text projection; CLIP loss; one AdamW step per batch. Every arm sees the same patients in the same
batches of B = 32 (the CLIP loss needs the batch for its negatives), from the same initial weights, and computes the
same gradient:

* ``batch1-accum``: one bag at a time, forward *and* backward, as ABMIL/CLAM/TransMIL train (batch size 1). A
  contrastive loss has no per-bag value, so the per-bag gradients are accumulated GradCache-style: embed the B bags
  one by one without gradient, take the loss over those cached embeddings, then re-run each bag forward and backward
  with its embedding's gradient. The arm the brief defines;
* ``batch1-graph``: one bag per forward call, the B graphs kept and one backward of the batch loss: the cheapest
  exact one-bag-at-a-time arm (no second forward), so the strictest comparison;
* ``padded``: the B bags padded to the longest with a boolean mask, one ``model.encode_bags`` call for the whole
  batch (as shipped);
* ``packed``: a proposed ``encode_bags`` for cached features (``encode_packed`` below), batched too: the
  per-instance layers run on the real instances only (no padding rows); the scale embedding is folded into the
  projection, W(x + P e(s) + c) = Wx + (WP) e(s) + Wc, so the 1280-wide sum and its gradient are never formed; gated
  attention and mean pooling score and pool the packed instances (padding gets -inf / no weight, as before).

The one-bag arms use the shipped ``encode_bags``: for bags below ~140 instances it is also the faster per-bag code
(the fold costs a fixed 256x1280x64 product per call, which a batch pays once and a single bag pays every time).

"Equal results": the loss of the same bags in eval mode and the gradients of one step agree between arms to float
rounding, and the per-epoch training losses of the arms, trained side by side, stay equal. Two bag-size settings:
all instances (1-90 per bag, uniform, mean ~45; the real cohort averages 40) and the training default
``max_instances=16`` (bags of min(n, 16)).
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
from emclip.data import collate_bags
from emclip.loss import ClipLoss
from emclip.model.aggregators import GatedAttentionPool, MeanPool

ARMS = ('batch1-accum', 'batch1-graph', 'padded', 'packed')


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


def _linear_of(module):
    """The nn.Linear of a plain linear projection (open_clip's timm head is Dropout(0) + Linear), else None."""
    if isinstance(module, torch.nn.Linear):
        return module
    layers = [m for m in module.children() if not (isinstance(m, torch.nn.Dropout) and m.p == 0)]
    return layers[0] if len(layers) == 1 and isinstance(layers[0], torch.nn.Linear) else None


def _additive_embed(model):
    """The scale embedding of the additive mode (the prototype folds it into the projection), else None."""
    if model.scale.mode != 'add' or model.scale_embed is None:
        if model.scale.mode != 'add':
            raise ValueError(f'the packed prototype covers scale mode "add" only, not {model.scale.mode!r}')
        return None
    return model.scale_embed['feature']


def encode_packed(model, scales, mask, features):
    """Patient embeddings as ``encode_bags(scales, mask, features=...)`` computes them, without work on padding."""
    idx = mask.nonzero(as_tuple=True)
    x = features[idx]  # [N, F] real instances only
    lin, se, agg = _linear_of(model.image_proj), _additive_embed(model), model.aggregator
    if lin is not None and se is not None and se.proj is not None:
        enc = se.encoding(se.norm(scales[idx])).to(x.dtype)  # [N, 64]
        bias = lin.weight @ se.proj.bias + (lin.bias if lin.bias is not None else 0)
        z = F.linear(x, lin.weight) + F.linear(enc, lin.weight @ se.proj.weight, bias)
    else:  # another projection or scale encoding: packing alone
        z = model.image_proj(x + se(scales[idx]).to(x.dtype) if se is not None else x)
    if isinstance(agg, (GatedAttentionPool, MeanPool)):
        if isinstance(agg, GatedAttentionPool):
            score = agg.attn_w(agg.drop(torch.tanh(agg.attn_v(z)) * torch.sigmoid(agg.attn_u(z)))).squeeze(-1)
        else:
            score = z.new_zeros(len(z))
        weights = z.new_full(mask.shape, float('-inf')).index_put(idx, score).softmax(dim=1)  # masked softmax
        pooled = z.new_zeros(mask.shape[0], z.shape[1]).index_add(0, idx[0], weights[idx][:, None] * z)
    else:  # e.g. the transformer: it needs the padded layout
        pooled, _ = agg(z.new_zeros(*mask.shape, z.shape[-1]).index_put(idx, z), mask)
    return F.normalize(pooled, dim=-1)


def one_bag(model, bag) -> torch.Tensor:
    mask = torch.ones(1, len(bag['features']), dtype=torch.bool)  # batch size 1: no padding
    return model.encode_bags(bag['scales'][None], mask, features=bag['features'][None]).patient


def patient_embeddings(arm: str, model, bags: list) -> torch.Tensor:
    if arm.startswith('batch1'):
        return torch.cat([one_bag(model, b) for b in bags])
    batch = collate_bags(bags)  # the padding is part of the batched arms' cost, as in their DataLoader
    if arm == 'padded':
        return model.encode_bags(batch['scales'], batch['mask'], features=batch['features']).patient
    return encode_packed(model, batch['scales'], batch['mask'], batch['features'])


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


def flops_per_instance(model) -> dict:
    """Multiply-add FLOPs per real instance of the per-instance layers, forward + backward, as shipped and packed."""
    f, e = model.num_features, model.embed_dim
    se = _additive_embed(model)
    d = se.encoding.out_dim if se is not None and se.proj is not None else 0
    shipped = 2 * (d * f) * 2 + 2 * (f * e) * 3  # scale proj: fwd + dW; image proj: fwd + dW + dX (for the scale grad)
    packed = 2 * (f * e) * 2 + 2 * (d * e) * 2  # image proj: fwd + dW; folded scale term: fwd + dW (tiny)
    return dict(shipped=shipped, packed=packed)


def run(n_patients: int = 128, batch_size: int = 32, epochs: int = 3, max_bag: int = 90, caps=(None, 16),
        aggregators=('gated_attention',), lr: float = 1e-3, profile: bool = False, config='efficientnet_lite0_minilm'):
    start = time.perf_counter()
    rows, ratios, notes, extra = [], [], [], {}
    for aggregator in aggregators:
        # architecture only: the trainable head starts from its ordinary random init, weights are irrelevant here
        base = build(config, load_pretrained=False, lock_image=True, lock_text=True, aggregator=aggregator,
                     scale_mode='add')  # the packed prototype covers add only
        feature_dim, tdim = base.num_features, text_width(base)
        fl = flops_per_instance(base)
        for cap in caps:
            patients = make_patients(n_patients, max_bag, feature_dim, tdim, cap)
            sizes = torch.tensor([len(p['features']) for p in patients], dtype=torch.float)
            first = patients[:batch_size]
            fill = sum(len(p['features']) for p in first) / (batch_size * max(len(p['features']) for p in first))
            eq = equality_check(base, first, ARMS, ClipLoss())
            trained = train_side_by_side(base, patients, ARMS, batch_size, epochs, lr)
            tag = f'{aggregator}, bags 1-{cap or max_bag}'
            st = trained['step_times']
            ref_curve = trained['curves']['batch1-graph']
            for arm in ARMS:
                curve = trained['curves'][arm]
                rows.append([tag, arm, round(median(st[arm]) * 1000, 1), round(batch_size / median(st[arm]), 1),
                             round(median([a / b for a, b in zip(st['batch1-accum'], st[arm])]), 2),
                             round(median([a / b for a, b in zip(st['batch1-graph'], st[arm])]), 2),
                             eq[arm]['loss'], eq[arm]['loss_diff'], eq[arm]['grad_rel_diff'],
                             ' > '.join(f'{x:.3f}' for x in curve), max(abs(a - b) for a, b in zip(curve, ref_curve))])
            # paired per-step ratios: the arms of one step ran back to back under the same machine load
            for batched in ('padded', 'packed'):
                for ref in ('batch1-accum', 'batch1-graph'):
                    r = median([a / b for a, b in zip(st[ref], st[batched])])
                    what = 'as shipped' if batched == 'padded' else 'proposed'
                    ratios.append(ratio(f'{batched} ({what}) vs {ref}, patients/s [{tag}]', r, '>= 5', r >= 5,
                                        'median of paired per-step ratios'))
            r = median([a / b for a, b in zip(st['padded'], st['packed'])])
            ratios.append(ratio(f'packed vs padded step time [{tag}]', r, meaning='gain of the proposed encode_bags'))
            notes.append(f'[{tag}] mean bag {sizes.mean():.1f} images; the first batch fills {fill:.0%} of its padded '
                         f'slots; per-instance layers cost {fl["shipped"] / 1e6:.2f} MFLOP (fwd+bwd) as shipped, '
                         f'{fl["packed"] / 1e6:.2f} packed, so padded/packed compute is '
                         f'{fl["shipped"] / fill / fl["packed"]:.1f}x on this batch')
            if profile:
                for arm in ARMS:
                    extra[f'profile {tag} {arm}'] = profile_step(base, first, arm)
                    print(f'\n--- cProfile, one step, {tag}, {arm}\n' + extra[f'profile {tag} {arm}'])
    columns = ['setting', 'arm', 'ms/step (median)', 'patients/s', '× vs batch1-accum', '× vs batch1-graph',
               'eval loss (first batch)', '|Δ eval loss|', 'max rel. |Δ grad|',
               f'train loss per epoch ({epochs} ep.)', 'max |Δ train loss|']
    notes.append(f'{n_patients} patients, batch {batch_size}, {epochs} epochs (same batches, same init, AdamW lr {lr});'
                 ' '
                 f'differences are to batch1-graph; speed-ups are medians of paired per-step ratios, step times '
                 f'exclude each arm\'s first step')
    cfg = dict(n_patients=n_patients, batch_size=batch_size, epochs=epochs, max_bag=max_bag, caps=list(caps),
               aggregators=list(aggregators), lr=lr, model=config, seconds=round(time.perf_counter() - start, 1))
    return result('batching', '1. Batched bags vs one bag at a time (cached features, training step)', columns, rows,
                  ratios, notes, cfg, extra)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--patients', type=int, default=128)
    ap.add_argument('--batch-size', type=int, default=32)
    ap.add_argument('--epochs', type=int, default=3)
    ap.add_argument('--max-bag', type=int, default=90)
    ap.add_argument('--aggregators', nargs='+', default=['gated_attention'])
    ap.add_argument('--profile', action='store_true', help='cProfile one step of every arm')
    args = ap.parse_args(argv)
    res = run(args.patients, args.batch_size, args.epochs, args.max_bag, aggregators=args.aggregators,
              profile=args.profile)
    print_result(res)
    return res


if __name__ == '__main__':
    main()
