"""Figures of a trained model applied to new patients: each patient's most attended images, a search's hits as
thumbnails, and the new patients placed on the training cohort's embedding map.

Every thumbnail is labelled with its physical pixel size (nm/px as the cohort gives it) and its patient, because an
EM image means nothing without its scale. Built on ``Figure`` with an Agg canvas, as ``emclip.evaluation.figures``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.lines import Line2D

from ..evaluation.figures import _figure, _show, _wrap

__all__ = ["image_grid", "uniform_weights", "plot_most_attended", "plot_search_hits", "map_coordinates",
           "plot_new_patients_map"]

THUMB = 1.9   # inches per thumbnail


def image_grid(rows: Sequence[tuple[str, Sequence[tuple[str, str]]]], title: str,
               image_root: str | Path | None = None):
    """A grid of thumbnails: one row per ``(row label, [(image path, caption), ...])``, as the model reads each
    image (``read_image_for_display``); a missing or unreadable file is drawn as such, not raised."""
    image_root = Path(image_root) if image_root is not None else None
    n_cols = max([len(images) for _, images in rows] + [1])
    width = THUMB * n_cols + 0.6
    fig = _figure(width, (THUMB + 0.45) * max(1, len(rows)) + 0.5)
    grid = fig.add_gridspec(max(1, len(rows)), n_cols)
    for r, (label, images) in enumerate(rows):
        for c in range(n_cols):
            ax = fig.add_subplot(grid[r, c])
            if c >= len(images):
                ax.axis("off")
                continue
            path, caption = images[c]
            _show(ax, str(path), image_root, caption)
            if c == 0 and label:
                ax.set_ylabel("\n".join(_wrap(line, 24) for line in label.split("\n")), fontsize=8)
    fig.suptitle(_wrap(title, int(width * 13)), fontsize=10)   # ~13 characters of 10 pt per inch: never clipped
    return fig


def uniform_weights(images: pd.DataFrame) -> bool:
    """True when every patient's images weigh the same (mean pooling, or no attention recorded): then "most
    attended" means nothing and the images shown are simply the first of each bag."""
    attention = images["attention"].to_numpy(np.float64)
    if not np.isfinite(attention).any():
        return True
    spread = images.assign(a=attention).groupby("patient_id", sort=False)["a"].agg(lambda a: np.ptp(a))
    return bool(np.allclose(spread.fillna(0).to_numpy(), 0, atol=1e-6))


def _top_images(images: pd.DataFrame, patient: str, n: int) -> pd.DataFrame:
    """A patient's ``n`` highest-weight images, in bag order among equal weights."""
    bag = images[images.patient_id == patient]
    order = np.argsort(-np.nan_to_num(bag["attention"].to_numpy(np.float64), nan=-np.inf), kind="stable")
    return bag.iloc[order[:n]]


def plot_most_attended(images: pd.DataFrame, patients: Sequence[str], n_images: int = 4,
                       labels: Mapping[str, str] | None = None, image_root: str | Path | None = None):
    """For each of ``patients``, its ``n_images`` most attended images with their weight and nm/px. ``images`` has
    one row per image: ``patient_id``, ``path``, ``nm_per_pixel`` (as given) and ``attention``; ``labels`` adds a
    line under a patient's id (e.g. its predicted class). Under mean pooling the title says that every image weighs
    the same."""
    if not len(patients):
        raise ValueError("plot_most_attended needs at least one patient")
    missing = sorted(set(patients) - set(images.patient_id))
    if missing:
        raise KeyError(f"no image of patient(s) {', '.join(map(str, missing))} in the table")
    uniform = uniform_weights(images[images.patient_id.isin(patients)])
    rows = []
    for pid in patients:
        top = _top_images(images, pid, n_images)
        n_bag = int((images.patient_id == pid).sum())
        captions = [(f"{nm:.3g} nm/px" if uniform else f"weight {a:.2f} · {nm:.3g} nm/px")
                    for nm, a in zip(top.nm_per_pixel, top.attention)]
        label = f"{pid} ({n_bag} image{'s' if n_bag != 1 else ''})"
        if labels and pid in labels:
            label += f"\n{labels[pid]}"
        rows.append((label, list(zip(top.path, captions))))
    title = ("Mean pooling: every image of a patient weighs the same, so these are simply its first images"
             if uniform else "Each patient's most attended images (the aggregator's weight, and nm/px)")
    return image_grid(rows, title, image_root)


def plot_search_hits(hits: pd.DataFrame, title: str, images: pd.DataFrame | None = None,
                     image_root: str | Path | None = None, columns: int = 5):
    """A search's hits as thumbnails, in rank order. Image hits (``hits`` with ``path`` and ``nm_per_pixel``) show
    themselves; patient hits show each patient's most attended image, taken from ``images`` (one row per image:
    ``patient_id``, ``path``, ``nm_per_pixel``, ``attention``). Captions: rank, patient, nm/px and score."""
    tiles = []
    for hit in hits.itertuples(index=False):
        if "path" in hits:
            path, nm, what = hit.path, hit.nm_per_pixel, ""
        else:
            if images is None:
                raise ValueError("patient hits need the images table to show each patient's most attended image")
            top = _top_images(images, hit.patient_id, 1)
            if not len(top):
                raise KeyError(f"no image of patient {hit.patient_id} in the table")
            path, nm, what = top.path.iloc[0], top.nm_per_pixel.iloc[0], "\n(its most attended image)"
        tiles.append((path, f"#{hit.rank} {hit.patient_id} · {nm:.3g} nm/px\nscore {hit.score:.3f}{what}"))
    if not tiles:
        raise ValueError("no hits to show")
    rows = [("", tiles[i:i + columns]) for i in range(0, len(tiles), columns)]
    return image_grid(rows, title, image_root)


def map_coordinates(reference: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two principal axes fitted on the ``reference`` embeddings alone, and both sets projected on them:
    ``(reference_xy, new_xy, explained_variance_ratio)``. New points never move the map (unlike a t-SNE refit),
    so the same model and training cohort always give the same background."""
    from sklearn.decomposition import PCA
    reference, new = np.asarray(reference, np.float64), np.asarray(new, np.float64)
    if reference.ndim != 2 or new.ndim != 2 or reference.shape[1] != new.shape[1]:
        raise ValueError(f"map_coordinates needs two embedding matrices of the same width, got {reference.shape} "
                         f"and {new.shape}")
    if len(reference) < 3:
        raise ValueError(f"a map needs at least 3 reference patients, got {len(reference)}")
    pca = PCA(n_components=2, svd_solver="full").fit(reference)
    return pca.transform(reference), pca.transform(new), pca.explained_variance_ratio_


def plot_new_patients_map(reference: np.ndarray, reference_labels: Sequence[str], new: np.ndarray,
                          new_labels: Sequence[str], classes: Sequence[str] | None = None,
                          reference_name: str = "training cohort", new_name: str = "new patients"):
    """New patients on the map of a reference cohort: the reference patients (small dots, coloured by their
    diagnosis; grey without one) define two principal axes, the new patients are projected on them and overlaid
    as large outlined stars coloured by ``new_labels`` (e.g. their predicted class). One colour per class across
    both sets, so a star among dots of its own colour agrees with the training cohort."""
    ref_xy, new_xy, explained = map_coordinates(reference, new)
    reference_labels, new_labels = np.asarray(reference_labels, str), np.asarray(new_labels, str)
    if len(reference_labels) != len(ref_xy) or len(new_labels) != len(new_xy):
        raise ValueError("one label per patient is needed on both sides of the map")
    present = set(reference_labels) | set(new_labels)
    classes = [c for c in (classes or sorted(present - {""})) if c in present]
    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    colour = {c: cmap(i % cmap.N) for i, c in enumerate(classes)}
    fig = _figure(11, 6.2)
    ax = fig.add_subplot()
    unknown = ~np.isin(reference_labels, classes)
    if unknown.any():
        ax.scatter(*ref_xy[unknown].T, s=12, color="#c8c8c8", alpha=0.6, linewidths=0)
    for c in classes:
        sel = reference_labels == c
        if sel.any():
            ax.scatter(*ref_xy[sel].T, s=18, color=colour[c], alpha=0.55, linewidths=0)
    new_colours = [colour.get(c, "#c8c8c8") for c in new_labels]
    ax.scatter(*new_xy.T, s=150, marker="*", c=new_colours, edgecolors="black", linewidths=0.8, zorder=3,
               label=new_name)
    ax.set(xlabel=f"principal axis 1 ({explained[0]:.0%} of the variance)",
           ylabel=f"principal axis 2 ({explained[1]:.0%})", xticks=[], yticks=[])
    handles = [Line2D([], [], ls="", marker="o", color=colour[c], label=_wrap(c, 30)) for c in classes]
    if unknown.any():
        handles.append(Line2D([], [], ls="", marker="o", color="#c8c8c8", label="no diagnosis"))
    handles += [Line2D([], [], ls="", marker="o", color="0.45", alpha=0.6,
                       label=f"{reference_name} ({len(ref_xy)}), by diagnosis"),
                Line2D([], [], ls="", marker="*", markersize=12, color="white", markeredgecolor="black",
                       label=f"{new_name} ({len(new_xy)}), by predicted class")]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_title(f"{new_name.capitalize()} on the map of the {reference_name} (two principal axes fitted on the "
                 f"{reference_name} alone)", fontsize=10)
    return fig
