"""Metric functions for retrieval, classification and uncertainty (no I/O).

Retrieval ranks and ties
------------------------
For a query with positive items P, the rank is the 1-based position of its *first* (best-scoring) positive;
a query is a hit at k when that rank is <= k, i.e. when any positive is among its top-k items
(clip_benchmark's definition). Positives tied with each other never push one another down.
Ties between the best positive and negatives are resolved explicitly:

* ``ties="pessimistic"`` (default): tied negatives rank *before* the positive,
  ``rank = 1 + #{negatives with score >= best positive}``. A model that scores everything equally gets no
  hits, which is why it is the default (``torch.topk`` would instead break ties by memory order).
* ``ties="optimistic"``: tied negatives rank after it, ``rank = 1 + #{negatives with score > best positive}``.

Excluded items (e.g. the query patient's own images) are removed from the ranking, even if also listed
as positive. A query without any (non-excluded) positive gets rank ``inf``: it never counts as a hit and
stays in the denominator.

Ranks are computed by counting, not by sorting, so they are exact for any k and the median rank comes for
free; from embeddings the score matrix only ever exists one chunk of queries at a time.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from scipy.stats import rankdata

__all__ = [
    'retrieval_ranks', 'retrieval_ranks_from_embeddings', 'retrieval_ranks_by_label', 'recall_at_k',
    'recall_at_k_from_embeddings', 'recall_from_ranks', 'median_rank', 'roc_auc_ovr', 'classification_metrics',
    'headline_metrics', 'bootstrap_ci', 'paired_bootstrap', 'bootstrap_difference', 'HEADLINE_METRICS', 'macro_auc',
    'headline_metrics_weighted',
]

DEFAULT_KS = (1, 5, 10, 50)
_CHUNK_BYTES = 256 * 2 ** 20  # score-matrix budget per chunk when chunk_size is not given
_BLOCK_ELEMENTS = 2 ** 22
# which items count as ranked before the best positive: at or above it (pessimistic ties) or strictly above it
_COMPARE = {'pessimistic': torch.ge, 'optimistic': torch.gt}


# ----------------------------------------------------------------------------------------------- retrieval
def _as_tensor(x, device=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device) if device is not None else t


class _ItemSets:
    """Per-query item sets (positives or exclusions) sliceable by query chunk.

    Accepts a boolean matrix (queries x items), one index per query (1-D ints), a sequence of index sequences,
    or a callable ``fn(start, stop) -> bool [stop - start, n_items]`` that builds the mask lazily. Index lists are
    sets: a repeated index counts once, as in the mask forms.
    """

    def __init__(self, spec, n_queries: int, n_items: int):
        self.fn = self.mask = None
        if callable(spec):
            self.fn = spec
            return
        is_bool = (isinstance(spec, torch.Tensor) and spec.dtype == torch.bool) or \
            (isinstance(spec, np.ndarray) and spec.dtype == np.bool_)
        if is_bool:
            if spec.ndim != 2 or tuple(spec.shape) != (n_queries, n_items):
                raise ValueError(f'boolean item mask must be (n_queries={n_queries}, n_items={n_items}), '
                                 f'got {tuple(spec.shape)}')
            self.mask = _as_tensor(spec)
            return
        if isinstance(spec, (torch.Tensor, np.ndarray)) and spec.ndim == 1:  # one item per query, no Python loop
            cols = (spec.cpu().numpy() if isinstance(spec, torch.Tensor) else spec).astype(np.int64)
            lengths = np.ones(len(cols), dtype=np.int64)
        else:
            lists = [np.asarray(s, dtype=np.int64).reshape(-1) for s in spec]
            lengths = np.array([len(s) for s in lists], dtype=np.int64)
            cols = np.concatenate(lists).astype(np.int64) if lengths.sum() else np.zeros(0, np.int64)
        if len(lengths) != n_queries:
            raise ValueError(f'got item sets for {len(lengths)} queries, expected {n_queries}')
        if len(cols) and (cols.min() < 0 or cols.max() >= n_items):
            raise ValueError(f'item indices must lie in [0, {n_items}), got [{cols.min()}, {cols.max()}]')
        keys = np.unique(np.repeat(np.arange(n_queries, dtype=np.int64), lengths) * n_items + cols)  # sorted sets
        self.rows, self.cols = keys // max(1, n_items), keys % max(1, n_items)
        self.offsets = np.searchsorted(self.rows, np.arange(n_queries + 1))

    def chunk(self, start: int, stop: int, device):
        """Return ('mask', bool [c, n]) or ('index', row ids relative to start, column ids)."""
        if self.fn is not None:
            return 'mask', _as_tensor(self.fn(start, stop), device).bool()
        if self.mask is not None:
            return 'mask', self.mask[start:stop].to(device)
        a, b = self.offsets[start], self.offsets[stop]
        rows = torch.from_numpy(self.rows[a:b] - start).to(device)
        return 'index', rows, torch.from_numpy(self.cols[a:b]).to(device)


class _LabelSets:
    """Positives by label: the items sharing the query's label (labels < 0 match nothing), as column slices.

    Items come sorted by label, so each label is a contiguous column range: the best positive and the tied count
    are reductions over a view of the score chunk, with no gather and no copy.
    """

    def __init__(self, query_label, sorted_item_label):
        self.query_label = np.asarray(query_label, dtype=np.int64)
        values = np.unique(self.query_label[self.query_label >= 0])  # only the labels some query asks for
        lo = np.searchsorted(sorted_item_label, values, 'left')
        hi = np.searchsorted(sorted_item_label, values, 'right')
        self.columns = {int(v): slice(int(a), int(b)) for v, a, b in zip(values, lo, hi) if b > a}

    def chunk(self, start: int, stop: int):
        """[(slice of rows relative to start, column ids)] per label of the chunk; queries come sorted by label."""
        labels = self.query_label[start:stop]
        values, first, counts = np.unique(labels, return_index=True, return_counts=True)
        if np.any(np.diff(labels) < 0):
            raise ValueError('label sets need the queries sorted by label')
        return [(slice(int(f), int(f + n)), self.columns[int(v)])
                for v, f, n in zip(values, first, counts) if int(v) in self.columns]


def _stable_order(values: np.ndarray):
    """(stable argsort, sorted values); images usually come sorted by patient already, which costs no sort."""
    if len(values) < 2 or bool(np.all(values[1:] >= values[:-1])):
        return np.arange(len(values)), values
    order = np.argsort(values, kind='stable')
    return order, values[order]


def _own_group_items(query_group, item_group, n_items: int) -> _ItemSets:
    """Exclusion sets 'the items of the query's own group' as index lists, without a queries x items mask."""
    query_group, item_group = np.asarray(query_group, dtype=np.int64), np.asarray(item_group, dtype=np.int64)
    order, sorted_groups = _stable_order(item_group)
    lo, hi = np.searchsorted(sorted_groups, query_group, 'left'), np.searchsorted(sorted_groups, query_group, 'right')
    return _ItemSets([order[a:b] for a, b in zip(lo, hi)], len(query_group), n_items)


def _column_blocks(n_rows: int, n_cols: int):
    # boolean reductions upcast to int64 in one go (8 bytes per element); column blocks of ~4M elements keep such
    # temporaries small next to the score chunk itself
    width = max(1, _BLOCK_ELEMENTS // max(1, n_rows))
    return [(a, min(n_cols, a + width)) for a in range(0, n_cols, width)]


def _exclude(scores: torch.Tensor, excl: tuple | None) -> None:
    if excl is None:
        return
    if excl[0] == 'mask':
        scores.masked_fill_(excl[1], float('-inf'))
    elif excl[1].numel():
        scores[excl[1], excl[2]] = float('-inf')


def _best_positive(scores: torch.Tensor, pos) -> torch.Tensor:
    """Score of each query's best (non-excluded) positive; -inf when it has none. Read off the chunk itself, so it
    is bit-identical to the positive's entry that the count below compares against."""
    c = scores.shape[0]
    best = torch.full((c,), float('-inf'), dtype=scores.dtype, device=scores.device)
    if isinstance(pos, list):  # label sets
        for rows, cols in pos:
            best[rows] = scores[rows, cols].amax(dim=1)
    elif pos[0] == 'mask':
        for a, b in _column_blocks(c, scores.shape[1]):
            best = torch.maximum(best, scores[:, a:b].masked_fill(~pos[1][:, a:b], float('-inf')).amax(dim=1))
    elif pos[1].numel():
        best.scatter_reduce_(0, pos[1], scores[pos[1], pos[2]], reduce='amax')
    return best


def _positives_at_or_above(above: torch.Tensor, pos) -> torch.Tensor:
    """Per query, how many positives the 0/1 matrix ``above`` marks (the ties of the best positive, pessimistic)."""
    c = above.shape[0]
    n = torch.zeros(c, dtype=above.dtype, device=above.device)
    if isinstance(pos, list):
        for rows, cols in pos:
            n[rows] = above[rows, cols].sum(dim=1)
    elif pos[0] == 'mask':
        for a, b in _column_blocks(c, above.shape[1]):
            n += above[:, a:b].masked_fill(~pos[1][:, a:b], 0).sum(dim=1)
    elif pos[1].numel():
        n.index_add_(0, pos[1], above[pos[1], pos[2]])
    return n


def _chunk_ranks(scores: torch.Tensor, pos, excl: tuple | None, ties: str) -> torch.Tensor:
    """Ranks of the first positive for one chunk of the score matrix, which is overwritten.

    rank = 1 + #{items scoring above the best positive} (optimistic: strictly above, where no positive can be;
    pessimistic: at or above, minus the positives found there). Excluded items are set to -inf first, so they
    count for nothing. One comparison pass and one row sum over the chunk, no sort, no top-k, no boolean
    temporaries: the comparison writes 1.0/0.0 over the scores in place, and a float row sum of 0/1 values is
    exact while it stays below 2^24 (else it is summed in float64).
    """
    _exclude(scores, excl)
    best = _best_positive(scores, pos)
    above = _COMPARE[ties](scores, best[:, None], out=scores)
    exact = above.dtype == torch.float64 or (above.dtype == torch.float32 and above.shape[1] < 2 ** 24)
    n_before = above.sum(dim=1) if exact else above.sum(dim=1, dtype=torch.float64)
    if ties == 'pessimistic':
        n_before = n_before - _positives_at_or_above(above, pos)
    ranks = n_before.double() + 1
    ranks[torch.isneginf(best)] = float('inf')  # no usable positive
    return ranks


def _check_ties(ties: str):
    if ties not in ('pessimistic', 'optimistic'):
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")


def _chunk_rows(n_items: int, itemsize: int, chunk_size: int | None) -> int:
    return chunk_size or max(1, _CHUNK_BYTES // max(1, n_items * itemsize))


def retrieval_ranks(similarity, positives, exclude=None, ties: str = 'pessimistic', chunk_size: int | None = None):
    """Rank of the first positive per query from a dense (queries x items) similarity matrix.

    Returns a float64 numpy array (``inf`` for queries without positives). See the module docstring for ties.
    """
    _check_ties(ties)
    sim = _as_tensor(similarity)
    if not sim.is_floating_point():
        sim = sim.double()  # integer scores: exact in float64, and -inf is needed for exclusions
    n_q, n_i = sim.shape
    pos, excl = _ItemSets(positives, n_q, n_i), (_ItemSets(exclude, n_q, n_i) if exclude is not None else None)
    rows = _chunk_rows(n_i, sim.element_size(), chunk_size)
    buf = torch.empty(min(rows, n_q), n_i, dtype=sim.dtype, device=sim.device)  # reused: masking happens in place
    out = []
    for a in range(0, n_q, rows):
        b = min(n_q, a + rows)
        block = buf[:b - a].copy_(sim[a:b])
        out.append(_chunk_ranks(block, pos.chunk(a, b, sim.device),
                                excl.chunk(a, b, sim.device) if excl else None, ties))
    return torch.cat(out).cpu().numpy() if out else np.zeros(0)


def _embedding_ranks(q: torch.Tensor, x: torch.Tensor, positives, excl: _ItemSets | None, chunk_size, ties,
                     order: np.ndarray | None = None):
    """The chunk loop: ``q[a:b] @ x.T`` into one reused buffer (a fresh 100+ MB matrix per chunk costs page faults
    as large as the ranking itself), then :func:`_chunk_ranks` on it. With ``order`` the queries are taken in that
    order (positives and exclusions are given in it) and the ranks returned in the original order."""
    n_q, n_i = q.shape[0], x.shape[0]
    rows = _chunk_rows(n_i, x.element_size(), chunk_size)
    buf = torch.empty(min(rows, n_q), n_i, dtype=torch.promote_types(q.dtype, x.dtype), device=x.device)
    xt, out = x.T, []
    for a in range(0, n_q, rows):
        b = min(n_q, a + rows)
        qa = q[a:b] if order is None else q[torch.from_numpy(order[a:b]).to(q.device)]
        scores = torch.matmul(qa, xt, out=buf[:b - a])
        pos = positives.chunk(a, b) if isinstance(positives, _LabelSets) else positives.chunk(a, b, x.device)
        out.append(_chunk_ranks(scores, pos, excl.chunk(a, b, x.device) if excl else None, ties))
    ranks = torch.cat(out).cpu().numpy() if out else np.zeros(0)
    if order is not None:
        ranks[order] = ranks.copy()
    return ranks


@torch.no_grad()
def retrieval_ranks_from_embeddings(
        queries, items, positives, exclude=None, chunk_size: int | None = None, ties: str = 'pessimistic',
        device: str | torch.device | None = None):
    """Ranks computed lazily: ``queries @ items.T`` is formed one chunk of ``chunk_size`` queries at a time.

    Peak extra memory is about ``chunk_size * n_items * itemsize`` bytes (one score buffer, reused). The dtype of
    the embeddings is kept (float32 stays float32), so chunked and dense ranks agree whenever scores are not
    within rounding of each other.
    """
    _check_ties(ties)
    q, x = _as_tensor(queries, device), _as_tensor(items, device)
    n_q, n_i = q.shape[0], x.shape[0]
    pos, excl = _ItemSets(positives, n_q, n_i), (_ItemSets(exclude, n_q, n_i) if exclude is not None else None)
    return _embedding_ranks(q, x, pos, excl, chunk_size, ties)


@torch.no_grad()
def retrieval_ranks_by_label(queries, items, query_label, item_label, query_group=None, item_group=None,
                             chunk_size: int | None = None, ties: str = 'pessimistic',
                             device: str | torch.device | None = None):
    """Ranks when a query's positives are the items with its label, its own group's items excluded.

    The same ranks as :func:`retrieval_ranks_from_embeddings` with ``positives = (item_label == query_label) &
    (item_group != query_group)`` and ``exclude = item_group == query_group`` (labels < 0 match nothing), without
    building either queries x items mask: queries and items are sorted by label (ranks do not depend on the order
    of the gallery), so a label's positives are one column range of each score chunk; exclusions are index lists.
    Labels and groups are integers (e.g. class index, -1 unlabelled; patient row). Costs one copy of ``items`` when
    they are not sorted by label already (0.57 GB for 600,000 x 256 float32): a gather per chunk instead measured
    1.56x the matmul time, the slices 1.1-1.2x.
    """
    _check_ties(ties)
    q, x = _as_tensor(queries, device), _as_tensor(items, device)
    n_q, n_i = q.shape[0], x.shape[0]
    if len(query_label) != n_q or len(item_label) != n_i:
        raise ValueError(f'labels: {len(query_label)} for {n_q} queries, {len(item_label)} for {n_i} items')
    query_label = np.asarray(query_label, dtype=np.int64)
    order = np.argsort(query_label, kind='stable')  # each label's rows of a chunk contiguous
    item_order, item_label = _stable_order(np.asarray(item_label, dtype=np.int64))
    if item_group is not None:
        item_group = np.asarray(item_group)[item_order]
    if not np.array_equal(item_order, np.arange(n_i)):
        x = x[torch.from_numpy(item_order).to(x.device)]
    excl = None
    if (query_group is None) != (item_group is None):
        raise ValueError('give both query_group and item_group, or neither')
    if query_group is not None:
        if len(query_group) != n_q or len(item_group) != n_i:
            raise ValueError(f'groups: {len(query_group)} for {n_q} queries, {len(item_group)} for {n_i} items')
        excl = _own_group_items(np.asarray(query_group)[order], item_group, n_i)
    return _embedding_ranks(q, x, _LabelSets(query_label[order], item_label), excl, chunk_size, ties, order)


def recall_from_ranks(ranks, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    """Fraction of queries whose first positive has rank <= k, for each k."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return {int(k): float(np.mean(ranks <= k)) if len(ranks) else float('nan') for k in ks}


def median_rank(ranks) -> float:
    """Median rank of the first positive (``inf`` when more than half of the queries have no positive)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return float(np.median(ranks)) if len(ranks) else float('nan')


def recall_at_k(similarity, positives, ks: Sequence[int] = DEFAULT_KS, exclude=None,
                ties: str = 'pessimistic') -> dict[int, float]:
    """Recall@k (any positive among the top k) from a dense similarity matrix; returns ``{k: recall}``."""
    return recall_from_ranks(retrieval_ranks(similarity, positives, exclude, ties), ks)


def recall_at_k_from_embeddings(queries, items, positives, ks: Sequence[int] = DEFAULT_KS,
                                chunk_size: int | None = None, exclude=None, ties: str = 'pessimistic',
                                device=None) -> dict[int, float]:
    """Recall@k from embeddings without materialising the full score matrix; returns ``{k: recall}``."""
    return recall_from_ranks(
        retrieval_ranks_from_embeddings(queries, items, positives, exclude, chunk_size, ties, device), ks)


# ------------------------------------------------------------------------------------------ classification
HEADLINE_METRICS = ('roc_auc_macro_ovr', 'balanced_accuracy', 'f1_weighted', 'f1_macro', 'accuracy')


def roc_auc_ovr(y_true: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC-AUC per class column; NaN where the class is absent (or the only class) in y_true.

    Mann-Whitney form with tie-averaged ranks, which equals sklearn's ``roc_auc_score``; all columns are ranked in
    one call because bootstrap loops evaluate it thousands of times.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(y_true)
    is_pos = y[:, None] == np.arange(p.shape[1])[None, :]
    n_pos = is_pos.sum(0).astype(np.float64)
    n_neg = len(y) - n_pos
    ranks = rankdata(p, axis=0) if len(y) else np.zeros_like(p)
    with np.errstate(invalid='ignore', divide='ignore'):
        auc = ((ranks * is_pos).sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _scores_from_confusion(cm: np.ndarray) -> dict[str, float]:
    tp, support, predicted = np.diag(cm).astype(float), cm.sum(1).astype(float), cm.sum(0).astype(float)
    present = support > 0
    used = present | (predicted > 0)  # sklearn's default label set: classes in y_true or y_pred
    with np.errstate(divide='ignore', invalid='ignore'):
        recall = np.where(present, tp / support, 0.0)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    n = support.sum()
    return {
        'accuracy': float(tp.sum() / n),
        'balanced_accuracy': float(recall[present].mean()),  # mean recall over classes present in y_true
        'f1_macro': float(f1[used].mean()),  # unweighted mean over classes (PLIP calls this "weighted")
        'f1_weighted': float((f1 * support).sum() / n),  # weighted by true-class support
    }


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Mean recall over the classes present in ``y_true`` (scikit-learn's definition), for bootstrap loops."""
    return _scores_from_confusion(_confusion(np.asarray(y_true), np.asarray(y_pred), n_classes))['balanced_accuracy']


def _to_indices(y_true, class_names: Sequence[str]) -> np.ndarray:
    y = np.asarray(y_true)
    if y.dtype.kind in 'iu':
        if len(y) and (y.min() < 0 or y.max() >= len(class_names)):
            raise ValueError(f'class indices must lie in [0, {len(class_names)}), got [{y.min()}, {y.max()}]')
        return y.astype(np.int64)
    lookup = {c: i for i, c in enumerate(class_names)}
    unknown = sorted({str(v) for v in y if v not in lookup})
    if unknown:
        raise ValueError(f'labels not in class_names: {unknown}')
    return np.array([lookup[v] for v in y], dtype=np.int64)


def headline_metrics(y_true, probabilities) -> dict[str, float]:
    """Scalar metrics only (fast enough for bootstrap loops): AUC macro OvR, balanced acc., F1s, accuracy.

    ``y_true`` are class indices into the columns of ``probabilities``; predictions are the arg-max column.
    """
    y, p = np.asarray(y_true, dtype=np.int64), np.asarray(probabilities, dtype=np.float64)
    if len(y) == 0:
        return {k: float('nan') for k in HEADLINE_METRICS}
    out = _scores_from_confusion(_confusion(y, p.argmax(1), p.shape[1]))
    auc = roc_auc_ovr(y, p)
    out['roc_auc_macro_ovr'] = float(np.nanmean(auc)) if np.isfinite(auc).any() else float('nan')
    return {k: out[k] for k in HEADLINE_METRICS}


def _auc_weighted(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One-vs-rest AUC [B, C] of B resamples given as row multiplicities ``weights`` [B, n] (Mann-Whitney with
    multiplicities: a tied negative counts half), NaN where a class has no positive or no negative."""
    out = np.full((len(weights), p.shape[1]), np.nan)
    for c in range(p.shape[1]):
        order = np.argsort(p[:, c], kind='stable')
        s = p[order, c]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])   # groups of tied scores
        w = weights[:, order]
        pos = y[order] == c
        pos_sum = np.add.reduceat(w * pos, starts, axis=1)
        neg_sum = np.add.reduceat(w * ~pos, starts, axis=1)
        below = np.cumsum(neg_sum, axis=1) - neg_sum
        n_pos, n_neg = pos_sum.sum(1), neg_sum.sum(1)
        with np.errstate(invalid='ignore', divide='ignore'):
            auc = (pos_sum * (below + 0.5 * neg_sum)).sum(1) / (n_pos * n_neg)
        out[:, c] = np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)
    return out


def _macro(auc: np.ndarray) -> np.ndarray:
    defined = np.isfinite(auc)
    with np.errstate(invalid='ignore'):
        return np.where(defined.any(1), np.where(defined, auc, 0).sum(1) / defined.sum(1), np.nan)


def headline_metrics_weighted(y_true, probabilities, weights) -> dict[str, np.ndarray]:
    """``headline_metrics`` of B resamples at once, each given as row multiplicities (``weights`` [B, n], e.g.
    ``bincount`` of a bootstrap draw): equal to ``headline_metrics(y[idx], p[idx])`` per resample, without the loop
    (13,000 calls of 0.3-0.5 ms each per evaluation before)."""
    y, p = np.asarray(y_true, dtype=np.int64), np.asarray(probabilities, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    n_classes = p.shape[1]
    onehot = np.zeros((len(y), n_classes * n_classes))
    onehot[np.arange(len(y)), y * n_classes + p.argmax(1)] = 1
    cm = (w @ onehot).reshape(len(w), n_classes, n_classes)
    tp = cm[:, np.arange(n_classes), np.arange(n_classes)]
    support, predicted = cm.sum(2), cm.sum(1)
    present, used = support > 0, (support > 0) | (predicted > 0)
    with np.errstate(divide='ignore', invalid='ignore'):
        recall = np.where(present, tp / support, 0.0)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        n = support.sum(1)
        out = {'accuracy': tp.sum(1) / n, 'balanced_accuracy': (recall * present).sum(1) / present.sum(1),
               'f1_macro': (f1 * used).sum(1) / used.sum(1), 'f1_weighted': (f1 * support).sum(1) / n}
    out['roc_auc_macro_ovr'] = _macro(_auc_weighted(y, p, w))
    return {k: out[k] for k in HEADLINE_METRICS}


def macro_auc(y_true, probabilities) -> float:
    """Mean one-vs-rest ROC-AUC over the classes where it is defined (NaN when none is)."""
    auc = roc_auc_ovr(y_true, probabilities)
    return float(np.nanmean(auc)) if np.isfinite(auc).any() else float('nan')


# bootstrap loops use these instead of calling the metric once per resample (bootstrap_ci, paired_bootstrap)
headline_metrics.weighted = headline_metrics_weighted
macro_auc.weighted = lambda y, p, w: _macro(_auc_weighted(np.asarray(y, np.int64), np.asarray(p, np.float64),
                                                          np.asarray(w, np.float64)))


def classification_metrics(y_true, probabilities, class_names: Sequence[str]) -> dict:
    """Full classification report for predicted class probabilities.

    ``y_true`` holds class indices or class names. Returns ``accuracy``, ``balanced_accuracy`` (mean recall over
    classes present in y_true), ``f1_macro`` (unweighted mean over classes in y_true or y_pred), ``f1_weighted``
    (weighted by support), ``roc_auc_macro_ovr`` (mean one-vs-rest AUC over classes where it is defined),
    ``roc_auc_per_class`` (None where undefined), ``classes_absent`` (no true example), ``auc_undefined``
    (classes excluded from the macro AUC), ``confusion_matrix`` (rows = true, columns = predicted, in
    ``class_names`` order), ``support`` and ``n``.
    """
    class_names = list(class_names)
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(class_names):
        raise ValueError(f'probabilities must be (n, {len(class_names)}), got {p.shape}')
    y = _to_indices(y_true, class_names)
    if len(y) != len(p):
        raise ValueError(f'{len(y)} labels but {len(p)} probability rows')
    out = headline_metrics(y, p)
    auc = roc_auc_ovr(y, p) if len(y) else np.full(len(class_names), np.nan)
    support = np.bincount(y, minlength=len(class_names))
    cm = _confusion(y, p.argmax(1), len(class_names)) if len(y) else np.zeros((len(class_names),) * 2, int)
    out.update({
        'n': int(len(y)),
        'roc_auc_per_class': {c: (float(a) if np.isfinite(a) else None) for c, a in zip(class_names, auc)},
        'classes_absent': [c for c, s in zip(class_names, support) if s == 0],
        'auc_undefined': [c for c, a in zip(class_names, auc) if not np.isfinite(a)],
        'support': {c: int(s) for c, s in zip(class_names, support)},
        'confusion_matrix': cm.tolist(),
        'class_names': class_names,
    })
    return out


# ------------------------------------------------------------------------------------------------ bootstrap
def _resample_indices(rng: np.random.Generator, n: int, members: tuple | None) -> np.ndarray:
    """Row indices of one bootstrap replicate: rows, or whole groups when ``members`` is given."""
    if members is None:
        return rng.integers(0, n, size=n)
    order, starts, sizes = members
    picked = rng.integers(0, len(sizes), size=len(sizes))
    lengths = sizes[picked]
    offsets_in_group = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return order[np.repeat(starts[picked], lengths) + offsets_in_group]


def _group_members(groups, n: int) -> tuple | None:
    """(rows sorted by group, start of each group, group sizes); None when every row is its own group."""
    if groups is None:
        return None
    groups = np.asarray(groups)
    if len(groups) != n:
        raise ValueError(f'groups has {len(groups)} entries for {n} rows')
    _, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    if len(sizes) == n:
        return None
    return np.argsort(inverse, kind='stable'), np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes


def _interval(values: list[float], alpha: float) -> tuple[float, float, int]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float('nan'), float('nan'), 0
    lo, hi = np.quantile(v, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi), int(len(v))


def bootstrap_ci(metric_fn: Callable[..., float | Mapping[str, float]], *arrays, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05, groups=None) -> dict:
    """Percentile bootstrap CI of ``metric_fn(*arrays)``, resampling rows (patients) with replacement.

    All arrays are indexed by patient along axis 0. With ``groups`` (one id per row, e.g. the patient of each
    image-level query) whole groups are resampled instead (cluster bootstrap). Resamples where the metric is not
    finite (e.g. AUC with one class drawn) are dropped and counted in ``n_valid``. A scalar metric gives
    ``{value, ci_low, ci_high, n_boot, n_valid}``; a dict-valued metric gives that dict per key.
    """
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError('all arrays must have the same length along axis 0')
    arrays = [a if isinstance(a, (np.ndarray, torch.Tensor)) else np.asarray(a) for a in arrays]
    members, rng = _group_members(groups, n), np.random.default_rng(seed)
    estimate = metric_fn(*arrays)
    is_dict = isinstance(estimate, Mapping)
    samples: dict = {k: [] for k in estimate} if is_dict else {None: []}
    weighted = getattr(metric_fn, 'weighted', None)
    if weighted is not None:   # the same draws, scored at once from their row multiplicities
        values = weighted(*arrays, _draw_weights(rng, n, members, n_boot))
        samples = {k: list(values[k]) for k in samples} if is_dict else {None: list(values)}
    for _ in range(n_boot if weighted is None else 0):
        idx = _resample_indices(rng, n, members)
        value = metric_fn(*[a[idx] for a in arrays])
        for k in samples:
            samples[k].append(value[k] if is_dict else value)
    out = {}
    for k, values in samples.items():
        lo, hi, n_valid = _interval(values, alpha)
        v = estimate[k] if is_dict else estimate
        out[k] = {'value': float(v), 'ci_low': lo, 'ci_high': hi, 'n_boot': n_boot, 'n_valid': n_valid}
    return out if is_dict else out[None]


def paired_bootstrap(metric_fn: Callable[[np.ndarray, np.ndarray], float], y_true, probs_a, probs_b,
                     n_boot: int = 1000, seed: int = 0, alpha: float = 0.05, groups=None) -> dict:
    """Bootstrap the difference ``metric(a) - metric(b)`` of two models scored on the same patients.

    Both models see the same resampled patients in every replicate. Returns ``value_a``, ``value_b``,
    ``difference``, its percentile CI (``ci_low``, ``ci_high``), ``p_le_0`` (fraction of valid resamples where the
    difference is <= 0: a one-sided bootstrap p-value for "a is not better than b"), ``n_boot`` and ``n_valid``.
    """
    y, pa, pb = np.asarray(y_true), np.asarray(probs_a), np.asarray(probs_b)
    if not (len(y) == len(pa) == len(pb)):
        raise ValueError('y_true, probs_a and probs_b must cover the same patients')
    va, vb = float(metric_fn(y, pa)), float(metric_fn(y, pb))
    weighted = getattr(metric_fn, 'weighted', None)
    if weighted is not None:   # the same draws bootstrap_difference makes, scored at once
        w = _draw_weights(np.random.default_rng(seed), len(y), _group_members(groups, len(y)), n_boot)
        diffs = np.asarray(weighted(y, pa, w), np.float64) - np.asarray(weighted(y, pb, w), np.float64)
        return {'value_a': va, 'value_b': vb, 'difference': va - vb, **_difference_summary(diffs, n_boot, alpha)}
    boot = bootstrap_difference(lambda idx: metric_fn(y[idx], pa[idx]) - metric_fn(y[idx], pb[idx]), len(y),
                                n_boot=n_boot, seed=seed, alpha=alpha, groups=groups)
    return {'value_a': va, 'value_b': vb, 'difference': va - vb, **boot}


def bootstrap_difference(difference: Callable[[np.ndarray], float], n: int, n_boot: int = 1000, seed: int = 0,
                         alpha: float = 0.05, groups=None) -> dict:
    """The one paired bootstrap: ``difference(idx)`` scores both sides on the same resampled rows ``idx``.

    Every paired comparison (two models here, aware minus blind arms pooled over seeds in ``ablation``) goes
    through it, so they resample alike: ``n_boot`` draws of ``n`` rows (whole groups with ``groups``) from
    ``default_rng(seed)``. Returns the percentile CI (``ci_low``, ``ci_high``), ``p_le_0`` (share of valid
    resamples where the difference is <= 0), ``n_boot`` and ``n_valid`` (non-finite resamples are dropped).
    """
    members, rng = _group_members(groups, n), np.random.default_rng(seed)
    diffs = np.array([difference(_resample_indices(rng, n, members)) for _ in range(n_boot)], dtype=np.float64)
    return _difference_summary(diffs, n_boot, alpha)


def _difference_summary(diffs: np.ndarray, n_boot: int, alpha: float) -> dict:
    lo, hi, n_valid = _interval(diffs, alpha)
    finite = diffs[np.isfinite(diffs)]
    return {'ci_low': lo, 'ci_high': hi, 'p_le_0': float(np.mean(finite <= 0)) if len(finite) else float('nan'),
            'n_boot': n_boot, 'n_valid': n_valid}


def _draw_weights(rng: np.random.Generator, n: int, members: tuple | None, n_boot: int) -> np.ndarray:
    """Row multiplicities [n_boot, n] of the replicates ``_resample_indices`` draws, in the same order from ``rng``
    (so a weighted metric sees exactly the resamples the per-call loop would)."""
    return np.stack([np.bincount(_resample_indices(rng, n, members), minlength=n) for _ in range(n_boot)]) \
        if n_boot else np.zeros((0, n))
