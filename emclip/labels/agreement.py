"""Agreement of the labeler's primary diagnosis with a reference diagnosis (e.g. the generator's truth).

Class names compare case-insensitively with surrounding spaces ignored; a report without a primary diagnosis counts
as the prediction "(none)", which is always wrong. Precision of a class that was never predicted is undefined (NaN),
as is recall of a class absent from the truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

NONE = "(none)"


@dataclass
class Agreement:
    """Accuracy, per-class precision / recall / F1 / support, and the confusion table (rows truth, columns labeler)."""

    n: int
    accuracy: float
    per_class: pd.DataFrame
    confusion: pd.DataFrame

    def summary(self) -> str:
        """A plain-text report: accuracy line, per-class table, confusion table."""
        options = ("display.width", 200, "display.max_columns", 50, "display.float_format", "{:.3f}".format)
        with pd.option_context(*options):
            return (f"accuracy {self.accuracy:.3f} ({round(self.accuracy * self.n)}/{self.n})\n\n"
                    f"{self.per_class.to_string()}\n\nconfusion (rows: truth, columns: labeler)\n"
                    f"{self.confusion.to_string()}")


def _norm(values) -> pd.Series:
    s = pd.Series(values, dtype="object").reset_index(drop=True)
    return s.map(lambda v: NONE if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == ""
                 else str(v).strip())


def agreement(labels: pd.DataFrame | pd.Series, truth, column: str = "primary_diagnosis") -> Agreement:
    """Compare predicted primary diagnoses with ``truth`` (same length and order).

    ``labels`` is a labels table (its ``column`` is used) or the predictions themselves.
    """
    pred = _norm(labels[column] if isinstance(labels, pd.DataFrame) else labels)
    true = _norm(truth)
    if len(pred) != len(true):
        raise ValueError(f"agreement: {len(pred)} predictions but {len(true)} reference labels")
    if len(true) == 0:
        raise ValueError("agreement: no reports to compare")
    # one display name per class, spelled as in the truth where possible
    names: dict[str, str] = {}
    for v in list(true) + list(pred):
        names.setdefault(v.casefold(), v)
    t = true.map(lambda v: names[v.casefold()])
    p = pred.map(lambda v: names[v.casefold()])
    classes = sorted(set(t), key=str.casefold)
    rows = {}
    for c in classes:
        tp = int(((t == c) & (p == c)).sum())
        n_pred, n_true = int((p == c).sum()), int((t == c).sum())
        prec = tp / n_pred if n_pred else float("nan")
        rec = tp / n_true if n_true else float("nan")
        if n_pred and n_true:
            f1 = 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0
        else:
            f1 = 0.0 if n_true else float("nan")
        rows[c] = {"precision": prec, "recall": rec, "f1": f1, "support": n_true, "predicted": n_pred}
    per_class = pd.DataFrame.from_dict(rows, orient="index")
    columns = classes + sorted(set(p) - set(classes), key=lambda v: (v == NONE, v.casefold()))
    confusion = pd.crosstab(t, p).reindex(index=classes, columns=columns, fill_value=0)
    confusion.index.name, confusion.columns.name = "truth", "labeler"
    return Agreement(n=len(t), accuracy=float((t == p).mean()), per_class=per_class, confusion=confusion)
