"""Results by physical scale: which magnifications carry the diagnosis, for the model and for its attention.

Images fall into log2-spaced bins of their effective nm/px (the scale the model received). Per bin:

* image-level zero-shot: every labelled image scored against the class prompts, with its patient's diagnosis as
  the label (macro one-vs-rest ROC-AUC over the classes present, balanced accuracy);
* image -> image retrieval: the same-diagnosis hit rate of the image queries that fall in the bin (R@1, R@5);
* attention mass per diagnosis: the mean over a diagnosis's patients of the share of the aggregator's attention on
  images in the bin (uniform weights for mean pooling, which then shows only where the images are).
"""
from __future__ import annotations

import numpy as np

from emclip.metrics import headline_metrics

from .embeddings import Embeddings
from .retrieval import RetrievalResult

__all__ = ['SCALE_EDGES', 'scale_bin', 'by_scale', 'attention_by_scale']

SCALE_EDGES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)  # nm/px


def scale_bin(scales: np.ndarray, edges=SCALE_EDGES) -> np.ndarray:
    """Bin index per scale, -1 outside the edges."""
    idx = np.searchsorted(np.asarray(edges), np.asarray(scales, dtype=np.float64), side='right') - 1
    return np.where((idx >= 0) & (idx < len(edges) - 1), idx, -1)


def _label(lo: float, hi: float) -> str:
    return f'{lo:g}-{hi:g}'


def by_scale(emb: Embeddings, y: np.ndarray, image_probs: np.ndarray | None, i2i: RetrievalResult | None,
             edges=SCALE_EDGES, min_images: int = 5) -> dict:
    """Per non-empty scale bin: image counts, image-level zero-shot and image->image retrieval (see module doc).

    ``y`` is the class index per patient (< 0 unlabelled); ``image_probs`` the images' zero-shot probabilities.
    Bins with fewer than ``min_images`` labelled images report counts only."""
    b = scale_bin(emb.image_scales, edges)
    y_img = y[emb.image_patient] if emb.n_images else np.zeros(0, np.int64)
    q_bin = b[i2i.query_index] if i2i is not None and i2i.query_index is not None else None
    rows = []
    for k in range(len(edges) - 1):
        in_bin = b == k
        if not in_bin.any():
            continue
        lab = in_bin & (y_img >= 0)
        row = {'bin': _label(edges[k], edges[k + 1]), 'nm_per_px_low': edges[k], 'nm_per_px_high': edges[k + 1],
               'n_images': int(in_bin.sum()), 'n_labelled_images': int(lab.sum()),
               'n_patients': int(len(np.unique(emb.image_patient[in_bin])))}
        if image_probs is not None and lab.sum() >= min_images:
            m = headline_metrics(y_img[lab], image_probs[lab])
            row['zero_shot'] = {'roc_auc_macro_ovr': m['roc_auc_macro_ovr'],
                                'balanced_accuracy': m['balanced_accuracy'],
                                'n_classes': int(len(np.unique(y_img[lab])))}
        if q_bin is not None and (q_bin == k).sum() >= min_images:
            r = i2i.ranks[q_bin == k]
            row['image_to_image'] = {'R@1': float(np.mean(r <= 1)), 'R@5': float(np.mean(r <= 5)),
                                     'n_queries': int(len(r))}
        rows.append(row)
    return {'edges_nm_per_px': list(edges), 'scale': 'effective nm/px (after resizing to the model input)',
            'min_images': min_images, 'bins': rows}


def attention_by_scale(emb: Embeddings, y: np.ndarray, classes: list[str], edges=SCALE_EDGES) -> dict:
    """``mass[c][k]``: mean over the labelled patients of class c of the share of their attention on bin k."""
    b = scale_bin(emb.image_scales, edges)
    attn = np.asarray(emb.image_attention, dtype=np.float64)
    counts = np.bincount(emb.image_patient, minlength=emb.n_patients).astype(np.float64)
    even = 1.0 / counts[emb.image_patient] if emb.n_images else attn
    # mean pooling records equal weights (or none): the map then shows where the images are, not a choice
    uniform = not np.isfinite(attn).any() or bool(np.allclose(attn, even, atol=1e-6))
    if not np.isfinite(attn).all():
        attn = even
    used = sorted({int(k) for k in b if k >= 0})
    mass = np.full((len(classes), len(used)), np.nan)
    n_patients = []
    for c in range(len(classes)):
        patients = np.flatnonzero(y == c)
        n_patients.append(int(len(patients)))
        if not len(patients):
            continue
        shares = np.zeros((len(patients), len(used)))
        pos = {p: i for i, p in enumerate(patients)}
        for img in np.flatnonzero(np.isin(emb.image_patient, patients) & (b >= 0)):
            shares[pos[emb.image_patient[img]], used.index(int(b[img]))] += attn[img]
        total = shares.sum(1, keepdims=True)
        mass[c] = (shares / np.where(total > 0, total, 1)).mean(0)
    return {'uniform': bool(uniform), 'classes': list(classes), 'n_patients': n_patients,
            'bins': [_label(edges[k], edges[k + 1]) for k in used], 'mass': mass.tolist()}
