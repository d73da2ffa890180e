"""What a run's ``metrics_log.csv`` shows: training loss, temperature, learning rate and validation against the step."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from ..paths import resolve

__all__ = ["read_log", "training_curves"]


def read_log(run_dir: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(resolve(run_dir)) / "metrics_log.csv")


def training_curves(run_dir: str | Path, out: str | Path | None = None):
    """Training loss, learning rate, temperature and validation loss against the step."""
    log = read_log(run_dir)
    steps, val = log[log.loss.notna()], log[log.val_loss.notna()]
    fig, ax = plt.subplots(1, 4, figsize=(17, 3.6))
    ax[0].plot(steps.step, steps.loss, lw=0.8, alpha=0.5, label="train (per step)")
    ax[0].plot(steps.step, steps.loss.rolling(10, min_periods=1).mean(), lw=1.5, label="train (10-step mean)")
    ax[0].plot(val.step, val.val_loss, "o-", label="validation (whole split)")
    ax[0].set(xlabel="step", ylabel="contrastive loss", title="loss")
    ax[0].legend(fontsize=8)
    ax[1].plot(steps.step, steps.logit_scale)
    ax[1].set(xlabel="step", title="logit scale  exp(t)")
    ax[2].plot(steps.step, steps.lr)
    ax[2].set(xlabel="step", title="learning rate")
    if "val_recall" in val:
        ax[3].plot(val.step, val.val_recall, "o-", color="C2")
    ax[3].set(xlabel="step", title="validation patient<->report\nmean Recall@1/5/10 (selects 'best')")
    fig.suptitle(Path(resolve(run_dir)).name)
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=100)
    return fig
