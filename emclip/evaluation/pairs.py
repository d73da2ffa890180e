"""Confusable pairs: diagnoses that differ only in a physical size, scored against each other alone.

A pair (a, b) comes from the embedded cohort's disease specification (``twin_of`` / ``size_ratio`` in
``emclip/synthetic/diseases.yaml``), never from hard-coded names. Within-pair metrics take the patients whose true
diagnosis is a or b and decide between those two classes only, from the zero-shot probabilities:

* ``roc_auc``: AUC of log p(a) - log p(b) with a as the positive class;
* ``accuracy``: fraction of those patients whose true class scores above the other one of the pair;
* ``balanced_accuracy``: the mean of the two per-class recalls of that decision.

These isolate the scale question: a scale-blind model cannot tell a pair apart from one image.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from emclip.metrics import bootstrap_ci, paired_bootstrap, roc_auc_ovr

PAIR_METRICS = ('accuracy', 'balanced_accuracy', 'roc_auc')


def generator_pairs() -> list[tuple[str, str]]:
    """(twin, partner) for every confusable pair declared in the embedded cohort's disease specification."""
    from emclip.synthetic.specs import confusable_pairs
    return [(a, b) for a, b, _ in confusable_pairs()]


def pairs_in(classes: Sequence[str], pairs: Sequence[Sequence[str]] | None = None) -> list[tuple[str, str]]:
    """The pairs (default: the generator's) whose two classes are both among ``classes``."""
    pairs = generator_pairs() if pairs is None else pairs
    return [(str(a), str(b)) for a, b in pairs if a in classes and b in classes]


def pair_name(pair: Sequence[str]) -> str:
    return f'{pair[0]} vs {pair[1]}'


def _within(y: np.ndarray, probs: np.ndarray, ia: int, ib: int):
    """(binary truth: 1 = a, score log p(a) - log p(b)) for the rows whose truth is a or b."""
    rows = (y == ia) | (y == ib)
    with np.errstate(divide='ignore'):
        score = np.log(probs[rows, ia]) - np.log(probs[rows, ib])
    return (y[rows] == ia).astype(np.int64), score


def _pair_values(truth: np.ndarray, score: np.ndarray) -> dict:
    pred = (score > 0).astype(np.int64)
    recalls = [float((pred[truth == c] == c).mean()) if (truth == c).any() else float('nan') for c in (0, 1)]
    auc = float(roc_auc_ovr(truth, np.stack([-score, score], 1))[1]) if len(set(truth.tolist())) == 2 else float('nan')
    return {'accuracy': float((pred == truth).mean()) if len(truth) else float('nan'),
            'balanced_accuracy': float(np.mean(recalls)), 'roc_auc': auc}


def pair_metrics(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], pairs: Sequence[Sequence[str]],
                 n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Within-pair accuracy, balanced accuracy and AUC with patient-bootstrap CIs, one block per pair."""
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for a, b in pairs:
        truth, score = _within(np.asarray(y), np.asarray(probs), index[a], index[b])
        block = {'a': a, 'b': b, 'n': int(len(truth)), 'n_a': int(truth.sum()), 'n_b': int(len(truth) - truth.sum())}
        if len(truth):
            ci = bootstrap_ci(_pair_values, truth, score, n_boot=n_boot, seed=seed, alpha=alpha)
            for k in PAIR_METRICS:
                block[k] = {'value': ci[k]['value'], 'ci_low': ci[k]['ci_low'], 'ci_high': ci[k]['ci_high']}
        out[pair_name((a, b))] = block
    return out


def paired_pair_difference(y: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, classes: Sequence[str],
                           pair: Sequence[str], metric: str = 'accuracy', n_boot: int = 1000, seed: int = 0,
                           alpha: float = 0.05) -> dict:
    """Paired bootstrap of a within-pair metric between two models on the same patients (a minus b)."""
    index = {c: i for i, c in enumerate(classes)}
    truth, sa = _within(np.asarray(y), np.asarray(probs_a), index[pair[0]], index[pair[1]])
    _, sb = _within(np.asarray(y), np.asarray(probs_b), index[pair[0]], index[pair[1]])
    return paired_bootstrap(lambda t, s: _pair_values(t, s)[metric], truth, sa, sb, n_boot=n_boot, seed=seed,
                            alpha=alpha)
