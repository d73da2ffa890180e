"""Figures a reader looks at rather than reads: results by scale, attention by scale, embedding maps, prompt maps.

Embedding maps are scikit-learn t-SNE (UMAP's package pulls numba and is not needed for a few thousand points);
the map is seeded, so the same embeddings give the same picture. Like ``figures``, every plot is built on a
``Figure`` with an Agg canvas: no global backend switch, nothing left in pyplot's registry.
"""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps

from .embeddings import Embeddings
from .figures import _figure, _wrap

__all__ = ['plot_by_scale', 'plot_attention_by_scale', 'embedding_map', 'plot_prompt_similarity']


def plot_by_scale(block: dict):
    """Image-level zero-shot (AUC, balanced accuracy) and image->image R@1 / R@5 per scale bin."""
    bins = block['bins']
    names = [b['bin'] for b in bins]
    x = np.arange(len(bins))
    fig = _figure(10, 3.6)
    ax = fig.subplots(1, 3)
    for key, label in (('roc_auc_macro_ovr', 'ROC-AUC (macro OvR)'), ('balanced_accuracy', 'balanced accuracy')):
        ax[0].plot(x, [b.get('zero_shot', {}).get(key, np.nan) for b in bins], 'o-', label=label)
    ax[0].set(title='image-level zero-shot by scale', ylim=(0, 1.02), ylabel='score')
    for key in ('R@1', 'R@5'):
        ax[1].plot(x, [b.get('image_to_image', {}).get(key, np.nan) for b in bins], 'o-', label=key)
    ax[1].set(title='image -> image (same diagnosis) by scale', ylim=(0, 1.02))
    ax[2].bar(x, [b['n_images'] for b in bins], color='#8c8c8c')
    ax[2].set(title='images per bin', ylabel='images')
    for a in ax:
        a.set_xticks(x, names, rotation=30)
        a.set_xlabel('nm per pixel')
    ax[0].legend(fontsize=7)
    ax[1].legend(fontsize=7)
    return fig


def plot_attention_by_scale(block: dict):
    """Heatmap: for each diagnosis (rows), the mean share of a patient's attention on each scale bin (columns)."""
    mass = np.asarray(block['mass'], dtype=np.float64)
    classes, bins = block['classes'], block['bins']
    fig = _figure(1.2 + 0.9 * len(bins), 1.0 + 0.38 * len(classes))
    ax = fig.subplots()
    im = ax.imshow(mass, cmap='viridis', vmin=0, vmax=max(float(np.nanmax(mass)) if np.isfinite(mass).any() else 1,
                                                           1e-6), aspect='auto')
    for i in range(mass.shape[0]):
        for j in range(mass.shape[1]):
            if np.isfinite(mass[i, j]):
                ax.text(j, i, f'{mass[i, j]:.2f}', ha='center', va='center', fontsize=7,
                        color='white' if mass[i, j] < 0.6 * np.nanmax(mass) else 'black')
    ax.set_xticks(range(len(bins)), bins, rotation=30)
    ax.set_yticks(range(len(classes)), [f'{c} (n={n})' for c, n in zip(classes, block['n_patients'])], fontsize=7)
    ax.set_xlabel('nm per pixel')
    what = ('mean pooling weighs images equally: the share of images per scale' if block['uniform']
            else "mean share of each patient's attention per scale")
    ax.set_title(f'Which magnifications drove each diagnosis\n({what})', fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def principal_components(x: np.ndarray, k: int = 2, seed: int = 0) -> np.ndarray:
    """Scores [N, k] of the centred rows of ``x`` on their first ``k`` principal axes.

    Randomised SVD (a few power iterations on a k + 10 dimensional subspace): a full SVD of 3,000 x 1,280 cached
    features took 11 s in 02_features, this takes a fraction of a second and agrees on the leading components up to
    sign."""
    from sklearn.decomposition import PCA
    x = np.asarray(x, dtype=np.float64)
    if len(x) <= k:
        return np.zeros((len(x), k))
    return PCA(n_components=k, svd_solver='randomized', random_state=seed).fit_transform(x)


def _tsne(x: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits
    n = len(x)
    if n < 4:
        return np.zeros((n, 2))
    with threadpool_limits(1):
        return TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init='pca', random_state=seed,
                    learning_rate='auto').fit_transform(np.asarray(x, dtype=np.float64))


def embedding_map(emb: Embeddings, y: np.ndarray, classes: list[str], seed: int = 0, max_images: int = 2000):
    """t-SNE maps: patients by diagnosis, images by diagnosis, images by physical scale (log colour scale)."""
    rng = np.random.default_rng(seed)
    img = np.arange(emb.n_images)
    if len(img) > max_images:
        img = np.sort(rng.choice(img, max_images, replace=False))
    p2 = _tsne(emb.patient, seed)
    i2 = _tsne(emb.image[img], seed) if len(img) else np.zeros((0, 2))
    y_img = y[emb.image_patient[img]] if len(img) else np.zeros(0, np.int64)
    cmap = colormaps['tab10' if len(classes) <= 10 else 'tab20']
    fig = _figure(15, 4.8)
    ax = fig.subplots(1, 3)
    for a, pts, lab, title in ((ax[0], p2, y, f'patients (n={len(p2)})'),
                               (ax[1], i2, y_img, f'images (n={len(i2)})')):
        unl = lab < 0
        if unl.any():
            a.scatter(pts[unl, 0], pts[unl, 1], s=8, c='#cccccc', label='no diagnosis')
        for c, name in enumerate(classes):
            sel = lab == c
            if sel.any():
                a.scatter(pts[sel, 0], pts[sel, 1], s=10, color=cmap(c % cmap.N), label=_wrap(name, 28))
        a.set(title=f'{title}, by diagnosis', xticks=[], yticks=[])
    sc = ax[2].scatter(i2[:, 0], i2[:, 1], s=8, c=np.log10(emb.image_scales[img]) if len(img) else [],
                       cmap='plasma')
    ax[2].set(title='images, by physical scale', xticks=[], yticks=[])
    bar = fig.colorbar(sc, ax=ax[2], shrink=0.8)
    bar.set_label('log10 nm per pixel')
    ax[1].legend(fontsize=6, loc='center left', bbox_to_anchor=(1.0, 0.5), frameon=False, markerscale=1.5)
    fig.suptitle('t-SNE of the embeddings (seeded): nearby points are similar to the model', fontsize=10)
    return fig


def plot_prompt_similarity(class_emb: np.ndarray, classes: list[str], patient: np.ndarray, y: np.ndarray):
    """Left: cosine similarity between class prompt embeddings. Right: mean cosine similarity of each diagnosis's
    patients (rows) to each class prompt (columns); a bright diagonal is what zero-shot needs."""
    c = class_emb / np.linalg.norm(class_emb, axis=1, keepdims=True)
    p = patient / np.maximum(np.linalg.norm(patient, axis=1, keepdims=True), 1e-12)
    sim_cc = c @ c.T
    rows = [p[y == k] @ c.T for k in range(len(classes))]
    sim_pc = np.array([r.mean(0) if len(r) else np.full(len(classes), np.nan) for r in rows])
    fig = _figure(13, 5.6)
    ax = fig.subplots(1, 2)
    short = [_wrap(n, 22) for n in classes]
    for a, m, title in ((ax[0], sim_cc, 'class prompt vs class prompt'),
                        (ax[1], sim_pc, 'patients of a diagnosis (rows) vs class prompts')):
        im = a.imshow(m, cmap='magma', aspect='auto')
        a.set_xticks(range(len(classes)), short, rotation=90, fontsize=6)
        a.set_yticks(range(len(classes)), short, fontsize=6)
        a.set_title(f'cosine similarity: {title}', fontsize=9)
        fig.colorbar(im, ax=a, shrink=0.8)
    return fig
