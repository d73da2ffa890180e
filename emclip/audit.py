"""Cohort audit: tables and figures for ``01_data_audit`` (leakage, PHI patterns, distributions, examples)."""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .data import DIAGNOSIS_SOURCES, UNLABELLED, Cohort, read_image
from .data.splits import SPLITS

# Patterns of protected health information that must not reach a model or a report. Deliberately broad: a false
# alarm costs a look, a miss costs a disclosure.
PHI_PATTERNS = {
    "date": r"\b(?:\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4}|\d{4}-\d{2}-\d{2}|(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct"
            r"|Nov|Dec)[a-z]*\.? \d{1,2},? \d{4})\b",
    "record number": r"\b(?:MRN|medical record|record (?:no|number)|accession|case (?:no|number)|patient id)\b[:#\s]*"
                     r"[A-Z0-9-]{4,}|\b[A-Z]{1,3}\d{2}-\d{3,}\b",
    "name after title": r"\b(?:Dr|Mr|Mrs|Ms|Miss|Prof)\.?\s+[A-Z][a-z]+",
    "phone": r"\b(?:\+?\d{1,2}[\s.-])?\(?\d{3}\)?[\s.-]\d{3}[\s.-]\d{4}\b",
    "email": r"\b[\w.+-]+@[\w-]+\.[\w.]+\b",
}


def leakage(cohort: Cohort) -> pd.DataFrame:
    """Patients found in more than one split (expected empty; the loader refuses such cohorts anyway)."""
    counts = cohort.reports.groupby("patient_id").split.nunique()
    return counts[counts > 1].rename("n_splits").reset_index()


def phi_scan(reports: pd.DataFrame) -> pd.DataFrame:
    """One row per PHI-like match: patient, pattern, the matched text."""
    rows = []
    for pid, text in zip(reports.patient_id, reports.report):
        for kind, pattern in PHI_PATTERNS.items():
            for m in re.finditer(pattern, text):
                rows.append({"patient_id": pid, "pattern": kind, "match": m.group(0)})
    return pd.DataFrame(rows, columns=["patient_id", "pattern", "match"])


def label_sources(cohort: Cohort) -> pd.DataFrame:
    """Where the diagnoses came from: patients per ``diagnosis_source`` (given / labeler / none) and split."""
    table = pd.crosstab(cohort.reports.diagnosis_source, cohort.reports.split).reindex(
        index=list(DIAGNOSIS_SOURCES), columns=list(SPLITS), fill_value=0)
    table["total"] = table.sum(axis=1)
    table.index.name = "diagnosis source"
    return table


def unlabelled_reasons(cohort: Cohort) -> pd.DataFrame:
    """Why patients have no usable diagnosis (``diagnosis_note`` of the ``none`` rows), most frequent first; a hedged
    diagnosis is grouped by its name."""
    notes = cohort.reports.diagnosis_note[cohort.reports.diagnosis_source == "none"]
    reasons = notes.str.replace(r" \(.*?\)", "", regex=True).str.replace(r"; excluded.*$", "", regex=True)
    return reasons.value_counts().rename_axis("reason").rename("patients").to_frame()


def labeler_agreement(cohort: Cohort, labels: pd.DataFrame):
    """Agreement of the labeler's primary diagnosis with the *given* diagnoses only (None when none is given):
    a diagnosis the labeler derived agrees with itself and would prove nothing."""
    from .labels import agreement
    given = (cohort.reports.diagnosis_source == "given").to_numpy()
    if not given.any():
        return None
    return agreement(labels.primary_diagnosis[given], cohort.reports.diagnosis[given])


def prevalence(cohort: Cohort) -> pd.DataFrame:
    """Diagnosis x split counts (patients without a usable diagnosis shown as '(no diagnosis)')."""
    dx = cohort.reports.diagnosis.fillna(UNLABELLED)
    table = pd.crosstab(dx, cohort.reports.split).reindex(columns=list(SPLITS), fill_value=0)
    table["total"] = table.sum(axis=1)
    return table


def overview_figure(cohort: Cohort, out: str | Path | None = None):
    """Images per patient, scale distribution by diagnosis, report length, diagnosis prevalence per split."""
    images = cohort.images.merge(cohort.reports[["patient_id", "diagnosis"]], on="patient_id")
    images["diagnosis"] = images.diagnosis.fillna(UNLABELLED)
    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    per = cohort.images.groupby("patient_id").size()
    ax[0, 0].hist(per, bins=np.arange(0.5, per.max() + 1.5, max(1, per.max() // 30)), color="#4c72b0")
    ax[0, 0].set(title=f"images per patient (n={len(per)}, median {per.median():g})", xlabel="images",
                 ylabel="patients")
    names = sorted(images.diagnosis.unique(), key=str)
    data = [np.log10(images.nm_per_pixel[images.diagnosis == n]) for n in names]
    ax[0, 1].boxplot(data, vert=False, tick_labels=names)
    ax[0, 1].set(title="physical scale by diagnosis", xlabel="log10 nm per pixel")
    ax[0, 1].tick_params(axis="y", labelsize=7)
    words = cohort.reports.report.str.split().str.len()
    ax[1, 0].hist(words, bins=30, color="#55a868")
    ax[1, 0].set(title=f"report length (median {words.median():g} words)", xlabel="words", ylabel="reports")
    prev = prevalence(cohort).drop(columns="total")
    (prev / prev.sum()).plot.barh(ax=ax[1, 1], width=0.8)
    ax[1, 1].set(title="diagnosis prevalence per split (fraction of split)", xlabel="fraction")
    ax[1, 1].tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=100)
    return fig


def examples_figure(cohort: Cohort, n_scales: int = 5, per_row: int = 6, seed: int = 0,
                    out: str | Path | None = None):
    """Example images across scales: rows are scale quantile bins, columns random images of that bin."""
    rng = np.random.default_rng(seed)
    images = cohort.images.merge(cohort.reports[["patient_id", "diagnosis"]], on="patient_id")
    edges = np.quantile(images.nm_per_pixel, np.linspace(0, 1, n_scales + 1))
    fig, axes = plt.subplots(n_scales, per_row, figsize=(1.9 * per_row, 2.0 * n_scales), squeeze=False)
    for i in range(n_scales):
        sel = images[(images.nm_per_pixel >= edges[i]) & (images.nm_per_pixel <= edges[i + 1])]
        picks = sel.iloc[rng.choice(len(sel), min(per_row, len(sel)), replace=False)] if len(sel) else sel
        for j, ax in enumerate(axes[i]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(picks):
                row = picks.iloc[j]
                ax.imshow(read_image(row.path), cmap="gray", vmin=0, vmax=1)
                ax.set_title(f"{row.nm_per_pixel:.1f} nm/px\n{str(row.diagnosis)[:22]}", fontsize=6)
        axes[i, 0].set_ylabel(f"{edges[i]:.0f}-{edges[i + 1]:.0f} nm/px", fontsize=8)
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=100)
    return fig
