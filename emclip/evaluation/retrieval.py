"""Retrieval tasks on an :class:`~emclip.evaluation.embeddings.Embeddings` split.

Each task returns a :class:`RetrievalResult` holding the rank of the first positive for every query, so recall at
any k, the median rank, the Recall@K curve and bootstrap CIs (resampling query patients) all come from one pass.
Ranks and ties follow :mod:`emclip.metrics` (pessimistic ties by default).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emclip.metrics import (
    bootstrap_ci, median_rank, recall_from_ranks, retrieval_ranks_by_label, retrieval_ranks_from_embeddings)

from .embeddings import Embeddings

__all__ = ['RetrievalResult', 'patient_report_retrieval', 'report_image_retrieval', 'image_image_retrieval',
           'summarize_retrieval']


@dataclass
class RetrievalResult:
    """First-positive ranks per query (``inf`` = no positive), the query's patient row and the gallery size."""
    name: str
    ranks: np.ndarray
    query_patient: np.ndarray
    n_items: int
    definition: str
    n_queries_total: int | None = None  # before any subsampling of queries
    query_index: np.ndarray | None = None  # image row of each query (image queries only)


def patient_report_retrieval(emb: Embeddings, chunk_size: int | None = None) -> list[RetrievalResult]:
    """report -> patient and patient -> report; the single positive is the same patient's report/bag."""
    idx = np.arange(emb.n_patients)
    r2p = retrieval_ranks_from_embeddings(emb.report, emb.patient, idx, chunk_size=chunk_size)
    p2r = retrieval_ranks_from_embeddings(emb.patient, emb.report, idx, chunk_size=chunk_size)
    return [
        RetrievalResult('report_to_patient', r2p, idx, emb.n_patients,
                        'query: report; gallery: patient embeddings of the split; positive: the same patient'),
        RetrievalResult('patient_to_report', p2r, idx, emb.n_patients,
                        'query: patient embedding; gallery: reports of the split; positive: the same patient'),
    ]


def report_image_retrieval(emb: Embeddings, chunk_size: int | None = None) -> RetrievalResult:
    """report -> image; positives are all images of the report's patient (hit when any is in the top k)."""
    order = np.argsort(emb.image_patient, kind='stable')
    counts = np.bincount(emb.image_patient, minlength=emb.n_patients)
    positives = np.split(order, np.cumsum(counts)[:-1])
    ranks = retrieval_ranks_from_embeddings(emb.report, emb.image, positives, chunk_size=chunk_size)
    return RetrievalResult('report_to_image', ranks, np.arange(emb.n_patients), emb.n_images,
                           "query: report; gallery: all images of the split; positives: that patient's images")


def image_image_retrieval(emb: Embeddings, chunk_size: int | None = None, max_queries: int | None = 10000,
                          seed: int = 0) -> RetrievalResult:
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
    # positives = same label and another patient, exclusion = the query's own patient; as label sets and index
    # lists, never as queries x images masks
    ranks = retrieval_ranks_by_label(emb.image[queries], emb.image, label[queries], label, query_group=owner[queries],
                                     item_group=owner, chunk_size=chunk_size)
    return RetrievalResult('image_to_image', ranks, owner[queries], emb.n_images,
                           'query: labelled image; gallery: images of other patients in the split; positive: same '
                           'diagnosis (PLIP p@K)', n_queries_total=n_total, query_index=queries)


def summarize_retrieval(result: RetrievalResult, ks=(1, 5, 10, 50), n_boot: int = 1000, seed: int = 0,
                        alpha: float = 0.05) -> dict:
    """Recall@k with patient-level bootstrap CIs (query patients resampled), median rank and counts."""
    ranks = result.ranks
    recall = recall_from_ranks(ranks, ks)
    if len(ranks):
        ci = bootstrap_ci(lambda r: {str(k): float(np.mean(r <= k)) for k in ks}, ranks, n_boot=n_boot, seed=seed,
                          alpha=alpha, groups=result.query_patient)
    else:
        ci = {str(k): {'ci_low': float('nan'), 'ci_high': float('nan')} for k in ks}
    return {
        'definition': result.definition,
        'n_queries': int(len(ranks)),
        'n_queries_total': int(result.n_queries_total if result.n_queries_total is not None else len(ranks)),
        'n_items': int(result.n_items),
        'n_queries_without_positive': int(np.isinf(ranks).sum()),
        'recall': {str(k): {'value': recall[k], 'ci_low': ci[str(k)]['ci_low'], 'ci_high': ci[str(k)]['ci_high']}
                   for k in ks},
        'median_rank': median_rank(ranks),
    }
