"""``python -m emclip.synthetic.figure --data DIR --out grid.png``: a grid of cohort images by diagnosis and scale,
so a person can see what the embedded cohort looks like."""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ..data import Cohort, load_cohort, read_image

SCALE_BINS = [(2, 4), (4, 9), (9, 20), (20, 45), (45, 100)]


def cohort_grid(data: str | Path | Cohort, out: str | Path, bins=SCALE_BINS) -> Path:
    """One row per diagnosis, one column per scale bin; the first image of the cohort that falls in each cell.

    ``data`` is a cohort folder or an already loaded :class:`Cohort` (whose diagnoses may come from the labeler)."""
    cohort = data if isinstance(data, Cohort) else load_cohort(data, check_images="none", require_splits=False)
    images = cohort.images.merge(cohort.reports[["patient_id", "diagnosis"]], on="patient_id")
    names = sorted(images.diagnosis.dropna().unique(), key=str)
    fig, axes = plt.subplots(len(names), len(bins), figsize=(2.0 * len(bins), 2.05 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        rows = images[images.diagnosis == name]
        for j, (lo, hi) in enumerate(bins):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            pick = rows[(rows.nm_per_pixel >= lo) & (rows.nm_per_pixel < hi)]
            if len(pick):
                row = pick.iloc[0]
                ax.imshow(read_image(row.path), cmap="gray", vmin=0, vmax=1)
                img_px = read_image(row.path).shape[1]
                bar_nm = _nice_bar(row.nm_per_pixel * img_px / 4)
                bar_px = bar_nm / row.nm_per_pixel
                ax.plot([img_px * 0.06, img_px * 0.06 + bar_px], [img_px * 0.92] * 2, color="yellow", lw=2)
                ax.text(img_px * 0.06, img_px * 0.86, _fmt_nm(bar_nm), color="yellow", fontsize=6)
                ax.set_title(f"{row.nm_per_pixel:.1f} nm/px", fontsize=6, pad=2)
            if j == 0:
                ax.set_ylabel(name.replace(" ", "\n", 2) if len(name) > 18 else name, fontsize=7)
    fig.suptitle("Embedded synthetic renal EM cohort: diagnoses (rows) by physical scale (columns)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _nice_bar(nm: float) -> float:
    steps = np.array([1, 2, 5]) * 10 ** np.floor(np.log10(nm))
    return float(steps[steps <= nm].max())


def _fmt_nm(nm: float) -> str:
    return f"{nm / 1000:g} µm" if nm >= 1000 else f"{nm:g} nm"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emclip.synthetic.figure", description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    print(cohort_grid(args.data, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
