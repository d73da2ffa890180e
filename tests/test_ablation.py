"""Ablation grid and paired statistics, on hand-made evaluation outputs (no training)."""
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score

from emclip import ablation
from emclip.ablation import Arm

CLASSES = ['normal', 'thin basement membrane nephropathy', 'amyloidosis']
PAIR = ('thin basement membrane nephropathy', 'normal')


def _fake_run(root, arm, y, probs):
    """A run directory with the two files the ablation tables read: eval/predictions.csv and eval/metrics.json."""
    run = root / arm.name
    (run / 'eval').mkdir(parents=True)
    table = pd.DataFrame({'patient_id': [f'P{i:03d}' for i in range(len(y))], 'diagnosis': [CLASSES[i] for i in y]})
    table['patient_pred'] = [CLASSES[i] for i in probs.argmax(1)]
    for c, name in enumerate(CLASSES):
        table[f'patient_p[{name}]'] = probs[:, c]
    table.to_csv(run / 'eval' / 'predictions.csv', index=False)
    ci = {'value': 0.5, 'ci_low': 0.4, 'ci_high': 0.6}
    metrics = {'classes': CLASSES, 'zero_shot': {
        'patient': {'roc_auc_macro_ovr': ci, 'balanced_accuracy': ci},
        'pairs': {'thin basement membrane nephropathy vs normal': {'a': PAIR[0], 'b': PAIR[1], 'accuracy': ci,
                                                                   'roc_auc': ci}},
        'image_topj': {}},
        'retrieval': {'report_to_patient': {'recall': {'1': ci, '5': ci}}}, 'linear_probe': {}}
    (run / 'eval' / 'metrics.json').write_text(json.dumps(metrics))
    return run


def _probs(pred, rng, n_classes=3):
    p = rng.random((len(pred), n_classes)) * 0.5
    p[np.arange(len(pred)), pred] += 1
    return p / p.sum(1, keepdims=True)


def test_grid_expands_and_refuses_unknown_keys():
    arms = ablation.grid({'scale_mode': ['add', 'film'], 'aggregator': ['mean', 'gated_attention'],
                          'scale_embed': [True, False], 'seeds': [0, 1], 'scale_attention': [False, True]})
    # attention conditioning only exists for gated attention: 2 modes x (mean + gated + gated+attn) x 2 x 2
    assert len(arms) == 2 * 3 * 2 * 2 and len({a.name for a in arms}) == len(arms)
    assert all(a.aggregator == 'gated_attention' for a in arms if a.scale_attention)
    assert Arm('film', 'mean', True, 1).partner() == Arm('film', 'mean', False, 1)
    assert ablation.grid({}, {'scale_mode': 'mlp', 'aggregator': 'mean', 'seed': 3}) == [
        Arm('mlp', 'mean', True, 3)]
    with pytest.raises(ValueError, match='unknown ablation key'):
        ablation.grid({'seed': [0]})


def seeded_runs(root, rng, n, right=(0.9, 0.5)):
    """film-mean aware and blind runs for seeds 0 and 1 on n patients: each arm predicts the truth with probability
    right[0] (aware) or right[1] (blind), else a random class."""
    y = rng.integers(0, 3, n)
    runs = {}
    for seed in (0, 1):
        preds = [np.where(rng.random(n) < p, y, rng.integers(0, 3, n)) for p in right]
        for aware, pred in zip((True, False), preds):
            arm = Arm('film', 'mean', aware, seed)
            runs[arm] = _fake_run(root, arm, y, _probs(pred, rng))
    return runs


def test_paired_differences_per_seed_and_pooled(tmp_path):
    runs = seeded_runs(tmp_path, np.random.default_rng(0), 120)
    d = ablation.paired_differences(runs, n_boot=200)
    assert set(d.metric) == {'zero-shot bal. acc.', 'thin/normal acc.'}
    assert set(d.seed) == {'s0', 's1', 'pooled'}
    bal = d[d.metric == 'zero-shot bal. acc.'].set_index('seed')
    for seed in (0, 1):
        frames = {a.scale_embed: pd.read_csv(r / 'eval' / 'predictions.csv') for a, r in runs.items() if a.seed == seed}
        expect = {k: balanced_accuracy_score(f.diagnosis, f.patient_pred) for k, f in frames.items()}
        assert bal.loc[f's{seed}', 'aware'] == pytest.approx(expect[True])
        assert bal.loc[f's{seed}', 'aware − blind'] == pytest.approx(expect[True] - expect[False])
    assert bal.loc['pooled', 'aware − blind'] == pytest.approx(bal.loc[['s0', 's1'], 'aware − blind'].mean())
    assert bal.loc['pooled', 'ci_low'] > 0 and bal.loc['pooled', 'p(diff ≤ 0)'] == 0
    # within-pair accuracy: the true class of the pair scores above the other one, other classes ignored
    pair = d[(d.metric == 'thin/normal acc.') & (d.seed == 's0')].iloc[0]
    f = pd.read_csv(runs[Arm('film', 'mean', True, 0)] / 'eval' / 'predictions.csv')
    f = f[f.diagnosis.isin(PAIR)]
    other = {PAIR[0]: PAIR[1], PAIR[1]: PAIR[0]}
    correct = [f.loc[i, f'patient_p[{dx}]'] > f.loc[i, f'patient_p[{other[dx]}]'] for i, dx in f.diagnosis.items()]
    assert pair['aware'] == pytest.approx(np.mean(correct)) and pair['patients'] == 120


def test_identical_arms_differ_by_zero(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 50)
    probs = _probs(rng.integers(0, 3, 50), rng)
    runs = {a: _fake_run(tmp_path, a, y, probs) for a in (Arm('add', 'mean', True), Arm('add', 'mean', False))}
    d = ablation.paired_differences(runs, n_boot=50)
    assert (d['aware − blind'] == 0).all() and (d.ci_low == 0).all() and (d.ci_high == 0).all()
    table = ablation.run_table(runs)
    assert list(table.scale) == ['aware', 'blind'] and 'thin/normal acc.' in table
    assert ablation.seed_summary(table).loc[('add', 'mean', 'aware'), 'seeds'] == 1


def test_pair_confusion_cost_counts_twin_to_partner_errors_only(tmp_path):
    # 6 patients, 2 per class; one 'thin' patient called 'normal' (a pair confusion), one 'amyloidosis' called
    # 'normal' (not a pair confusion: amyloidosis is not in this cohort's pair)
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 0, 2])
    probs = np.eye(3)[pred] * 0.9 + 0.05
    runs = {a: _fake_run(tmp_path, a, y, probs) for a in (Arm('add', 'mean', True), Arm('add', 'mean', False))}
    cost = ablation.pair_confusion_cost(runs)
    assert cost.loc[('add', 'mean', 'aware'), 'mean'] == pytest.approx((1 / 2) / 3)


def _trained_as(run, arm):
    """The config.json training writes: the arm's fields among the run's other settings."""
    from emclip.train.config import TrainConfig
    (run / 'config.json').write_text(json.dumps(TrainConfig(**arm.overrides()).to_dict()))
    return run


def test_a_runs_arm_comes_from_its_recorded_config_not_its_folder_name(tmp_path):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 30)
    aware = Arm('film', 'gated_attention', True, 2, True)
    folders = {}
    for arm, folder in ((aware, 'renamed-mlp-mean-blind-s0'), (aware.partner(), 'x-y-z')):
        run = _fake_run(tmp_path, arm, y, _probs(rng.integers(0, 3, 30), rng))
        folders[arm] = _trained_as(run.rename(tmp_path / folder), arm)   # the folder names mislead
    assert ablation.arm_of(folders[aware]) == aware
    runs = ablation.runs_by_arm(folders.values())
    assert runs == folders
    table = ablation.run_table(runs)
    row = table.loc[aware.name]
    assert (row['variant'], row['mode'], row['aggregator'], row['scale'], row['seed']) == (
        'film+attn-gated_attention', 'film+attn', 'gated_attention', 'aware', 2)
    diffs = ablation.paired_differences(runs, n_boot=20)
    assert set(diffs.variant) == {aware.variant} and set(diffs.seed) == {'s2', 'pooled'}
    import matplotlib
    matplotlib.use('Agg')
    fig = ablation.ablation_figure(table, diffs, aware.variant)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [aware.variant]
    assert [a.get_title().split('\n')[0] for a in fig.axes[:-1]] == ['zero-shot bal. acc.', 'thin/normal acc.']


def test_two_runs_of_one_arm_are_refused(tmp_path):
    arm = Arm('add', 'mean', True, 0)
    for name in ('a', 'b'):
        (tmp_path / name).mkdir()
        _trained_as(tmp_path / name, arm)
    with pytest.raises(ValueError, match='both trained as arm add-mean-aware-s0'):
        ablation.runs_by_arm([tmp_path / 'a', tmp_path / 'b'])
