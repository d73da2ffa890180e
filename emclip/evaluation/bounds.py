"""How far zero-shot is from supervision: a supervised MIL model and a few-shot probe, trained on train labels only.

* **Supervised MIL** (the upper bound of what these image features can give with labels): gated-attention pooling
  (Ilse et al., 2018) over each patient's cached trunk features, with the log physical scale as one more input, and
  a linear classifier; cross-entropy on the train split, the epoch with the lowest validation loss kept, mean of the
  seeds' test probabilities scored once.
* **Few-shot probe** (the lower end of supervision): logistic regression on the frozen patient embeddings with
  k = 1, 4, 16 labelled train patients per class (fewer if a class has fewer), C = 1 (no validation set exists at
  one shot), mean and sd over seeds.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from emclip.metrics import headline_metrics

__all__ = ['few_shot_probe', 'supervised_mil', 'GatedMIL']


def few_shot_probe(x_train, y_train, x_test, y_test, n_classes: int, shots: Sequence[int] = (1, 4, 16),
                   seeds: Sequence[int] = (0, 1, 2, 3, 4), c: float = 1.0) -> dict:
    """Per k in ``shots``: test ROC-AUC and balanced accuracy ``{mean, sd}`` over ``seeds`` draws of k train patients
    per class; labels are class indices."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x_tr, x_te = np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)
    y_tr, y_te = np.asarray(y_train, np.int64), np.asarray(y_test, np.int64)
    if len(np.unique(y_tr)) < 2 or not len(y_te):
        return {'skipped': 'needs >= 2 labelled train classes and labelled test patients'}
    out = {'model': f'sklearn LogisticRegression (lbfgs, L2, C={c:g})', 'seeds': list(map(int, seeds)), 'shots': {}}
    for k in shots:
        records = []
        for seed in seeds:
            rng = np.random.default_rng([seed, k])
            rows = np.concatenate([rng.permutation(np.flatnonzero(y_tr == cls))[:k] for cls in np.unique(y_tr)])
            clf = LogisticRegression(C=c, max_iter=1000, random_state=seed)
            with warnings.catch_warnings(), threadpool_limits(1):
                warnings.simplefilter('ignore', ConvergenceWarning)
                clf.fit(x_tr[rows], y_tr[rows])
            p = np.zeros((len(x_te), n_classes))
            p[:, clf.classes_] = clf.predict_proba(x_te)
            m = headline_metrics(y_te, p)
            records.append({'seed': int(seed), 'n_train': int(len(rows)), 'roc_auc_macro_ovr': m['roc_auc_macro_ovr'],
                            'balanced_accuracy': m['balanced_accuracy']})
        out['shots'][str(k)] = {'per_seed': records, **{key: _mean_sd([r[key] for r in records])
                                                        for key in ('roc_auc_macro_ovr', 'balanced_accuracy')}}
    return out


def _mean_sd(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {'mean': float(np.nanmean(v)), 'sd': float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0}


def scale_features(log_scale: torch.Tensor, n_freq: int = 8) -> torch.Tensor:
    """log nm/px and its sines / cosines at octave frequencies over the 2-100 nm/px range: a per-image input from
    which a two-layer MLP can form scale x feature interactions (what a twin pair needs)."""
    z = (log_scale - np.log(14.0)) / np.log(50.0)
    freq = (2.0 ** torch.arange(n_freq, dtype=log_scale.dtype)) * np.pi
    ang = z[..., None] * freq
    return torch.cat([z[..., None], torch.sin(ang), torch.cos(ang)], -1)


class GatedMIL(torch.nn.Module):
    """Gated-attention MIL classifier: per-image features + scale encoding -> two-layer MLP -> attention pool ->
    logits."""

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 128, dropout: float = 0.25, n_freq: int = 8):
        super().__init__()
        self.n_freq = n_freq
        self.embed = torch.nn.Sequential(torch.nn.Linear(in_dim + 1 + 2 * n_freq, hidden), torch.nn.ReLU(),
                                         torch.nn.Dropout(dropout), torch.nn.Linear(hidden, hidden), torch.nn.ReLU())
        self.v, self.u = torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, hidden)
        self.w = torch.nn.Linear(hidden, 1)
        self.head = torch.nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor, log_scale: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(torch.cat([x, scale_features(log_scale, self.n_freq)], -1))
        a = self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1).masked_fill(~mask, float('-inf'))
        return self.head((torch.softmax(a, dim=1)[..., None] * h).sum(1))


def _pad(bags: list[np.ndarray], scales: list[np.ndarray]):
    k = max(len(b) for b in bags)
    x = torch.zeros(len(bags), k, bags[0].shape[1])
    s = torch.zeros(len(bags), k)
    m = torch.zeros(len(bags), k, dtype=torch.bool)
    for i, (b, sc) in enumerate(zip(bags, scales)):
        x[i, :len(b)] = torch.as_tensor(np.asarray(b, np.float32))
        s[i, :len(b)] = torch.as_tensor(np.log(np.asarray(sc, np.float32)))
        m[i, :len(b)] = True
    return x, s, m


def supervised_mil(bags: list[np.ndarray], scales: list[np.ndarray], y: np.ndarray, split: np.ndarray,
                   n_classes: int, patient_ids=None, test_split: str = 'test', seeds: Sequence[int] = (0, 1, 2),
                   epochs: int = 40, patience: int = 8, lr: float = 1e-3, weight_decay: float = 1e-4,
                   batch_size: int = 32) -> dict:
    """Train the gated-attention MIL classifier on the labelled train patients, keep each seed's epoch with the
    lowest validation loss (stopping ``patience`` epochs after it), and return the test probabilities (mean over
    seeds, rows in ``test_patient_ids`` order) with the training record.

    ``bags[i]`` are patient i's per-image features, ``scales[i]`` their nm/px; ``y`` class indices (< 0 =
    unlabelled, excluded); ``split`` the patients' split names."""
    y, split = np.asarray(y), np.asarray(split)
    tr, va, te = ((split == s) & (y >= 0) for s in ('train', 'val', test_split))
    if len(np.unique(y[tr])) < 2 or not va.any() or not te.any():
        return {'skipped': 'needs >= 2 labelled train classes and labelled val and test patients'}
    # standardise features with train statistics (cached trunk features are not centred)
    train_feats = np.concatenate([bags[i] for i in np.flatnonzero(tr)])
    mu, sd = train_feats.mean(0), train_feats.std(0) + 1e-6
    data = {name: _pad([(bags[i] - mu) / sd for i in np.flatnonzero(rows)], [scales[i] for i in np.flatnonzero(rows)])
            + (torch.as_tensor(y[rows]),) for name, rows in (('train', tr), ('val', va), ('test', te))}
    counts = np.bincount(y[tr], minlength=n_classes)
    weight = torch.as_tensor(np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n_classes, 0.0),
                             dtype=torch.float32)
    test_probs, record = [], []
    # callers evaluate under torch.no_grad(); this bound trains, so it turns gradients back on
    with threadpool_limits(1), torch.enable_grad():
        for seed in seeds:
            torch.manual_seed(seed)
            model = GatedMIL(bags[0].shape[1], n_classes)
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
            loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
            best, best_state, best_epoch = float('inf'), None, 0
            x, s, m, t = data['train']
            gen = torch.Generator().manual_seed(seed)
            for epoch in range(epochs):
                model.train()
                for idx in torch.randperm(len(t), generator=gen).split(batch_size):
                    opt.zero_grad()
                    loss_fn(model(x[idx], s[idx], m[idx]), t[idx]).backward()
                    opt.step()
                model.eval()
                with torch.no_grad():
                    val = float(torch.nn.functional.cross_entropy(model(*data['val'][:3]), data['val'][3]))
                if val < best:
                    best, best_epoch = val, epoch
                    best_state = {k: v.clone() for k, v in model.state_dict().items()}
                elif epoch - best_epoch >= patience:
                    break
            model.load_state_dict(best_state)
            model.eval()
            with torch.no_grad():
                test_probs.append(torch.softmax(model(*data['test'][:3]), -1).numpy())
            record.append({'seed': int(seed), 'best_epoch': int(best_epoch), 'val_loss': best})
    return {'model': 'gated-attention MIL (Ilse et al. 2018) on cached trunk features + log nm/px, AdamW, '
                     'class-weighted cross-entropy, epoch of lowest val loss', 'epochs': epochs,
            'n_train': int(tr.sum()), 'n_val': int(va.sum()), 'n_test': int(te.sum()), 'per_seed': record,
            'test_patient_ids': [str(p) for p in (np.asarray(patient_ids)[te] if patient_ids is not None
                                                  else np.flatnonzero(te))],
            'test_probs': np.mean(test_probs, axis=0).tolist()}
