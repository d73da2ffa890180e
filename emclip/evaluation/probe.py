"""Linear probe on frozen patient embeddings (logistic regression), mean +- sd over seeds.

Protocol, per seed:

1. the pooled train + validation patients are re-partitioned into train / validation with the cohort's validation
   fraction, stratified by diagnosis (seeded; ``resplit=False`` keeps the cohort's own split for every seed);
2. the inverse regularisation C is chosen on that validation part over a log-spaced sweep by the lowest
   validation cross-entropy (log loss); ties go to the smaller C (stronger regularisation). A proper scoring rule
   rather than AUC, because AUC saturates on easy validation sets and would then pick the most regularised model,
   whose arg-max predictions (and balanced accuracy) are poor;
3. the model is refit with the chosen C on train + validation (``refit='train+val'``, the default) or on train only;
4. it is scored once on the untouched test split (macro OvR ROC-AUC and balanced accuracy).

L-BFGS logistic regression is deterministic, so the spread over seeds comes from the re-partition (and, with the
default refit, from the choice of C); with ``resplit=False`` the sd is zero by construction.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from threadpoolctl import threadpool_limits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit

from emclip.metrics import headline_metrics

__all__ = ['linear_probe', 'DEFAULT_CS']

DEFAULT_CS = tuple(np.logspace(-3, 3, 13).tolist())


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int, max_iter: int) -> LogisticRegression:
    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    # one BLAS thread: these matrices are small, and threaded BLAS on them is slower (about 3x on 2 busy cores)
    with warnings.catch_warnings(), threadpool_limits(1):
        # very weak regularisation on separable data stops at max_iter; the sweep still ranks it fairly
        warnings.simplefilter('ignore', ConvergenceWarning)
        clf.fit(x, y)
    return clf


def _proba(clf: LogisticRegression, x: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over all classes (zero columns for classes the model never saw in training)."""
    out = np.zeros((len(x), n_classes))
    out[:, clf.classes_] = clf.predict_proba(x)
    return out


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean cross-entropy over all ``p.shape[1]`` classes (a validation part may lack some). Clipped at 1e-15 first,
    as before sklearn dropped ``eps``: its own floor, machine epsilon, would score a zero column (a class the
    training part lacked) 36.0 instead of 34.5 per patient and could change which C wins."""
    return float(log_loss(y, np.clip(p, 1e-15, 1.0), labels=np.arange(p.shape[1])))


def _partition(y_pool: np.ndarray, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        split = StratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
        return next(split.split(np.zeros(len(y_pool)), y_pool))
    except ValueError:  # a class with a single patient cannot be stratified
        split = ShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
        return next(split.split(np.zeros(len(y_pool))))


def linear_probe(x_train, y_train, x_val, y_val, x_test, y_test, n_classes: int,
                 cs: Sequence[float] = DEFAULT_CS, seeds: Sequence[int] = (0, 1, 2, 3, 4), refit: str = 'train+val',
                 resplit: bool = True, max_iter: int = 1000) -> dict:
    """Run the probe protocol of the module docstring; labels are class indices in ``[0, n_classes)``.

    Returns the protocol settings, ``per_seed`` records (chosen C, validation score, test metrics) and
    ``test_roc_auc_macro_ovr`` / ``test_balanced_accuracy`` as ``{mean, sd}`` (sd with ddof=1), or
    ``{'skipped': reason}`` when the data cannot support a probe.
    """
    if refit not in ('train', 'train+val'):
        raise ValueError(f"refit must be 'train' or 'train+val', got {refit!r}")
    x_tr, x_va, x_te = (np.asarray(a, dtype=np.float64) for a in (x_train, x_val, x_test))
    y_tr, y_va, y_te = (np.asarray(a, dtype=np.int64) for a in (y_train, y_val, y_test))
    if len(np.unique(y_tr)) < 2 or len(y_va) == 0 or len(y_te) == 0:
        return {'skipped': f'needs >= 2 training classes and non-empty validation and test splits '
                           f'(train classes: {len(np.unique(y_tr))}, val: {len(y_va)}, test: {len(y_te)} patients)'}
    x_pool, y_pool = np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va])
    records = []
    for seed in seeds:
        if resplit:
            tr, va = _partition(y_pool, len(y_va), seed)
        else:
            tr, va = np.arange(len(y_tr)), np.arange(len(y_tr), len(y_pool))
        if len(np.unique(y_pool[tr])) < 2:
            continue
        best_c, best_loss, best_val = None, np.inf, {}
        for c in sorted(cs):
            clf = _fit(x_pool[tr], y_pool[tr], c, seed, max_iter)
            p_va = _proba(clf, x_pool[va], n_classes)
            loss = _log_loss(y_pool[va], p_va)
            if loss < best_loss:
                best_c, best_loss, best_val = c, loss, headline_metrics(y_pool[va], p_va)
        fit_rows = np.concatenate([tr, va]) if refit == 'train+val' else tr
        clf = _fit(x_pool[fit_rows], y_pool[fit_rows], best_c, seed, max_iter)
        m = headline_metrics(y_te, _proba(clf, x_te, n_classes))
        records.append({'seed': int(seed), 'C': float(best_c), 'val_log_loss': float(best_loss),
                        'val_roc_auc_macro_ovr': best_val['roc_auc_macro_ovr'],
                        'val_balanced_accuracy': best_val['balanced_accuracy'],
                        'test_roc_auc_macro_ovr': m['roc_auc_macro_ovr'],
                        'test_balanced_accuracy': m['balanced_accuracy'], 'test_f1_macro': m['f1_macro']})
    if not records:
        return {'skipped': 'every seed drew a training part with a single class'}

    def mean_sd(key: str) -> dict:
        v = np.array([r[key] for r in records], dtype=np.float64)
        return {'mean': float(np.nanmean(v)), 'sd': float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0}

    return {
        'model': 'sklearn LogisticRegression (lbfgs, multinomial, L2)', 'selection': 'min val log loss',
        'refit': refit, 'resplit': bool(resplit), 'cs': [float(c) for c in sorted(cs)],
        'n_train': int(len(y_tr)), 'n_val': int(len(y_va)), 'n_test': int(len(y_te)),
        'per_seed': records,
        'test_roc_auc_macro_ovr': mean_sd('test_roc_auc_macro_ovr'),
        'test_balanced_accuracy': mean_sd('test_balanced_accuracy'),
        'test_f1_macro': mean_sd('test_f1_macro'),
    }
