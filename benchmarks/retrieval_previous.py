"""The retrieval ranking as shipped before issue 15, kept verbatim as the "previous" arm of bench_retrieval.py.

A faithful copy of ``emclip.metrics.retrieval_ranks_from_embeddings`` (and its helpers) and of the image -> image
task of ``emclip.evaluation.retrieval`` at commit bcc4b6b: per query chunk one matmul into a fresh score matrix,
masks and column-block reductions over boolean temporaries, lazily built numpy masks for image -> image. The tests
(tests/test_retrieval_fast.py) check that the shipped code returns exactly these ranks.
"""
from __future__ import annotations

import numpy as np
import torch

from emclip.evaluation.embeddings import Embeddings
from emclip.evaluation.retrieval import RetrievalResult

_CHUNK_BYTES = 256 * 2 ** 20
_BLOCK_ELEMENTS = 2 ** 22


def _as_tensor(x, device=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device) if device is not None else t


class _ItemSets:
    """Per-query item sets (positives or exclusions) sliceable by query chunk.

    Accepts a boolean matrix (queries x items), one index per query (1-D ints), a sequence of index sequences,
    or a callable ``fn(start, stop) -> bool [stop - start, n_items]`` that builds the mask lazily.
    """

    def __init__(self, spec, n_queries: int):
        self.fn = self.mask = None
        if callable(spec):
            self.fn = spec
            return
        is_bool = (isinstance(spec, torch.Tensor) and spec.dtype == torch.bool) or \
            (isinstance(spec, np.ndarray) and spec.dtype == np.bool_)
        if is_bool:
            if spec.ndim != 2 or spec.shape[0] != n_queries:
                raise ValueError(f'boolean item mask must be (n_queries={n_queries}, n_items), got {tuple(spec.shape)}')
            self.mask = _as_tensor(spec)
            return
        if isinstance(spec, (torch.Tensor, np.ndarray)) and spec.ndim == 1:
            lists = [[int(i)] for i in (spec.cpu().numpy() if isinstance(spec, torch.Tensor) else spec)]
        else:
            lists = [np.asarray(s, dtype=np.int64).reshape(-1) for s in spec]
        if len(lists) != n_queries:
            raise ValueError(f'got item sets for {len(lists)} queries, expected {n_queries}')
        lengths = np.array([len(s) for s in lists], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.cols = np.concatenate(lists).astype(np.int64) if lengths.sum() else np.zeros(0, np.int64)
        self.rows = np.repeat(np.arange(n_queries), lengths)

    def chunk(self, start: int, stop: int, device):
        """Return ('mask', bool [c, n]) or ('index', row ids relative to start, column ids)."""
        if self.fn is not None:
            return 'mask', _as_tensor(self.fn(start, stop), device).bool()
        if self.mask is not None:
            return 'mask', self.mask[start:stop].to(device)
        a, b = self.offsets[start], self.offsets[stop]
        rows = torch.from_numpy(self.rows[a:b] - start).to(device)
        return 'index', rows, torch.from_numpy(self.cols[a:b]).to(device)


def _column_blocks(n_rows: int, n_cols: int):
    # reductions over a bool matrix upcast it to int64 in one go (8 bytes per element); doing them on column
    # blocks of ~4M elements keeps that temporary small next to the score chunk itself
    width = max(1, _BLOCK_ELEMENTS // max(1, n_rows))
    return [(a, min(n_cols, a + width)) for a in range(0, n_cols, width)]


def _chunk_ranks(scores: torch.Tensor, pos: tuple, excl: tuple | None, ties: str) -> torch.Tensor:
    """Ranks of the first positive for one chunk of the score matrix (modified in place)."""
    c, n = scores.shape
    blocks = _column_blocks(c, n)
    if excl is not None:  # exclusion first, so an excluded positive cannot count
        if excl[0] == 'mask':
            scores.masked_fill_(excl[1], float('-inf'))
        else:
            scores[excl[1], excl[2]] = float('-inf')
    best = torch.full((c,), float('-inf'), dtype=scores.dtype, device=scores.device)
    if pos[0] == 'mask':
        for a, b in blocks:
            best = torch.maximum(best, scores[:, a:b].masked_fill(~pos[1][:, a:b], float('-inf')).amax(dim=1))
    elif pos[1].numel():
        best = best.scatter_reduce(0, pos[1], scores[pos[1], pos[2]], reduce='amax')
    # optimistic: positives cannot score above the best positive, so every item above it is a negative;
    # pessimistic: count everything at or above it, then take the positives back out
    n_before = torch.zeros(c, dtype=torch.int64, device=scores.device)
    for a, b in blocks:
        above = scores[:, a:b] > best[:, None] if ties == 'optimistic' else scores[:, a:b] >= best[:, None]
        n_before += above.sum(dim=1)
        if ties == 'pessimistic' and pos[0] == 'mask':
            n_before -= (above & pos[1][:, a:b]).sum(dim=1)
    if ties == 'pessimistic' and pos[0] == 'index' and pos[1].numel():
        tied = (scores[pos[1], pos[2]] >= best[pos[1]]).long()
        n_before.index_add_(0, pos[1], -tied)
    ranks = (n_before + 1).double()
    ranks[torch.isneginf(best)] = float('inf')  # no usable positive
    return ranks


def _check_ties(ties: str):
    if ties not in ('pessimistic', 'optimistic'):
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")


def retrieval_ranks_previous(similarity, positives, exclude=None, ties: str = 'pessimistic', chunk_size: int | None = None):
    """Rank of the first positive per query from a dense (queries x items) similarity matrix.

    Returns a float64 numpy array (``inf`` for queries without positives). See the module docstring for ties.
    """
    _check_ties(ties)
    sim = _as_tensor(similarity)
    n_q, n_i = sim.shape
    pos, excl = _ItemSets(positives, n_q), (_ItemSets(exclude, n_q) if exclude is not None else None)
    chunk_size = chunk_size or max(1, _CHUNK_BYTES // max(1, n_i * sim.element_size()))
    out = []
    for a in range(0, n_q, chunk_size):
        b = min(n_q, a + chunk_size)
        block = sim[a:b].clone()  # masking happens in place
        out.append(_chunk_ranks(block, pos.chunk(a, b, sim.device),
                                excl.chunk(a, b, sim.device) if excl else None, ties))
    return torch.cat(out).cpu().numpy() if out else np.zeros(0)


@torch.no_grad()
def retrieval_ranks_from_embeddings_previous(
        queries, items, positives, exclude=None, chunk_size: int | None = None, ties: str = 'pessimistic',
        device: str | torch.device | None = None):
    """Ranks computed lazily: ``queries @ items.T`` is formed one chunk of ``chunk_size`` queries at a time.

    Peak extra memory is about ``chunk_size * n_items * (itemsize + 1)`` bytes. The dtype of the embeddings is
    kept (float32 stays float32), so chunked and dense ranks agree whenever scores are not within rounding
    of each other.
    """
    _check_ties(ties)
    q, x = _as_tensor(queries, device), _as_tensor(items, device)
    n_q, n_i = q.shape[0], x.shape[0]
    pos, excl = _ItemSets(positives, n_q), (_ItemSets(exclude, n_q) if exclude is not None else None)
    chunk_size = chunk_size or max(1, _CHUNK_BYTES // max(1, n_i * x.element_size()))
    out = []
    for a in range(0, n_q, chunk_size):
        b = min(n_q, a + chunk_size)
        scores = q[a:b] @ x.T
        out.append(_chunk_ranks(scores, pos.chunk(a, b, x.device), excl.chunk(a, b, x.device) if excl else None,
                                ties))
        del scores
    return torch.cat(out).cpu().numpy() if out else np.zeros(0)


def image_image_retrieval_previous(emb: Embeddings, chunk_size: int | None = None,
                                   max_queries: int | None = 10000, seed: int = 0) -> RetrievalResult:
    """image -> image same-diagnosis hit rate (PLIP's p@K), neighbours from other patients only.

    Queries are images with a known diagnosis (a seeded sample of ``max_queries`` of them when there are more);
    the gallery is every image of the split minus the query patient's own images. A positive is an image of
    another patient with the same diagnosis; unlabelled gallery images are negatives.
    """
    dx = emb.diagnosis[emb.image_patient]
    _, label = np.unique(dx, return_inverse=True)
    label = np.where(dx == '', -1, label).astype(np.int64)
    queries = np.flatnonzero(label >= 0)
    n_total = len(queries)
    if max_queries is not None and n_total > max_queries:
        queries = np.sort(np.random.default_rng(seed).choice(queries, size=max_queries, replace=False))
    owner = emb.image_patient
    ranks = image_image_ranks_previous(emb.image, label, owner, queries, chunk_size)
    return RetrievalResult('image_to_image', ranks, owner[queries], emb.n_images,
                           'query: labelled image; gallery: images of other patients in the split; positive: same '
                           'diagnosis (PLIP p@K)', n_queries_total=n_total, query_index=queries)


def image_image_ranks_previous(image, label, owner, queries, chunk_size=None):
    """The ranking call of ``image_image_retrieval_previous`` (its masks built lazily per chunk, as shipped)."""
    def positives(a: int, b: int) -> np.ndarray:
        q = queries[a:b]
        return (label[None, :] == label[q, None]) & (owner[None, :] != owner[q, None])

    def exclude(a: int, b: int) -> np.ndarray:
        return owner[None, :] == owner[queries[a:b], None]

    return retrieval_ranks_from_embeddings_previous(image[queries], image, positives, exclude=exclude,
                                                    chunk_size=chunk_size)
