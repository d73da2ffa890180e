"""Benchmark 5: retrieval and zero-shot evaluation at the real cohort's size, with bounded memory.

    python benchmarks/bench_retrieval.py                    # 600,000 images; 1,500 of the 15,000 report queries
    python benchmarks/bench_retrieval.py --queries 15000    # the full size (several minutes on 2 cores)

Synthetic joint-space embeddings of the real cohort's size: 15,000 patients x 40 images = 600,000 L2-normalised
256-dim float32 image embeddings (the default model's joint space), one report embedding per patient (a noisy mean of
its images, so that ranks are not trivial), 10 diagnosis classes. Stages, each timed with the process's peak RSS
(sampled every 5 ms; tracemalloc would miss torch's allocations):

* report -> image Recall@1/5/10/50 (``emclip.metrics.recall_at_k_from_embeddings``; positives = the patient's 40
  images, as index lists): the score matrix exists one chunk of queries at a time. The default runs a subset of the
  report queries against all 600,000 images and extrapolates the time linearly in the number of queries (every
  query costs the same); memory does not depend on the number of queries;
* patient <-> report Recall@K, 15,000 x 15,000, in both directions;
* zero-shot: 600,000 image embeddings x 10 class embeddings (``emclip.evaluation.zeroshot.zero_shot_logits``), the
  image-level softmax, MI-Zero top-j pooling to patients (``topj_pool``), and the headline metrics (ROC-AUC,
  balanced accuracy, F1) at image and patient level.

For scale: the dense 15,000 x 600,000 float32 score matrix would take 36 GB.
"""
from __future__ import annotations

import argparse
import gc
import time

from benchutil import GB, MB, PeakRSS, print_result, ratio, result, rss_bytes  # before torch
import numpy as np
import torch
from emclip.evaluation.zeroshot import softmax, topj_pool, zero_shot_logits
from emclip.metrics import headline_metrics, recall_at_k_from_embeddings


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


def stage(name: str, fn):
    """Run ``fn`` once; returns (output, seconds, peak RSS above the RSS at the start, peak RSS)."""
    gc.collect()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return out, seconds, mem.peak - mem.start, mem.peak


def run(n_patients: int = 15_000, per_patient: int = 40, queries: int = 1_500, dim: int = 256, n_classes: int = 10,
        top_j: int = 5):
    start = time.perf_counter()
    base_rss = rss_bytes()
    t0 = time.perf_counter()
    items, reports, patients, classes, labels, owner = make_embeddings(n_patients, per_patient, dim, n_classes)
    setup = time.perf_counter() - t0
    n_items = len(items)
    data_rss = rss_bytes()
    queries = min(queries, n_patients)
    positives = [np.arange(i * per_patient, (i + 1) * per_patient) for i in range(queries)]
    rows, ratios = [], []

    rec, sec, extra_mem, peak = stage('report->image', lambda: recall_at_k_from_embeddings(
        reports[:queries], items, positives, ks=(1, 5, 10, 50)))
    full_sec = sec * n_patients / queries
    rows.append([f'report -> image Recall@K ({queries:,} of {n_patients:,} queries x {n_items:,} images)',
                 round(sec, 1), round(full_sec, 1), round(extra_mem / MB), round(peak / GB, 2),
                 ', '.join(f'R@{k} {v:.3f}' for k, v in rec.items())])
    ratios.append(ratio('report->image Recall@K: seconds for all 15,000 queries' +
                        (' (extrapolated)' if queries < n_patients else ' (measured)'), full_sec,
                        meaning=f'{queries:,} queries measured: {queries / sec:,.0f} queries/s'))
    ratios.append(ratio('report->image Recall@K: extra peak memory (MB) over the embeddings', extra_mem / MB,
                        meaning=f'dense score matrix would be {n_patients * n_items * 4 / GB:.0f} GB'))

    def both_ways():
        ids = np.arange(n_patients)
        return (recall_at_k_from_embeddings(reports, patients, ids, ks=(1, 5, 10, 50)),
                recall_at_k_from_embeddings(patients, reports, ids, ks=(1, 5, 10, 50)))
    (r2p, p2r), sec, extra_mem, peak = stage('patient<->report', both_ways)
    rows.append([f'patient <-> report Recall@K ({n_patients:,} x {n_patients:,}, both directions)', round(sec, 1),
                 round(sec, 1), round(extra_mem / MB), round(peak / GB, 2),
                 f'report->patient R@1 {r2p[1]:.3f}, patient->report R@1 {p2r[1]:.3f}'])

    items_np = items.numpy()  # shares memory with the tensor: no copy

    def zero_shot():
        logits = zero_shot_logits(items_np, classes.numpy(), scale=100.0)
        probs = softmax(logits)
        image_metrics = headline_metrics(labels[owner], probs)
        pooled = topj_pool(logits, owner, n_patients, top_j)
        patient_metrics = headline_metrics(labels, softmax(pooled))
        return image_metrics, patient_metrics
    (img_m, pat_m), sec, extra_mem, peak = stage('zero-shot', zero_shot)
    rows.append([f'zero-shot: {n_items:,} images x {n_classes} classes, softmax, top-{top_j} pooling, metrics',
                 round(sec, 1), round(sec, 1), round(extra_mem / MB), round(peak / GB, 2),
                 f'image AUC {img_m["roc_auc_macro_ovr"]:.3f}, patient (top-{top_j}) AUC '
                 f'{pat_m["roc_auc_macro_ovr"]:.3f}'])
    ratios.append(ratio('zero-shot over 600k images: seconds', sec, meaning='logits, softmax, top-j pooling, metrics'))
    ratios.append(ratio('peak RSS of the whole evaluation (GB)', max(peak, data_rss) / GB,
                        meaning=f'embeddings alone {(items.numel() + reports.numel() + patients.numel()) * 4 / GB:.2f} '
                                f'GB; process before data {base_rss / GB:.2f} GB'))
    columns = ['stage', 'seconds (measured)', 'seconds (all 15,000 queries)', 'extra peak RSS (MB)', 'peak RSS (GB)',
               'values']
    notes = [f'{n_patients:,} patients x {per_patient} images = {n_items:,} image embeddings, {dim}-dim float32 '
             f'({items.numel() * 4 / GB:.2f} GB), generated in {setup:.1f} s; RSS with the data '
             f'{data_rss / GB:.2f} GB; chunked score matrix (default 256 MB budget per chunk)',
             'extra peak RSS = peak during the stage minus RSS at its start (sampled every 5 ms); MB and GB here are '
             '2^20 and 2^30 bytes']
    cfg = dict(n_patients=n_patients, per_patient=per_patient, queries=queries, dim=dim, n_classes=n_classes,
               top_j=top_j, seconds=round(time.perf_counter() - start, 1))
    return result('retrieval', '5. Retrieval and zero-shot at 600,000 images / 15,000 reports', columns, rows, ratios,
                  notes, cfg)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--patients', type=int, default=15_000)
    ap.add_argument('--per-patient', type=int, default=40)
    ap.add_argument('--queries', type=int, default=1_500, help='report queries timed (15000 = full size)')
    ap.add_argument('--dim', type=int, default=256)
    args = ap.parse_args(argv)
    res = run(args.patients, args.per_patient, args.queries, args.dim)
    print_result(res)
    return res


if __name__ == '__main__':
    main()
