"""Wall time and peak memory of chunked Recall@K at the real cohort's scale.

15,000 report queries against 600,000 image embeddings (512-dim float32, L2-normalised), 40 positives per query
given as index lists (report -> image retrieval: the patient's own images). The score matrix only ever exists one
chunk of queries at a time, in one reused buffer, so the extra memory is about ``chunk_size * n_items * 4`` bytes on top
of the 1.2 GB item matrix. The plain loop of chunk products (``torch.matmul(..., out=buffer)``, the same chunks) runs
right after it as the bound; bench_retrieval.py measures the same ratio round-robin and paired.

Peak memory is measured as process RSS (sampled every 5 ms by a thread, cross-checked with getrusage's maxrss):
tracemalloc would miss torch's allocations, which bypass Python's allocator.

    python benchmarks/recall_at_scale.py                       # full size, a few minutes on 2 CPU cores
    python benchmarks/recall_at_scale.py --queries 1500 --items 60000   # quick look
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from emclip.metrics import median_rank, recall_from_ranks, retrieval_ranks_from_embeddings  # noqa: E402

GB = 1024 ** 3


def rss_bytes() -> int:
    with open('/proc/self/statm') as fh:  # resident pages; cheap enough to sample every few ms
        return int(fh.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


class PeakRSS:
    """Background sampler of the process's resident set size."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def make_data(n_queries: int, n_items: int, dim: int, seed: int):
    """Random unit items; each query is a noisy mean of its own block of positives so recall is not trivial."""
    per_query = n_items // n_queries
    g = torch.Generator().manual_seed(seed)
    items = torch.randn(n_items, dim, generator=g)
    items.div_(items.norm(dim=1, keepdim=True))
    queries = items[:n_queries * per_query].view(n_queries, per_query, dim).mean(1)
    queries.add_(torch.randn(n_queries, dim, generator=g).mul_(0.5 / dim ** 0.5))
    queries.div_(queries.norm(dim=1, keepdim=True))
    positives = np.arange(n_queries * per_query).reshape(n_queries, per_query)
    return queries, items, list(positives), per_query


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--queries', type=int, default=15000)
    ap.add_argument('--items', type=int, default=600000)
    ap.add_argument('--dim', type=int, default=512)
    ap.add_argument('--chunk-size', type=int, default=256, help='queries per score-matrix chunk')
    ap.add_argument('--threads', type=int, default=torch.get_num_threads())
    ap.add_argument('--seed', type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    queries, items, positives, per_query = make_data(args.queries, args.items, args.dim, args.seed)
    setup = time.perf_counter() - t0
    base_rss, base_maxrss = rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    chunk_bytes = args.chunk_size * args.items * items.element_size()

    with PeakRSS() as peak:
        t0, c0 = time.perf_counter(), time.process_time()
        ranks = retrieval_ranks_from_embeddings(queries, items, positives, chunk_size=args.chunk_size)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    buf = torch.empty(min(args.chunk_size, args.queries), args.items)
    t0 = time.perf_counter()
    for a in range(0, args.queries, args.chunk_size):  # the bound: the same chunk products, nothing else
        b = min(args.queries, a + args.chunk_size)
        torch.matmul(queries[a:b], items.T, out=buf[:b - a])
    bound = time.perf_counter() - t0
    recall = recall_from_ranks(ranks, (1, 5, 10, 50))

    flops = 2.0 * args.queries * args.items * args.dim
    print(f'recall_at_k (chunked): {args.queries:,} queries x {args.items:,} items x {args.dim}-dim float32, '
          f'{per_query} positives/query (index lists), chunk_size={args.chunk_size}, torch threads={args.threads}')
    print(f'  torch {torch.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs visible')
    print(f'  data setup                 {setup:8.1f} s   (items matrix {items.numel() * 4 / GB:.2f} GB)')
    print(f'  wall time                  {wall:8.1f} s   ({flops / wall / 1e9:.1f} GFLOP/s matmul-equivalent, '
          f'{args.queries / wall:,.0f} queries/s)')
    print(f'  matmul loop alone          {bound:8.1f} s   (same chunks; ranking / matmul = {wall / bound:.2f}, '
          f'one run each, not paired)')
    print(f'  CPU time (all threads)     {cpu:8.1f} s   (load average at end: '
          f'{", ".join(f"{x:.1f}" for x in os.getloadavg())}; other jobs on the machine inflate wall time)')
    print(f'  RSS before call            {base_rss / GB:8.2f} GB')
    print(f'  peak RSS during call       {peak.peak / GB:8.2f} GB   (+{(peak.peak - base_rss) / GB:.2f} GB over '
          f'the data; expected chunk working set ~{chunk_bytes / GB:.2f} GB)')
    print(f'  getrusage maxrss           {maxrss / GB:8.2f} GB   (before call {base_maxrss / GB:.2f} GB; '
          f'includes data generation temporaries)')
    print('  recall: ' + ', '.join(f'R@{k}={v:.4f}' for k, v in recall.items()) + f', median rank={median_rank(ranks)}')


if __name__ == '__main__':
    main()
