"""Zero-shot beside its class priors: label-free prior corrections and the spread over random prompt subsets.

A CLIP-style zero-shot classifier inherits a class prior from its text side: some class prompts sit closer to every
image than others, so arg-max predictions pile onto them (balanced accuracy falls while AUC, which ranks within a
class, does not). Two corrections that use **no labels of the evaluated patients**:

* ``mean_logprob``: subtract from each class's log-probability its mean over the evaluated patients; a class every
  patient leans towards loses that lean (a transductive estimate of the imposed log prior);
* ``ot``: optimal transport as in OTTER (Shi et al., 2024): rescale the probabilities by Sinkhorn iterations so the
  predicted class masses match a target prior (uniform, or the class frequencies of the *train* split), then take
  the arg-max of each patient's row.

The prompt-subset spread (MI-Zero reports it over 50 prompt sets) shows how much a result depends on the wording:
each subset embeds one random (synonym, template) text per class.
"""
from __future__ import annotations

import numpy as np
import scipy.special

from .zeroshot import PromptSet

__all__ = ['log_softmax', 'mean_logprob_correction', 'ot_assignment', 'prompt_subsets', 'spread']


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the classes (axis 1), in float64."""
    return scipy.special.log_softmax(np.asarray(logits, dtype=np.float64), axis=1)


def mean_logprob_correction(logits: np.ndarray) -> np.ndarray:
    """Corrected logits: log p(c | x) minus the mean of log p(c | x') over all rows x' (no labels used)."""
    logp = log_softmax(logits)
    return logp - logp.mean(axis=0, keepdims=True)


def ot_assignment(logits: np.ndarray, prior: np.ndarray | None = None, n_iter: int = 500,
                  tol: float = 1e-10) -> np.ndarray:
    """Probabilities whose column sums match ``prior`` (uniform if None): Sinkhorn scaling of softmax(logits) with
    row marginals 1/n and column marginals ``prior``, in log space; each returned row sums to 1."""
    logp = log_softmax(logits)
    n, k = logp.shape
    target = np.full(k, 1.0 / k) if prior is None else np.asarray(prior, dtype=np.float64)
    if target.shape != (k,) or (target < 0).any() or target.sum() <= 0:
        raise ValueError(f'prior must be {k} non-negative numbers, got {prior}')
    target = target / target.sum()
    log_col = np.log(np.where(target > 0, target, 1e-300))
    log_row = np.full(n, -np.log(n))
    u, v = np.zeros(n), np.zeros(k)
    for _ in range(n_iter):
        u = log_row - _logsumexp(logp + v[None, :], axis=1)
        v_new = log_col - _logsumexp(logp + u[:, None], axis=0)
        if np.max(np.abs(v_new - v)) < tol:
            v = v_new
            break
        v = v_new
    plan = logp + u[:, None] + v[None, :]
    return np.exp(plan - _logsumexp(plan, axis=1)[:, None])


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def prompt_subsets(prompts: PromptSet, n: int, seed: int = 0) -> list[list[int]]:
    """``n`` random prompt sets: for each, per class, the index of one (synonym x template) text in
    ``prompts.texts(class)``. Seeded; the same seed gives the same sets."""
    rng = np.random.default_rng(seed)
    sizes = [len(prompts.texts(c)) for c in prompts.classes]
    return [[int(rng.integers(s)) for s in sizes] for _ in range(n)]


def spread(values) -> dict:
    """Median, quartiles and range of a list of numbers (NaNs ignored)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return {'n': 0, 'median': float('nan'), 'q25': float('nan'), 'q75': float('nan'), 'min': float('nan'),
                'max': float('nan')}
    return {'n': int(len(v)), 'median': float(np.median(v)), 'q25': float(np.quantile(v, 0.25)),
            'q75': float(np.quantile(v, 0.75)), 'min': float(v.min()), 'max': float(v.max())}
