"""Evaluation figures: ROC curves, confusion matrix, Recall@K curves, highest/lowest-attention images.

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas instead of pyplot, so the library never
switches the global backend (a notebook keeps its inline backend) and no figure leaks into pyplot's registry.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from .embeddings import Embeddings

__all__ = ['read_image_for_display', 'plot_roc', 'plot_confusion', 'plot_recall_curves', 'plot_attention',
           'save_figure']


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout='constrained')
    FigureCanvasAgg(fig)
    return fig


def _wrap(name: str, width: int = 18) -> str:
    return '\n'.join(textwrap.wrap(name, width)) or name


def save_figure(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format='png')
    return path


def read_image_for_display(path: str | Path, max_size: int = 512) -> np.ndarray:
    """An image as the model reads it (:func:`emclip.data.read_image`: the same intensity, photometric, orientation
    and size rules; gray), subsampled to <= ``max_size`` px and min-max scaled to [0, 1] for display."""
    from ..data import read_image
    arr = read_image(path)
    step = max(1, int(np.ceil(max(arr.shape[:2]) / max_size)))
    arr = arr[::step, ::step]
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def plot_roc(y_true: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str],
             per_class_auc: Mapping[str, float | None] | None = None, title: str = 'Zero-shot ROC (one-vs-rest)'):
    """One-vs-rest ROC curve per class with a defined AUC; the legend gives each class's AUC."""
    fig = _figure(7.5, 6)
    ax = fig.add_subplot()
    for c, name in enumerate(class_names):
        is_pos = np.asarray(y_true) == c
        if is_pos.all() or not is_pos.any():
            continue  # AUC undefined: listed in metrics.json instead
        fpr, tpr, _ = roc_curve(is_pos, probabilities[:, c])
        auc = (per_class_auc or {}).get(name)
        ax.plot(fpr, tpr, lw=1.6, label=f'{name} ({auc:.3f})' if auc is not None else name)
    ax.plot([0, 1], [0, 1], ls='--', color='0.6', lw=1)
    ax.set(xlabel='False positive rate', ylabel='True positive rate', title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=8, loc='lower right', title='class (AUC)', title_fontsize=8)
    return fig


def plot_confusion(confusion: Sequence[Sequence[int]], class_names: Sequence[str],
                   title: str = 'Zero-shot confusion matrix'):
    """Counts annotated; colour is the row-normalised fraction (recall per true class)."""
    cm = np.asarray(confusion, dtype=np.float64)
    n = len(class_names)
    with np.errstate(invalid='ignore', divide='ignore'):
        frac = np.nan_to_num(cm / cm.sum(1, keepdims=True))
    size = max(5.0, 0.75 * n + 3)
    fig = _figure(size + 1, size)
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap='Blues', vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha='center', va='center', fontsize=8,
                        color='white' if frac[i, j] > 0.6 else 'black')
    labels = [_wrap(c) for c in class_names]
    ax.set_xticks(range(n), labels, rotation=60, ha='right', fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set(xlabel='Predicted diagnosis', ylabel='True diagnosis', title=title)
    fig.colorbar(im, ax=ax, shrink=0.7, label='fraction of true class')
    return fig


def plot_recall_curves(curves: Mapping[str, tuple[np.ndarray, int]], title: str = 'Retrieval: Recall@K'):
    """``curves`` maps a task name to (first-positive ranks, gallery size); recall is drawn for every K."""
    fig = _figure(7, 5)
    ax = fig.add_subplot()
    for name, (ranks, n_items) in curves.items():
        if len(ranks) == 0 or n_items == 0:
            continue
        ks = np.unique(np.geomspace(1, n_items, num=min(200, n_items)).round().astype(int))
        finite = np.sort(np.asarray(ranks)[np.isfinite(ranks)])
        recall = np.searchsorted(finite, ks, side='right') / len(ranks)
        ax.plot(ks, recall, lw=1.8, label=f'{name.replace("_", " ")} (n={len(ranks)}, gallery={n_items})')
    ax.set_xscale('log')
    ax.set(xlabel='K (log scale)', ylabel='Recall@K', ylim=(0, 1.01), title=title)
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=8, loc='lower right')
    return fig


def _show(ax, path: str, image_root: Path | None, caption: str):
    p = Path(path)
    if image_root is not None and not p.is_absolute():
        p = image_root / p
    try:
        img = read_image_for_display(p)
        ax.imshow(img, cmap=None if img.ndim == 3 else 'gray', vmin=0, vmax=1)
    except Exception as err:  # a missing file must not sink the whole report
        ax.text(0.5, 0.5, f'unreadable\n{type(err).__name__}', ha='center', va='center', fontsize=7)
    ax.set_title(caption, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_attention(emb: Embeddings, patient_rows: Sequence[int], n_images: int = 3,
                   image_root: str | Path | None = None):
    """For each patient row: its ``n_images`` highest-attention images, then its lowest-attention ones."""
    image_root = Path(image_root) if image_root is not None else None
    rows = list(patient_rows)
    fig = _figure(1.9 * 2 * n_images, 2.3 * max(1, len(rows)) + 0.4)
    grid = fig.add_gridspec(max(1, len(rows)), 2 * n_images)
    for r, p in enumerate(rows):
        idx = np.flatnonzero(emb.image_patient == p)
        order = idx[np.argsort(-np.nan_to_num(emb.image_attention[idx], nan=-np.inf), kind='stable')]
        n_top = min(n_images, (len(order) + 1) // 2)  # small bags: split the images, never show one twice
        top, bottom = order[:n_top], order[n_top:][-n_images:]
        for slot, (kind, chosen) in enumerate((('high', top), ('low', bottom))):
            for c in range(n_images):
                ax = fig.add_subplot(grid[r, slot * n_images + c])
                if c >= len(chosen):
                    ax.axis('off')
                    continue
                i = chosen[c]
                _show(ax, str(emb.image_paths[i]), image_root,
                      f'{kind}: a={emb.image_attention[i]:.3g}\n{emb.image_scales[i]:.3g} nm/px')
                if c == 0 and slot == 0:
                    dx = emb.diagnosis[p] or 'unknown'
                    ax.set_ylabel(_wrap(f'{emb.patient_ids[p]}\n{dx}', 22), fontsize=8)
    fig.suptitle('Highest (left) and lowest (right) attention images per patient', fontsize=10)
    return fig
