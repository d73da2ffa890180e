"""What a reader sees of one evaluation: tables with human column names and rounded numbers, and a conclusion.

Everything here reads a ``metrics.json`` dictionary (``docs/metrics_schema.md``); nothing is recomputed, so a
table and the file it came from can never disagree.
"""
from __future__ import annotations

import html as _html

import numpy as np
import pandas as pd

__all__ = ['LEGEND', 'fmt', 'fmt_ci', 'headline_table', 'scale_table', 'conclusion', 'zero_shot_table', 'pair_table',
           'per_class_auc', 'retrieval_table', 'probe_table', 'legend', 'label_sentence', 'external_table',
           'evaluated_patients']

# Column name -> what it means; shown under tables so that no reader needs the schema.
LEGEND = {
    'balanced accuracy': 'mean recall over the diagnoses present (chance = 1 / number of classes)',
    'ROC-AUC': 'one-vs-rest ROC-AUC averaged over classes (0.5 = chance)',
    '95% CI': 'percentile bootstrap over patients (1,000 resamples unless stated)',
    'patients': 'labelled patients scored',
    'labels used': 'which labels the method saw: none, or train-split labels',
    'external': "another cohort's patients, all scored; methods that learn from labels are fitted on the run's own "
                'train (and val) patients only',
    'external - internal': 'difference of the point estimates; R@k also depends on the gallery size (patients)',
}


def legend(*columns: str) -> str:
    """A markdown legend for the given column names (those LEGEND knows)."""
    return '  \n'.join(f'**{c}**: {LEGEND[c]}' for c in columns if c in LEGEND)


def _r(value, digits: int = 3) -> float:
    """Rounded number for a table cell; NaN when undefined (None in metrics.json)."""
    return round(float(value), digits) if value is not None and np.isfinite(value) else float('nan')


_METRIC_NAMES = {'roc_auc_macro_ovr': 'ROC-AUC', 'balanced_accuracy': 'balanced accuracy',
                 'f1_macro': 'F1 (macro)', 'f1_weighted': 'F1 (weighted)', 'accuracy': 'accuracy'}


def zero_shot_table(metrics: dict) -> pd.DataFrame:
    """Patient-level zero-shot and the MI-Zero top-j image baselines: every headline metric with its 95% CI."""
    zs = metrics['zero_shot']
    blocks = {'patient embedding vs prompts': zs['patient']}
    blocks.update({f'top-{j} images vs prompts (MI-Zero)': b for j, b in zs.get('image_topj', {}).items()})
    rows = {}
    for name, block in blocks.items():
        row = {'patients': block['n']}
        for key, label in _METRIC_NAMES.items():
            row[label] = _r(block[key]['value'])
            row[f'{label} 95% CI'] = fmt_ci(block[key])
        rows[name] = row
    return pd.DataFrame(rows).T


def pair_table(metrics: dict) -> pd.DataFrame:
    """Within-pair accuracy, balanced accuracy and ROC-AUC of each confusable pair, with 95% CIs."""
    rows = {}
    names = {'accuracy': 'within-pair accuracy', 'balanced_accuracy': 'balanced accuracy', 'roc_auc': 'ROC-AUC'}
    for name, block in metrics['zero_shot'].get('pairs', {}).items():
        row = {'patients': block['n']}
        for key, label in names.items():
            if key in block:
                row[label] = _r(block[key]['value'])
                row[f'{label} 95% CI'] = fmt_ci(block[key])
        rows[name] = row
    return pd.DataFrame(rows).T


def per_class_auc(metrics: dict) -> pd.DataFrame:
    zs = metrics['zero_shot']['patient']
    return pd.DataFrame({'ROC-AUC (one vs rest)': {k: _r(v) for k, v in zs['roc_auc_per_class'].items()},
                         'patients': zs['support']}).rename_axis('diagnosis')


def retrieval_table(metrics: dict) -> pd.DataFrame:
    names = {'report_to_patient': 'report -> its patient', 'patient_to_report': 'patient -> its report',
             'report_to_image': "report -> its patient's images", 'image_to_image': 'image -> same-diagnosis image'}
    rows = {}
    for task, block in metrics['retrieval'].items():
        row = {f'R@{k}': _r(v['value']) for k, v in block['recall'].items()}
        row['R@1 95% CI'] = fmt_ci(block['recall'].get('1'))
        row.update({'median rank': _r(block['median_rank'], 1), 'queries': int(block['n_queries']),
                    'gallery': int(block['n_items'])})
        rows[names.get(task, task)] = row
    return pd.DataFrame(rows).T.astype({'queries': int, 'gallery': int})


def probe_table(metrics: dict) -> pd.DataFrame:
    """The linear probe per seed: chosen C, validation and test scores."""
    lp = metrics.get('linear_probe', {})
    if 'per_seed' not in lp:
        return pd.DataFrame({'linear probe': [lp.get('skipped', 'not run')]})
    t = pd.DataFrame(lp['per_seed']).set_index('seed')
    t = t.rename(columns={'val_log_loss': 'val log loss', 'val_roc_auc_macro_ovr': 'val ROC-AUC',
                          'val_balanced_accuracy': 'val balanced accuracy', 'test_roc_auc_macro_ovr': 'test ROC-AUC',
                          'test_balanced_accuracy': 'test balanced accuracy', 'test_f1_macro': 'test F1 (macro)'})
    return t.round(3)


def fmt(value, digits: int = 3) -> str:
    """A number for a reader: rounded, 'n/a' when undefined."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return 'n/a'
    return f'{value:.{digits}f}'


def fmt_ci(block: dict | None, digits: int = 3) -> str:
    if not block or block.get('ci_low') is None or block.get('ci_high') is None:
        return ''
    return f'[{block["ci_low"]:.{digits}f}, {block["ci_high"]:.{digits}f}]'


def _row(method: str, labels: str, bal=None, auc=None, n=None, bal_ci: str = '', auc_ci: str = '') -> dict:
    return {'method': method, 'labels used': labels, 'balanced accuracy': fmt(bal), '95% CI': bal_ci,
            'ROC-AUC': fmt(auc), 'ROC-AUC 95% CI': auc_ci, 'patients': '' if n is None else str(int(n))}


_PRIOR_NAMES = {'mean_logprob': 'zero-shot, prior-corrected (mean log-probability)',
                'ot_uniform': 'zero-shot, prior-corrected (optimal transport to uniform)',
                'ot_train_prior': 'zero-shot, prior-corrected (optimal transport to train prior)'}


def headline_table(metrics: dict) -> pd.DataFrame:
    """Zero-shot (raw, prior-corrected, prompt spread) beside the probe and the supervised bounds, one row each."""
    rows = []
    zs = metrics.get('zero_shot', {})
    p = zs.get('patient')
    if p:
        rows.append(_row('zero-shot (prompt ensemble)', 'none', p['balanced_accuracy']['value'],
                         p['roc_auc_macro_ovr']['value'], p['n'], fmt_ci(p['balanced_accuracy']),
                         fmt_ci(p['roc_auc_macro_ovr'])))
    for key, name in _PRIOR_NAMES.items():
        b = zs.get('prior_corrected', {}).get(key)
        if b:
            rows.append(_row(name, 'train class frequencies' if key == 'ot_train_prior' else 'none',
                             b['balanced_accuracy']['value'], b['roc_auc_macro_ovr']['value'], b['n'],
                             fmt_ci(b['balanced_accuracy']), fmt_ci(b['roc_auc_macro_ovr'])))
    ps = zs.get('prompt_subsets', {})
    if ps.get('n_subsets'):
        b, a = ps['balanced_accuracy'], ps['roc_auc_macro_ovr']
        rows.append({**_row(f'zero-shot, one random prompt per class (median of {ps["n_subsets"]} sets)', 'none',
                            b['median'], a['median']),
                     '95% CI': f'range {fmt(b["min"])}-{fmt(b["max"])}',
                     'ROC-AUC 95% CI': f'range {fmt(a["min"])}-{fmt(a["max"])}'})
    few = metrics.get('bounds', {}).get('few_shot_probe', {}).get('shots', {})
    for k, b in few.items():
        rows.append({**_row(f'{k}-shot linear probe (mean of {len(b["per_seed"])} draws)',
                            f'{k} train patients per class', b['balanced_accuracy']['mean'],
                            b['roc_auc_macro_ovr']['mean']),
                     '95% CI': f'sd {fmt(b["balanced_accuracy"]["sd"])}',
                     'ROC-AUC 95% CI': f'sd {fmt(b["roc_auc_macro_ovr"]["sd"])}'})
    lp = metrics.get('linear_probe', {})
    if 'test_balanced_accuracy' in lp:
        rows.append({**_row(f'linear probe, all train + val labels ({len(lp["per_seed"])} seeds)',
                            'train + val labels', lp['test_balanced_accuracy']['mean'],
                            lp['test_roc_auc_macro_ovr']['mean'], lp.get('n_test')),
                     '95% CI': f'sd {fmt(lp["test_balanced_accuracy"]["sd"])}',
                     'ROC-AUC 95% CI': f'sd {fmt(lp["test_roc_auc_macro_ovr"]["sd"])}'})
    mil = metrics.get('bounds', {}).get('supervised_mil', {})
    if 'balanced_accuracy' in mil:
        rows.append(_row('supervised gated-attention MIL on the trunk features', 'train labels (val for stopping)',
                         mil['balanced_accuracy']['value'], mil['roc_auc_macro_ovr']['value'], mil['n'],
                         fmt_ci(mil['balanced_accuracy']), fmt_ci(mil['roc_auc_macro_ovr'])))
    return pd.DataFrame(rows).set_index('method') if rows else pd.DataFrame()


def evaluated_patients(metrics: dict) -> str:
    """Who an evaluation scored, for titles and sentences: ``test patients`` or ``patients of the external cohort
    <name>``."""
    ext = metrics.get('external')
    if ext:
        return f"patients of the external cohort {ext.get('name') or ext.get('data_dir')}"
    return f"{metrics.get('split') or 'all'} patients"


def _interval(block: dict | None, n=None) -> tuple | None:
    return None if not block else (block.get('value'), fmt_ci(block), n)


def _spread(block: dict | None, n=None) -> tuple | None:
    return None if not block else (block.get('mean'), f'sd {fmt(block.get("sd"))}', n)


def _comparable_scores(metrics: dict) -> dict:
    """``(method, measure) -> (value, interval text, patients)`` of the methods an internal and an external
    evaluation share, in reading order; a method an evaluation skipped is absent."""
    out = {}
    zs = metrics.get('zero_shot', {})
    blocks = [('zero-shot (prompt ensemble)', zs.get('patient'))]
    blocks += [(name, zs.get('prior_corrected', {}).get(key)) for key, name in _PRIOR_NAMES.items()]
    for method, b in blocks:
        if b and b.get('n'):
            out[(method, 'balanced accuracy')] = _interval(b['balanced_accuracy'], b['n'])
            out[(method, 'ROC-AUC')] = _interval(b['roc_auc_macro_ovr'], b['n'])
    for k, b in metrics.get('bounds', {}).get('few_shot_probe', {}).get('shots', {}).items():
        method = f'{k}-shot linear probe (mean of {len(b["per_seed"])} draws)'
        # scored on every labelled evaluated patient, like the full probe
        out[(method, 'balanced accuracy')] = _spread(b['balanced_accuracy'], metrics.get('n_labelled_patients'))
        out[(method, 'ROC-AUC')] = _spread(b['roc_auc_macro_ovr'], metrics.get('n_labelled_patients'))
    lp = metrics.get('linear_probe', {})
    if 'test_balanced_accuracy' in lp:
        method = f'linear probe, all train + val labels ({len(lp["per_seed"])} seeds)'
        out[(method, 'balanced accuracy')] = _spread(lp['test_balanced_accuracy'], lp.get('n_test'))
        out[(method, 'ROC-AUC')] = _spread(lp['test_roc_auc_macro_ovr'], lp.get('n_test'))
    mil = metrics.get('bounds', {}).get('supervised_mil', {})
    if 'balanced_accuracy' in mil:
        method = 'supervised gated-attention MIL on the trunk features'
        out[(method, 'balanced accuracy')] = _interval(mil['balanced_accuracy'], mil['n'])
        out[(method, 'ROC-AUC')] = _interval(mil['roc_auc_macro_ovr'], mil['n'])
    r2p = metrics.get('retrieval', {}).get('report_to_patient')
    if r2p:
        for k in ('1', '10'):
            if k in r2p['recall']:
                out[('report -> its patient', f'R@{k}')] = _interval(r2p['recall'][k], r2p['n_items'])
    return out


def external_table(internal: dict, external: dict) -> pd.DataFrame:
    """The run's own test split and an external cohort side by side: one row per (method, measure) for zero-shot
    (raw and prior-corrected), the few-shot and full linear probes, the supervised MIL bound and report -> patient
    retrieval; per side the value (3 decimals), its 95% CI (or the sd over seeds of a probe) and the patients
    scored (for retrieval: the gallery, so R@k of two galleries of different size are not alike), and the
    difference external - internal. Both are ``metrics.json`` dictionaries (``evaluation.cached.evaluate_run``
    without and with ``data_dir``)."""
    if not external.get('external'):
        raise ValueError('external_table: the second metrics are not an external evaluation (no "external" key); '
                         'evaluate with evaluate_run(run, data_dir=...)')
    left, right = _comparable_scores(internal), _comparable_scores(external)
    sides = (f"internal {internal.get('split') or 'all'}", f"external: {external['external'].get('name')}")
    rows = []
    for key in list(left) + [k for k in right if k not in left]:
        row = {('', 'method'): key[0], ('', 'measure'): key[1]}
        values = []
        for side, scores in zip(sides, (left, right)):
            value, interval, n = scores.get(key) or (None, '', None)
            row.update({(side, 'value'): fmt(value), (side, '95% CI'): interval,
                        (side, 'patients'): '' if n is None else str(int(n))})
            values.append(value)
        diff = values[1] - values[0] if all(v is not None and np.isfinite(v) for v in values) else None
        row[('external - internal', '')] = fmt(diff) if diff is None else f'{diff:+.3f}'
        rows.append(row)
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows)
    table.columns = pd.MultiIndex.from_tuples(table.columns)
    return table.set_index([('', 'method'), ('', 'measure')]).rename_axis(['method', 'measure'])


def scale_table(metrics: dict) -> pd.DataFrame:
    """One row per scale bin: images, patients, image-level zero-shot and image->image retrieval."""
    rows = []
    for b in metrics.get('by_scale', {}).get('bins', []):
        z, r = b.get('zero_shot', {}), b.get('image_to_image', {})
        rows.append({'nm per pixel': b['bin'], 'images': b['n_images'], 'patients': b['n_patients'],
                     'zero-shot ROC-AUC (images)': fmt(z.get('roc_auc_macro_ovr')),
                     'zero-shot balanced accuracy (images)': fmt(z.get('balanced_accuracy')),
                     'image->image R@1': fmt(r.get('R@1')), 'image->image R@5': fmt(r.get('R@5'))})
    return pd.DataFrame(rows).set_index('nm per pixel') if rows else pd.DataFrame()


def conclusion(metrics: dict, html: bool = False, internal: dict | None = None) -> str:
    """One paragraph from the numbers (point estimates with their 95% CIs), for the top or bottom of a report. An
    external evaluation says so (and, given the ``internal`` test evaluation, how zero-shot compares with it)."""
    ext = metrics.get('external')
    who = evaluated_patients(metrics)
    zs = metrics.get('zero_shot', {}).get('patient')
    lab = metrics.get('labels', {})
    source = {'given': 'given diagnoses', 'labeler': 'diagnoses read from the reports by the labeler',
              'given+labeler': 'given and labeler-derived diagnoses'}.get(lab.get('source'), 'diagnoses')
    if not zs or not zs.get('n'):
        return f'No labelled {who.replace("patients", "patient", 1)} could be scored ({source}); see the retrieval ' \
               'results.'
    parts = ['External validation: the trained model applied unchanged to another cohort.'] if ext else []
    parts += [f'On {zs["n"]} labelled {who} ({source}), zero-shot diagnosis reached ROC-AUC '
             f'{fmt(zs["roc_auc_macro_ovr"]["value"])} {fmt_ci(zs["roc_auc_macro_ovr"])} and balanced accuracy '
             f'{fmt(zs["balanced_accuracy"]["value"])} {fmt_ci(zs["balanced_accuracy"])} '
             f'(chance {1 / max(len(metrics.get("classes", [])), 1):.2f}).']
    corr = metrics['zero_shot'].get('prior_corrected', {}).get('mean_logprob')
    if corr:
        gain = corr['balanced_accuracy']['value'] - zs['balanced_accuracy']['value']
        parts.append(f'Correcting the class prior without labels {"raises" if gain > 0 else "changes"} balanced '
                     f'accuracy to {fmt(corr["balanced_accuracy"]["value"])} {fmt_ci(corr["balanced_accuracy"])}'
                     + (', so part of the gap is predictions piling onto a few classes.' if gain > 0.02 else '.'))
    ps = metrics['zero_shot'].get('prompt_subsets', {})
    if ps.get('n_subsets'):
        b = ps['balanced_accuracy']
        parts.append(f'With a single random prompt per class it ranges {fmt(b["min"])}-{fmt(b["max"])} (median '
                     f'{fmt(b["median"])} over {ps["n_subsets"]} prompt sets).')
    lp = metrics.get('linear_probe', {}).get('test_balanced_accuracy')
    mil = metrics.get('bounds', {}).get('supervised_mil', {}).get('balanced_accuracy')
    sup = []
    if lp:
        sup.append(f'a linear probe on the same embeddings {fmt(lp["mean"])}')
    if mil:
        sup.append(f'a supervised attention-MIL model on the trunk features {fmt(mil["value"])} {fmt_ci(mil)}')
    if sup:
        parts.append(("With the run's own train labels, " if ext else 'With labels, ') + ' and '.join(sup) + '.')
    r2p = metrics.get('retrieval', {}).get('report_to_patient', {}).get('recall', {}).get('1')
    if r2p:
        parts.append(f'A report finds its own patient first in {fmt(r2p["value"])} {fmt_ci(r2p)} of queries '
                     f'(R@1 among {metrics.get("n_patients")} patients).')
    inside = (internal or {}).get('zero_shot', {}).get('patient')
    if ext and inside and inside.get('n'):
        here, there = zs['roc_auc_macro_ovr'], inside['roc_auc_macro_ovr']
        gap = '' if here['value'] is None or there['value'] is None else \
            f' ({here["value"] - there["value"]:+.3f} on the external cohort)'
        parts.append(f'On the internal {internal.get("split") or "test"} split ({inside["n"]} patients) zero-shot '
                     f'ROC-AUC was {fmt(there["value"])} {fmt_ci(there)}{gap}.')
    text = ' '.join(parts)
    return _html.escape(text) if html else text


def label_sentence(metrics: dict) -> str:
    """One sentence for a report: where the evaluated patients' diagnoses came from and who was left out."""
    lab = metrics.get("labels")
    if not lab:
        return "Diagnosis source not recorded (metrics.json written before schema version 2)."
    src = lab["sources"]
    parts = [f"{src[k]} {k}" for k in ("given", "labeler") if src[k]]
    text = f"**Diagnoses** of the {metrics['n_patients']} {evaluated_patients(metrics)}: " + (", ".join(parts)
                                                                                             or "none")
    if src["labeler"]:
        hedge = "hedged diagnoses counted" if lab.get("uncertain") == "positive" else "hedged diagnoses excluded"
        text += f" (from the {lab.get('labeler', 'report labeler')}; {hedge})"
    excluded = lab["n_no_diagnosis"] + lab["n_diagnosis_not_in_classes"]
    if excluded:
        text += (f". {excluded} patient(s) are excluded from zero-shot and the probe: {lab['n_no_diagnosis']} without "
                 f"a usable diagnosis, {lab['n_diagnosis_not_in_classes']} with a diagnosis outside the classes")
    return text + "."
