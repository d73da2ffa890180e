"""The evaluation entry point: one call turns an :class:`Embeddings` file into ``metrics.json`` plus figures.

The JSON layout is documented in ``docs/metrics_schema.md``; bump ``SCHEMA_VERSION`` when it changes.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from emclip import __version__
from emclip.metrics import (
    HEADLINE_METRICS, bootstrap_ci, classification_metrics, headline_metrics, macro_auc, paired_bootstrap,
    roc_auc_ovr)

from . import figures as F
from . import maps
from .bounds import few_shot_probe
from .by_scale import attention_by_scale, by_scale
from .embeddings import Embeddings, scale_from_logit
from .pairs import pair_metrics, pairs_in
from .probe import DEFAULT_CS, linear_probe
from .retrieval import (
    image_image_retrieval, patient_report_retrieval, report_image_retrieval, summarize_retrieval)
from .priors import mean_logprob_correction, ot_assignment, prompt_subsets, spread
from .settings import DEFAULT_EVALUATION, EXTERNAL_SPLIT
from .zeroshot import ensemble, resolve_prompts, softmax, text_embeddings, topj_pool, zero_shot_logits

__all__ = ['evaluate', 'compare_runs', 'SCHEMA_VERSION', 'to_json_safe']

SCHEMA_VERSION = 3  # 3: prior-corrected zero-shot, prompt spread, by_scale, attention_by_scale, bounds


def to_json_safe(obj):
    """numpy scalars/arrays to Python; NaN and inf to None (strict JSON has neither)."""
    if isinstance(obj, dict):
        return {str(k): to_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _dumps(metrics: dict) -> str:
    """Indented JSON with flat lists of numbers (confusion-matrix rows, Cs) kept on one line."""
    text = json.dumps(metrics, indent=2, allow_nan=False)
    return re.sub(r'\[\s+([-+0-9.eE,\s]+?)\s+\]', lambda m: '[' + ', '.join(re.split(r',\s*', m.group(1))) + ']', text)


def _label_indices(diagnosis: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Class index per patient; -1 = no diagnosis, -2 = diagnosis outside the class list."""
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([-1 if d == '' else lookup.get(d, -2) for d in diagnosis], dtype=np.int64)


def _label_provenance(emb: Embeddings, y: np.ndarray, cohort_labels: dict) -> dict:
    """Where the evaluated patients' diagnoses came from and how many could not be used (metrics.json ``labels``)."""
    sources = {s: int((emb.diagnosis_source == s).sum()) for s in ('given', 'labeler', 'none')}
    used = [s for s in ('given', 'labeler') if sources[s]]
    out = {'source': '+'.join(used) if used else 'none', 'sources': sources,
           'n_no_diagnosis': int((y == -1).sum()), 'n_diagnosis_not_in_classes': int((y == -2).sum())}
    for key in ('labeler', 'uncertain'):
        if key in cohort_labels:
            out[key] = cohort_labels[key]
    return out


_macro_auc = macro_auc   # with a weighted form: paired bootstraps score all resamples at once


def _classification_block(y: np.ndarray, probs: np.ndarray, classes: list[str], excluded: dict, boot: dict) -> dict:
    """classification_metrics + bootstrap CIs of the headline metrics, in the metrics.json layout."""
    m = classification_metrics(y, probs, classes)
    if len(y):
        ci = bootstrap_ci(headline_metrics, y, probs, **boot)
    else:
        ci = {k: {'ci_low': float('nan'), 'ci_high': float('nan')} for k in HEADLINE_METRICS}
    block = {'n': m['n'], 'n_excluded': excluded}
    for k in HEADLINE_METRICS:
        block[k] = {'value': m[k], 'ci_low': ci[k]['ci_low'], 'ci_high': ci[k]['ci_high']}
    block.update({k: m[k] for k in ('roc_auc_per_class', 'classes_absent', 'auc_undefined', 'support')})
    block['confusion_matrix'] = {'labels': classes, 'matrix': m['confusion_matrix']}
    return block


def _pick_attention_patients(emb: Embeddings, n: int, seed: int) -> list[int]:
    """Up to n patients with >= 2 images, one per diagnosis first so the figure shows variety."""
    counts = np.bincount(emb.image_patient, minlength=emb.n_patients)
    eligible = np.random.default_rng(seed).permutation(np.flatnonzero(counts >= 2))
    chosen, seen = [], set()
    for p in eligible:
        if emb.diagnosis[p] not in seen and len(chosen) < n:
            chosen.append(int(p))
            seen.add(emb.diagnosis[p])
    chosen += [int(p) for p in eligible if int(p) not in chosen][:n - len(chosen)]
    return sorted(chosen)


def _prior_corrected(logits, y, classes, excluded, boot, train_prior) -> dict:
    """Label-free prior corrections of the patient-level zero-shot (``priors``), fitted on every evaluated patient
    (labelled or not) and scored on the labelled ones."""
    labelled = y >= 0
    variants = {'mean_logprob': softmax(mean_logprob_correction(logits)), 'ot_uniform': ot_assignment(logits)}
    if train_prior is not None:
        variants['ot_train_prior'] = ot_assignment(logits, train_prior)
    out = {k: _classification_block(y[labelled], p[labelled], classes, excluded, boot) for k, p in variants.items()}
    out['definitions'] = {
        'mean_logprob': 'log p(c|x) minus its mean over the evaluated patients, then softmax (no labels used)',
        'ot_uniform': 'Sinkhorn rescaling so predicted class masses are uniform (OTTER), arg-max per patient',
        'ot_train_prior': 'as ot_uniform, to the class frequencies of the train split (train labels only)'}
    return out


def _prompt_spread(emb, texts, prompts, scale, y, n_subsets, seed) -> dict:
    """Patient-level zero-shot with one random (synonym, template) text per class, over ``n_subsets`` such sets."""
    labelled = y >= 0
    if not labelled.any() or n_subsets < 1:
        return {'n_subsets': 0}
    scores = {'balanced_accuracy': [], 'roc_auc_macro_ovr': []}
    for chosen in prompt_subsets(prompts, n_subsets, seed):
        class_emb = np.stack([texts[c][i] for c, i in enumerate(chosen)])
        m = headline_metrics(y[labelled], softmax(zero_shot_logits(emb.patient[labelled], class_emb, scale)))
        for k in scores:
            scores[k].append(m[k])
    return {'n_subsets': n_subsets, 'texts_per_class': 1, 'seed': seed,
            **{k: spread(v) for k, v in scores.items()}}


def _zero_shot(emb, encode_text, scale, prompts, y, topj, boot, dx_outside, train_prior=None,
               n_prompt_subsets: int = 50) -> tuple[dict, dict, list]:
    """Patient-level and image-level (top-j pooled) zero-shot blocks, their probabilities and comparisons; the
    prior-corrected variants and the prompt-subset spread of the patient level."""
    classes = prompts.classes
    texts = text_embeddings(encode_text, prompts)
    cls_emb = ensemble(texts)
    labelled = y >= 0
    excluded = {'no_diagnosis': int((y == -1).sum()), 'diagnosis_not_in_classes': int((y == -2).sum()),
                'no_images': 0}
    logits = zero_shot_logits(emb.patient, cls_emb, scale)
    probs = {'patient': softmax(logits)}
    out = {'patient': _classification_block(y[labelled], probs['patient'][labelled], classes, excluded, boot),
           'prior_corrected': _prior_corrected(logits, y, classes, excluded, boot, train_prior),
           'prompt_subsets': _prompt_spread(emb, texts, prompts, scale, y, n_prompt_subsets, boot['seed']),
           'image_topj': {}, 'diagnoses_not_in_classes': dx_outside}
    comparisons = []
    image_logits = zero_shot_logits(emb.image, cls_emb, scale) if emb.n_images else np.zeros((0, len(classes)))
    out['_image_probs'] = softmax(image_logits) if emb.n_images else image_logits  # popped by evaluate()
    out['_class_emb'] = cls_emb
    for j in topj:
        pooled = topj_pool(image_logits, emb.image_patient, emb.n_patients, j)
        has_images = np.isfinite(pooled).all(1)
        p_j = np.full_like(pooled, np.nan)
        p_j[has_images] = softmax(pooled[has_images])
        probs[f'top{j}'] = p_j
        rows = labelled & has_images
        out['image_topj'][str(j)] = _classification_block(
            y[rows], p_j[rows], classes, {**excluded, 'no_images': int((labelled & ~has_images).sum())}, boot)
        if rows.any():
            cmp = paired_bootstrap(_macro_auc, y[rows], probs['patient'][rows], p_j[rows], **boot)
            comparisons.append({'a': 'zero_shot.patient', 'b': f'zero_shot.image_topj.{j}',
                                'metric': 'roc_auc_macro_ovr', 'n': int(rows.sum()), **cmp})
    return out, probs, comparisons


def _flatten_headline(metrics: dict) -> dict:
    """Flat ``dotted.key -> value`` view of the headline numbers, for ablation tables."""
    flat = {}
    zs = metrics.get('zero_shot', {})
    for key, block in [('zero_shot.patient', zs.get('patient'))] + [
            (f'zero_shot.image_topj.{j}', b) for j, b in zs.get('image_topj', {}).items()]:
        for k in HEADLINE_METRICS if block else ():
            flat[f'{key}.{k}'] = block[k]['value']
    for task, block in metrics.get('retrieval', {}).items():
        for k, v in block.get('recall', {}).items():
            flat[f'retrieval.{task}.R@{k}'] = v['value']
        flat[f'retrieval.{task}.median_rank'] = block.get('median_rank')
    probe = metrics.get('linear_probe', {})
    for k in ('test_roc_auc_macro_ovr', 'test_balanced_accuracy'):
        if k in probe:
            flat[f'linear_probe.{k}.mean'] = probe[k]['mean']
    return flat


def evaluate(embeddings: Embeddings | str | Path, encode_text: Callable[[list[str]], object] | None,
             logit_scale, out_dir: str | Path, classes=None, split: str | None = 'test',
             ks: Sequence[int] = (1, 5, 10, 50), topj: Sequence[int] = DEFAULT_EVALUATION.topj,
             n_boot: int = DEFAULT_EVALUATION.bootstrap, seed: int = 0,
             alpha: float = 0.05, probe: bool = True, probe_seeds: Sequence[int] = (0, 1, 2, 3, 4),
             probe_cs: Sequence[float] = DEFAULT_CS, probe_refit: str = 'train+val',
             max_image_queries: int | None = 10000, chunk_size: int | None = None, figures: bool = True,
             n_attention_patients: int = 4, n_attention_images: int = 3, image_root: str | Path | None = None,
             name: str | None = None, pairs: Sequence[Sequence[str]] | None = None,
             n_prompt_subsets: int = 50, shots: Sequence[int] = (1, 4, 16),
             supervised: dict | None = None) -> dict:
    """Evaluate one model's embeddings on ``split`` and write ``metrics.json``, ``predictions.csv`` and PNG figures.

    Args:
        embeddings: an Embeddings container or the path of its .npz.
        encode_text: the model's text encoder (list of strings -> normalised embeddings); None skips zero-shot.
        logit_scale: the model's ``logit_scale`` parameter (a tensor holding log s) or the scale s as a number;
            None uses the scale stored in the embeddings.
        out_dir: output folder (created).
        classes: zero-shot classes: a PromptSet, a prompt YAML path or bundled name (e.g. ``'renal_em'``), a list of
            class names, or None to use the cohort's distinct diagnosis values with generic templates.
        split: the split evaluated (None = all patients; ``'external'``: another cohort's patients, placed beside
            the run's own train/val patients by ``evaluation.external``); the linear probe always trains on
            train/val.
        topj: j values of the MI-Zero image-level baseline (mean of each patient's top-j image scores).
        max_image_queries: image->image queries are a seeded sample of this many labelled images (None = all).
        pairs: confusable pairs (a, b) scored within the pair (``zero_shot.pairs``); None = the embedded cohort's
            pairs from its disease specification, where both classes are evaluated.
        n_prompt_subsets: random one-text-per-class prompt sets for ``zero_shot.prompt_subsets`` (0 skips).
        shots: labelled train patients per class of the few-shot probe (``bounds.few_shot_probe``; () skips).
        supervised: the result of ``bounds.supervised_mil`` on the same cohort and classes (the supervised MIL
            upper bound, trained on cached trunk features; it does not depend on the model, so callers compute it
            once per cohort); None leaves it out.
    Returns:
        The metrics dictionary that was written to ``out_dir/metrics.json``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    emb_all = embeddings if isinstance(embeddings, Embeddings) else Embeddings.load(embeddings)
    emb = emb_all.subset(split)
    if emb.n_patients == 0:
        raise ValueError(f'no patients in split {split!r}; splits present: {sorted(set(emb_all.split.tolist()))}')
    scale = scale_from_logit(logit_scale) if logit_scale is not None else emb_all.logit_scale
    prompts = resolve_prompts(classes, emb_all.diagnosis)
    classes = prompts.classes
    y = _label_indices(emb.diagnosis, classes)
    dx_outside = sorted({d for d, label in zip(emb.diagnosis, y) if label == -2})
    boot = {'n_boot': n_boot, 'seed': seed, 'alpha': alpha}
    metrics = {
        'schema_version': SCHEMA_VERSION, 'emclip_version': __version__, 'name': name,
        'created': _dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds'), 'split': split,
        'n_patients': emb.n_patients, 'n_images': emb.n_images, 'n_labelled_patients': int((y >= 0).sum()),
        'classes': classes, 'prompts': {'templates': prompts.templates, 'n_texts': sum(
            len(prompts.texts(c)) for c in classes)},
        'labels': _label_provenance(emb, y, emb_all.meta.get('labels') or {}),
        'logit_scale': scale, 'ties': 'pessimistic',
        'bootstrap': {**boot, 'method': 'percentile', 'unit': 'patient'}, 'meta': emb_all.meta,
    }

    probs, comparisons, image_probs, class_emb = {}, [], None, None
    if encode_text is None:
        metrics['zero_shot'] = {'skipped': 'no text encoder given'}
    elif not math.isfinite(scale):
        raise ValueError('zero-shot needs a logit scale: pass logit_scale or store it in the embeddings')
    else:
        y_train = _label_indices(emb_all.diagnosis[emb_all.split == 'train'], classes)
        train_prior = np.bincount(y_train[y_train >= 0], minlength=len(classes)) if (y_train >= 0).any() else None
        metrics['zero_shot'], probs, comparisons = _zero_shot(emb, encode_text, scale, prompts, y, topj, boot,
                                                              dx_outside, train_prior, n_prompt_subsets)
        image_probs = metrics['zero_shot'].pop('_image_probs')
        class_emb = metrics['zero_shot'].pop('_class_emb')
        labelled = y >= 0
        metrics['zero_shot']['pairs'] = pair_metrics(y[labelled], probs['patient'][labelled], classes,
                                                     pairs_in(classes, pairs), **boot)

    tasks = patient_report_retrieval(emb, chunk_size)
    if emb.n_images:
        tasks += [report_image_retrieval(emb, chunk_size),
                  image_image_retrieval(emb, chunk_size, max_queries=max_image_queries, seed=seed)]
    metrics['retrieval'] = {t.name: summarize_retrieval(t, ks, **boot) for t in tasks}
    i2i = next((t for t in tasks if t.name == 'image_to_image'), None)
    metrics['by_scale'] = by_scale(emb, y, image_probs, i2i)
    metrics['attention_by_scale'] = attention_by_scale(emb, y, classes)

    if probe and split in (None, 'train', 'val'):
        metrics['linear_probe'] = {'skipped': f'the probe trains on train/val, so it cannot be scored on {split!r}'}
    elif probe:
        y_all = _label_indices(emb_all.diagnosis, classes)
        parts = {s: (emb_all.split == s) & (y_all >= 0) for s in ('train', 'val', split)}
        metrics['linear_probe'] = linear_probe(
            *[a for s in ('train', 'val', split) for a in (emb_all.patient[parts[s]], y_all[parts[s]])],
            n_classes=len(classes), cs=probe_cs, seeds=probe_seeds, refit=probe_refit)
        metrics['linear_probe']['n_excluded'] = {   # patients of each split the probe could not use, and why
            s: {'no_diagnosis': int(((emb_all.split == s) & (y_all == -1)).sum()),
                'diagnosis_not_in_classes': int(((emb_all.split == s) & (y_all == -2)).sum())}
            for s in ('train', 'val', split)}
    else:
        metrics['linear_probe'] = {'skipped': 'disabled'}
    metrics['bounds'] = _bounds(emb_all, classes, split, shots, supervised, boot) if split in (
        'test', EXTERNAL_SPLIT) else {
        'skipped': f'supervised bounds train on train/val and are scored on test or an external cohort, not {split!r}'}
    metrics['comparisons'] = comparisons

    metrics['figures'] = _write_figures(emb, y, probs, metrics, tasks, out_dir, seed, n_attention_patients,
                                        n_attention_images, image_root, class_emb) if figures else {}
    if probs:
        table = pd.DataFrame({'patient_id': emb.patient_ids, 'diagnosis': emb.diagnosis})
        for key, p in probs.items():
            table[f'{key}_pred'] = [classes[i] if np.isfinite(r).all() else '' for i, r in zip(p.argmax(1), p)]
            for c, name_ in enumerate(classes):
                table[f'{key}_p[{name_}]'] = p[:, c]
        table.to_csv(out_dir / 'predictions.csv', index=False)
    metrics['headline'] = _flatten_headline(metrics)
    metrics = to_json_safe(metrics)
    (out_dir / 'metrics.json').write_text(_dumps(metrics))
    return metrics


def _bounds(emb_all: Embeddings, classes: list[str], split: str, shots, supervised, boot) -> dict:
    """Few-shot probe on patient embeddings and the given supervised MIL result, both on train labels only."""
    y_all = _label_indices(emb_all.diagnosis, classes)
    tr, te = (emb_all.split == 'train') & (y_all >= 0), (emb_all.split == split) & (y_all >= 0)
    out = {'few_shot_probe': few_shot_probe(emb_all.patient[tr], y_all[tr], emb_all.patient[te], y_all[te],
                                            len(classes), shots) if shots else {'skipped': 'disabled'}}
    if supervised is None or 'skipped' in supervised:
        out['supervised_mil'] = supervised or {'skipped': 'not computed (needs cached trunk features)'}
        return out
    res = dict(supervised)
    ids, probs = res.pop('test_patient_ids'), np.asarray(res.pop('test_probs'))
    row = {str(p): i for i, p in enumerate(emb_all.patient_ids)}
    rows = np.array([row[p] for p in ids])
    block = _classification_block(y_all[rows], probs, classes, {}, boot)
    out['supervised_mil'] = {**res, **{k: block[k] for k in HEADLINE_METRICS}, 'n': block['n'],
                             'confusion_matrix': block['confusion_matrix']}
    return out


def _write_figures(emb, y, probs, metrics, tasks, out_dir, seed, n_patients, n_images, image_root,
                   class_emb=None) -> dict:
    written = {}
    if metrics['by_scale']['bins']:
        F.save_figure(maps.plot_by_scale(metrics['by_scale']), out_dir / 'by_scale.png')
        F.save_figure(maps.plot_attention_by_scale(metrics['attention_by_scale']), out_dir / 'attention_by_scale.png')
        written.update(by_scale='by_scale.png', attention_by_scale='attention_by_scale.png')
    if emb.n_patients >= 4:
        F.save_figure(maps.embedding_map(emb, y, metrics['classes'], seed), out_dir / 'embedding_map.png')
        written['embedding_map'] = 'embedding_map.png'
    if class_emb is not None:
        F.save_figure(maps.plot_prompt_similarity(class_emb, metrics['classes'], emb.patient, y),
                      out_dir / 'prompt_similarity.png')
        written['prompt_similarity'] = 'prompt_similarity.png'
    zs = metrics['zero_shot'].get('patient')
    if zs and zs['n']:
        rows = y >= 0
        classes = metrics['classes']
        F.save_figure(F.plot_roc(y[rows], probs['patient'][rows], classes, zs['roc_auc_per_class']),
                      out_dir / 'roc.png')
        F.save_figure(F.plot_confusion(zs['confusion_matrix']['matrix'], classes), out_dir / 'confusion_matrix.png')
        written.update(roc='roc.png', confusion_matrix='confusion_matrix.png')
    F.save_figure(F.plot_recall_curves({t.name: (t.ranks, t.n_items) for t in tasks}), out_dir / 'recall_at_k.png')
    written['recall_at_k'] = 'recall_at_k.png'
    if emb.n_images and np.isfinite(emb.image_attention).any() and n_patients > 0:
        chosen = _pick_attention_patients(emb, n_patients, seed)
        if chosen:
            F.save_figure(F.plot_attention(emb, chosen, max(1, n_images), image_root), out_dir / 'attention.png')
            written['attention'] = 'attention.png'
            written['attention_patients'] = [str(emb.patient_ids[p]) for p in chosen]
    return written


def compare_runs(run_a: str | Path, run_b: str | Path, key: str = 'patient', n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> dict:
    """Paired bootstrap of macro OvR AUC between two evaluated runs (e.g. scale-aware vs scale-blind).

    Reads both runs' ``predictions.csv``, keeps the labelled patients present in both with finite probabilities for
    ``key`` (``'patient'`` or ``'top{j}'``), and resamples those patients jointly. Both runs must share the classes.
    """
    tables = [pd.read_csv(Path(r) / 'predictions.csv', keep_default_na=False) for r in (run_a, run_b)]
    cols = [[c for c in t.columns if c.startswith(f'{key}_p[')] for t in tables]
    if not cols[0] or cols[0] != cols[1]:
        raise ValueError(f'runs do not share the {key!r} probability columns: {cols[0]} vs {cols[1]}')
    classes = [c[len(key) + 3:-1] for c in cols[0]]
    merged = tables[0].merge(tables[1], on='patient_id', suffixes=('_a', '_b'))
    merged = merged[merged['diagnosis_a'].isin(classes)]
    pa = merged[[f'{c}_a' for c in cols[0]]].apply(pd.to_numeric, errors='coerce').to_numpy(float)
    pb = merged[[f'{c}_b' for c in cols[0]]].apply(pd.to_numeric, errors='coerce').to_numpy(float)
    keep = np.isfinite(pa).all(1) & np.isfinite(pb).all(1)
    y = _label_indices(merged['diagnosis_a'].to_numpy(str)[keep], classes)
    out = paired_bootstrap(_macro_auc, y, pa[keep], pb[keep], n_boot=n_boot, seed=seed, alpha=alpha)
    return to_json_safe({'a': str(run_a), 'b': str(run_b), 'key': key, 'metric': 'roc_auc_macro_ovr',
                         'n': int(keep.sum()), **out})
