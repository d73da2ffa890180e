"""Benchmark 5: retrieval and zero-shot evaluation at the real cohort's size, against the matrix-product bound.

    python benchmarks/bench_retrieval.py            # 600,000 images; 555 of the 15,000 report queries per round
    python benchmarks/bench_retrieval.py --full     # all 15,000 report queries (one round, ~10 minutes on 2 cores)

Synthetic joint-space embeddings of the real cohort's size: 15,000 patients x 40 images = 600,000 L2-normalised
256-dim float32 image embeddings (the default model's joint space), one report embedding per patient (a noisy mean of
its images, so that ranks are not trivial), 10 diagnosis classes (one patient in 20 unlabelled for image -> image).

Each retrieval task runs four arms side by side in this process, round-robin and paired (``benchutil.interleave``;
ratios are medians of per-round ratios), over the same query chunks (the shipped chunk size):

* ``matmul``: the bound. A plain loop of ``torch.matmul(q[a:b], x.T, out=buffer)``, nothing else;
* ``matmul, fresh buffer``: the same loop written ``q[a:b] @ x.T`` (a new 100+ MB matrix per chunk: page faults);
* ``previous``: the ranking shipped before issue 15, kept verbatim in ``retrieval_previous.py``;
* ``shipped``: ``emclip.metrics.retrieval_ranks_from_embeddings`` / ``retrieval_ranks_by_label`` (one comparison
  pass and one row sum per chunk, into a reused buffer).

Tasks: report -> image (positives: the patient's 40 images; a subset of the queries per round, time extrapolated
linearly to all 15,000: every query costs the same), image -> image (labelled image queries, other patients only,
same-diagnosis positives; extrapolated to the evaluation's 10,000 queries), patient <-> report (15,000 x 15,000, both
directions). Shipped and previous ranks are compared for equality. Then zero-shot: 600,000 image embeddings x 10
class embeddings, the image-level softmax, MI-Zero top-j pooling to patients and the headline metrics.

Memory is the process's peak RSS (sampled every 5 ms; tracemalloc would miss torch's allocations) above the RSS at
the start of each call. For scale: the dense 15,000 x 600,000 float32 score matrix would take 34 GB.
"""
from __future__ import annotations

import argparse
import gc
import time

from benchutil import GB, MB, PeakRSS, interleave, median, paired_ratio, print_result, ratio, result, rss_bytes
import numpy as np
import torch
from emclip.evaluation.zeroshot import softmax, topj_pool, zero_shot_logits
from emclip.metrics import (
    _chunk_rows, headline_metrics, recall_from_ranks, retrieval_ranks_by_label, retrieval_ranks_from_embeddings)
from retrieval_previous import image_image_ranks_previous, retrieval_ranks_from_embeddings_previous

KS = (1, 5, 10, 50)
ARMS = ('matmul', 'matmul, fresh buffer', 'previous', 'shipped')
TARGET = 1.3


def make_embeddings(n_patients: int, per_patient: int, dim: int, n_classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(n_classes, (n_patients,), generator=g)
    classes = torch.nn.functional.normalize(torch.randn(n_classes, dim, generator=g), dim=1)
    items = torch.randn(n_patients * per_patient, dim, generator=g)
    items.add_(classes[labels].repeat_interleave(per_patient, 0), alpha=0.15 * dim ** 0.5)  # class signal
    items.div_(items.norm(dim=1, keepdim=True))
    reports = items.view(n_patients, per_patient, dim).mean(1)
    reports.add_(torch.randn(n_patients, dim, generator=g), alpha=0.5 / dim ** 0.5)
    reports.div_(reports.norm(dim=1, keepdim=True))
    patients = torch.nn.functional.normalize(items.view(n_patients, per_patient, dim).mean(1), dim=1)
    owner = np.repeat(np.arange(n_patients), per_patient)
    return items, reports, patients, classes, labels.numpy(), owner


def matmul_loop(q: torch.Tensor, x: torch.Tensor, rows: int, fresh: bool = False):
    """The bound: the chunk products alone, over the same chunks as the shipped ranking."""
    buf = None if fresh else torch.empty(min(rows, len(q)), len(x), dtype=x.dtype)
    for a in range(0, len(q), rows):
        b = min(len(q), a + rows)
        if fresh:
            scores = q[a:b] @ x.T
            del scores
        else:
            torch.matmul(q[a:b], x.T, out=buf[:b - a])


class Arms:
    """Wrap each arm so that every call records its extra peak RSS and keeps its last output."""

    def __init__(self, fns: dict):
        self.fns, self.out, self.mem = fns, {}, {k: 0 for k in fns}

    def call(self, name):
        def run():
            with PeakRSS() as m:
                self.out[name] = self.fns[name]()
            self.mem[name] = max(self.mem[name], m.peak - m.start)
        return run

    def time(self, rounds: int, warm=None) -> dict:
        for fn in (warm or {}).values():  # first touch of each shape (allocator, oneDNN) on a small slice
            fn()
        gc.collect()
        return interleave({k: self.call(k) for k in self.fns}, rounds=rounds, warmup=0)


def compare(name: str, arms: Arms, times: dict, scale: float, what: str, rows_out: list, ratios: list):
    """Table rows and ratios of one task; ``scale`` extrapolates measured seconds to the full task."""
    equal = bool(np.array_equal(arms.out['shipped'], arms.out['previous']))
    shipped_ratio = paired_ratio(times, 'shipped', 'matmul')
    for arm in ARMS:
        sec = median(times[arm])
        rows_out.append([name, arm, round(sec, 2), round(sec * scale, 1), round(paired_ratio(times, arm, 'matmul'), 3),
                         round(arms.mem[arm] / MB), what if arm == 'shipped' else ''])
    ratios.append(ratio(f'{name}: shipped / matmul', shipped_ratio, target=f'<= {TARGET}',
                        met=shipped_ratio <= TARGET and equal,
                        meaning=f'paired over {len(times["matmul"])} rounds; ranks equal to previous: '
                                f'{"yes" if equal else "NO"}'))
    ratios.append(ratio(f'{name}: previous / matmul', paired_ratio(times, 'previous', 'matmul'),
                        meaning='the ranking shipped before issue 15, same chunks'))
    ratios.append(ratio(f'{name}: previous / shipped', paired_ratio(times, 'previous', 'shipped'),
                        meaning='speed-up of the shipped ranking'))
    return equal


def run(n_patients: int = 15_000, per_patient: int = 40, queries: int = 555, dim: int = 256, n_classes: int = 10,
        top_j: int = 5, rounds: int | None = None, image_queries: int = 1_110, eval_image_queries: int = 10_000,
        seed: int = 0):
    start = time.perf_counter()
    base_rss = rss_bytes()
    t0 = time.perf_counter()
    items, reports, patients, classes, labels, owner = make_embeddings(n_patients, per_patient, dim, n_classes, seed)
    setup = time.perf_counter() - t0
    n_items = len(items)
    data_rss = rss_bytes()
    queries = min(queries, n_patients)
    rounds = rounds or (3 if queries < n_patients else 1)
    rows_out, ratios, equal = [], [], {}
    rows = _chunk_rows(n_items, items.element_size(), None)

    # report -> image ----------------------------------------------------------------------------------------
    q = reports[:queries]
    positives = [np.arange(i * per_patient, (i + 1) * per_patient) for i in range(queries)]
    fns = {'matmul': lambda: matmul_loop(q, items, rows),
           'matmul, fresh buffer': lambda: matmul_loop(q, items, rows, fresh=True),
           'previous': lambda: retrieval_ranks_from_embeddings_previous(q, items, positives),
           'shipped': lambda: retrieval_ranks_from_embeddings(q, items, positives)}
    k = min(queries, rows)
    warm = {'matmul': lambda: matmul_loop(q[:k], items, rows),
            'previous': lambda: retrieval_ranks_from_embeddings_previous(q[:k], items, positives[:k]),
            'shipped': lambda: retrieval_ranks_from_embeddings(q[:k], items, positives[:k])}
    arms = Arms(fns)
    times = arms.time(rounds, warm)
    rec = recall_from_ranks(arms.out['shipped'], KS)
    scale = n_patients / queries
    equal['report->image'] = compare('report->image', arms, times, scale,
                                     ', '.join(f'R@{k} {v:.3f}' for k, v in rec.items()), rows_out, ratios)
    full_sec = median(times['shipped']) * scale
    ratios.append(ratio(f'report->image Recall@K: seconds for all {n_patients:,} queries, shipped' +
                        (' (extrapolated)' if queries < n_patients else ' (measured)'), full_sec,
                        meaning=f'{queries:,} queries per round: {queries / median(times["shipped"]):,.0f} '
                                f'queries/s; previous {median(times["previous"]) * scale:,.0f} s'))
    ratios.append(ratio('report->image Recall@K: extra peak memory (MB) over the embeddings, shipped',
                        arms.mem['shipped'] / MB,
                        meaning=f'previous {arms.mem["previous"] / MB:.0f} MB; one chunk of scores '
                                f'{min(rows, queries) * n_items * 4 / MB:.0f} MB; dense score matrix '
                                f'{n_patients * n_items * 4 / GB:.0f} GB'))
    del arms, fns, warm

    # image -> image -----------------------------------------------------------------------------------------
    label = labels[owner].astype(np.int64)
    label[np.isin(owner, np.arange(0, n_patients, 20))] = -1  # one patient in 20 without a diagnosis
    labelled = np.flatnonzero(label >= 0)
    n_img = min(image_queries, len(labelled))
    qi = np.sort(np.random.default_rng(seed).choice(labelled, size=n_img, replace=False))
    qx = items[qi]
    fns = {'matmul': lambda: matmul_loop(qx, items, rows),
           'matmul, fresh buffer': lambda: matmul_loop(qx, items, rows, fresh=True),
           'previous': lambda: image_image_ranks_previous(items, label, owner, qi),
           'shipped': lambda: retrieval_ranks_by_label(qx, items, label[qi], label, owner[qi], owner)}
    k = min(n_img, rows)
    warm = {'previous': lambda: image_image_ranks_previous(items, label, owner, qi[:k]),
            'shipped': lambda: retrieval_ranks_by_label(qx[:k], items, label[qi[:k]], label, owner[qi[:k]], owner)}
    arms = Arms(fns)
    times = arms.time(rounds, warm)
    rec = recall_from_ranks(arms.out['shipped'], KS)
    n_eval = min(eval_image_queries, len(labelled))
    equal['image->image'] = compare('image->image', arms, times, n_eval / n_img,
                                    ', '.join(f'p@{k} {v:.3f}' for k, v in rec.items()), rows_out, ratios)
    del arms, fns, warm

    # patient <-> report -------------------------------------------------------------------------------------
    ids = np.arange(n_patients)
    pr_rows = _chunk_rows(n_patients, 4, None)
    fns = {'matmul': lambda: (matmul_loop(reports, patients, pr_rows), matmul_loop(patients, reports, pr_rows)),
           'matmul, fresh buffer': lambda: (matmul_loop(reports, patients, pr_rows, fresh=True),
                                            matmul_loop(patients, reports, pr_rows, fresh=True)),
           'previous': lambda: np.concatenate([retrieval_ranks_from_embeddings_previous(reports, patients, ids),
                                               retrieval_ranks_from_embeddings_previous(patients, reports, ids)]),
           'shipped': lambda: np.concatenate([retrieval_ranks_from_embeddings(reports, patients, ids),
                                              retrieval_ranks_from_embeddings(patients, reports, ids)])}
    arms = Arms(fns)
    times = arms.time(rounds + 2 if queries < n_patients else 3,
                      {'shipped': lambda: retrieval_ranks_from_embeddings(reports[:100], patients, ids[:100])})
    both = arms.out['shipped']
    equal['patient<->report'] = compare(
        'patient<->report', arms, times, 1.0,
        f'report->patient R@1 {np.mean(both[:n_patients] <= 1):.3f}, patient->report R@1 '
        f'{np.mean(both[n_patients:] <= 1):.3f}', rows_out, ratios)
    del arms, fns

    # zero-shot ----------------------------------------------------------------------------------------------
    items_np = items.numpy()  # shares memory with the tensor: no copy

    def zero_shot():
        logits = zero_shot_logits(items_np, classes.numpy(), scale=100.0)
        probs = softmax(logits)
        image_metrics = headline_metrics(labels[owner], probs)
        pooled = topj_pool(logits, owner, n_patients, top_j)
        patient_metrics = headline_metrics(labels, softmax(pooled))
        return image_metrics, patient_metrics
    gc.collect()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        img_m, pat_m = zero_shot()
        sec = time.perf_counter() - t0
    rows_out.append([f'zero-shot: {n_items:,} images x {n_classes} classes, softmax, top-{top_j} pooling, metrics',
                     'shipped', round(sec, 2), round(sec, 1), '', round((mem.peak - mem.start) / MB),
                     f'image AUC {img_m["roc_auc_macro_ovr"]:.3f}, patient (top-{top_j}) AUC '
                     f'{pat_m["roc_auc_macro_ovr"]:.3f}'])
    ratios.append(ratio('zero-shot over 600k images: seconds', sec, meaning='logits, softmax, top-j pooling, metrics'))
    peak = max(rss_bytes(), mem.peak, data_rss)
    ratios.append(ratio('peak RSS of the whole evaluation (GB)', peak / GB,
                        meaning=f'embeddings alone {(items.numel() + reports.numel() + patients.numel()) * 4 / GB:.2f} '
                                f'GB; process before data {base_rss / GB:.2f} GB'))
    columns = ['task', 'arm', 'seconds (median round)', 'seconds (full task)', 'x matmul (paired)',
               'extra peak RSS (MB)', 'values']
    notes = [f'{n_patients:,} patients x {per_patient} images = {n_items:,} image embeddings, {dim}-dim float32 '
             f'({items.numel() * 4 / GB:.2f} GB), generated in {setup:.1f} s; RSS with the data {data_rss / GB:.2f} GB',
             f'per round: report->image {queries:,} of {n_patients:,} queries, image->image {n_img:,} queries '
             f'(full task: {n_eval:,}, the evaluation default), patient<->report all {n_patients:,} both ways; '
             f'chunks of {min(rows, queries)} queries x {n_items:,} images '
             f'({min(rows, queries) * n_items * 4 / MB:.0f} MB of scores) and {min(pr_rows, n_patients)} x '
             f'{n_patients:,} for patient<->report (the shipped sizes)',
             'ranks of shipped and previous identical: ' + ', '.join(f'{k} {"yes" if v else "NO"}'
                                                                   for k, v in equal.items()),
             'extra peak RSS = peak during a call minus RSS at its start (sampled every 5 ms), max over rounds; MB '
             'and GB are 2^20 and 2^30 bytes']
    cfg = dict(n_patients=n_patients, per_patient=per_patient, queries=queries, dim=dim, n_classes=n_classes,
               top_j=top_j, rounds=rounds, image_queries=n_img, chunk_rows=rows,
               seconds=round(time.perf_counter() - start, 1))
    return result('retrieval', '5. Retrieval and zero-shot at 600,000 images / 15,000 reports', columns, rows_out,
                  ratios, notes, cfg, extra=dict(ranks_equal=equal))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--patients', type=int, default=15_000)
    ap.add_argument('--per-patient', type=int, default=40)
    ap.add_argument('--queries', type=int, default=555, help='report queries timed per round')
    ap.add_argument('--image-queries', type=int, default=1_110, help='image->image queries timed per round')
    ap.add_argument('--rounds', type=int, default=None, help='default 3 (1 with all queries)')
    ap.add_argument('--full', action='store_true', help='all report queries (one round)')
    ap.add_argument('--dim', type=int, default=256)
    args = ap.parse_args(argv)
    res = run(args.patients, args.per_patient, args.patients if args.full else args.queries, args.dim,
              rounds=args.rounds, image_queries=args.image_queries)
    print_result(res)
    return res


if __name__ == '__main__':
    main()
