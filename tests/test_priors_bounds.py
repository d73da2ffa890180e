"""Prior-corrected zero-shot, prompt spread, results by scale, supervised bounds and clean reports: each property
checked on data where the broken version gives a different answer."""
from __future__ import annotations

import numpy as np
import pytest

from emclip.evaluation import Embeddings
from emclip.evaluation.bounds import few_shot_probe, supervised_mil
from emclip.evaluation.by_scale import attention_by_scale, by_scale, scale_bin
from emclip.evaluation.priors import mean_logprob_correction, ot_assignment, prompt_subsets, spread
from emclip.evaluation.zeroshot import PromptSet, softmax
from emclip.metrics import headline_metrics
from emclip.reports import report_problems, to_html


def _piled(n=300, k=4, bias=4.0, seed=0):
    """Logits that separate the classes well, plus a class-0 bias that pulls every arg-max to class 0."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), y] += 2.0
    logits[:, 0] += bias
    return y, logits


def test_prior_corrections_undo_a_class_bias_without_labels():
    y, logits = _piled()
    raw = headline_metrics(y, softmax(logits))['balanced_accuracy']
    fixed = headline_metrics(y, softmax(mean_logprob_correction(logits)))['balanced_accuracy']
    ot = headline_metrics(y, ot_assignment(logits))['balanced_accuracy']
    assert raw < 0.45 and fixed > raw + 0.25 and ot > raw + 0.25
    # a per-class constant added to the logits is exactly what OT removes, and nearly what the mean removes
    shifted = logits + np.array([5.0, -2.0, 0.0, 1.0])
    assert np.allclose(ot_assignment(shifted), ot_assignment(logits), atol=1e-6)
    again = headline_metrics(y, softmax(mean_logprob_correction(shifted)))['balanced_accuracy']
    assert abs(again - fixed) < 0.05


def test_ot_assignment_matches_the_target_prior():
    _, logits = _piled(n=200)
    for prior in (None, np.array([0.4, 0.3, 0.2, 0.1])):
        p = ot_assignment(logits, prior)
        assert np.allclose(p.sum(1), 1)
        target = np.full(4, 0.25) if prior is None else prior
        assert np.allclose(p.mean(0), target, atol=1e-4)
    with pytest.raises(ValueError, match="prior"):
        ot_assignment(logits, np.array([1.0, -1.0, 0, 0]))


def test_prompt_subsets_are_seeded_and_in_range():
    ps = PromptSet(['a', 'b'], {'a': ['a', 'alpha'], 'b': ['b']}, ['{}', 'image of {}', 'x {}'])
    s1, s2 = prompt_subsets(ps, 20, seed=3), prompt_subsets(ps, 20, seed=3)
    assert s1 == s2 and s1 != prompt_subsets(ps, 20, seed=4)
    assert all(0 <= i < 6 and 0 <= j < 3 for i, j in s1)
    assert spread([0.1, 0.5, 0.9, None, float('nan')]) == {'n': 3, 'median': 0.5, 'q25': 0.3, 'q75': 0.7,
                                                             'min': 0.1, 'max': 0.9}


def _emb(scales, owner, attention, n_patients, diagnosis):
    d = 4
    return Embeddings(patient_ids=[f'p{i}' for i in range(n_patients)], split=['test'] * n_patients,
                      diagnosis=diagnosis, patient=np.ones((n_patients, d)), report=np.ones((n_patients, d)),
                      image=np.ones((len(owner), d)), image_patient=owner, image_paths=[''] * len(owner),
                      image_scales=scales, image_attention=attention)


def test_attention_mass_lands_in_the_bin_the_aggregator_chose():
    # two patients of class 0: each has one 3 nm/px image and one 50 nm/px image; attention all on the fine one
    scales = np.array([3.0, 50.0, 3.0, 50.0])
    owner = np.array([0, 0, 1, 1])
    att = attention_by_scale(_emb(scales, owner, np.array([1.0, 0.0, 0.9, 0.1]), 2, ['a', 'a']),
                             np.array([0, 0]), ['a', 'b'])
    assert att['bins'] == ['2-4', '32-64'] and not att['uniform']
    assert att['mass'][0] == pytest.approx([0.95, 0.05]) and np.isnan(att['mass'][1]).all()
    even = attention_by_scale(_emb(scales, owner, np.full(4, 0.5), 2, ['a', 'a']), np.array([0, 0]), ['a'])
    assert even['uniform'] and even['mass'][0] == pytest.approx([0.5, 0.5])


def test_results_by_scale_score_each_bin_on_its_own_images():
    rng = np.random.default_rng(0)
    n_pat, per = 40, 6
    owner = np.repeat(np.arange(n_pat), per)
    scales = np.tile([3.0, 3.0, 3.0, 60.0, 60.0, 60.0], n_pat)
    y = np.arange(n_pat) % 2
    probs = np.full((len(owner), 2), 0.5)
    fine = scales < 10
    probs[fine, :] = np.eye(2)[y[owner[fine]]] * 0.8 + 0.1          # fine images: right
    probs[~fine, :] = rng.dirichlet([1, 1], (~fine).sum())           # coarse images: noise
    emb = _emb(scales, owner, np.full(len(owner), np.nan), n_pat, ['a' if v == 0 else 'b' for v in y])
    out = by_scale(emb, y, probs, None)
    rows = {b['bin']: b for b in out['bins']}
    assert set(rows) == {'2-4', '32-64'} and rows['2-4']['n_images'] == n_pat * 3
    assert rows['2-4']['zero_shot']['balanced_accuracy'] == 1.0
    assert rows['32-64']['zero_shot']['balanced_accuracy'] < 0.8
    assert list(scale_bin(np.array([0.5, 1.0, 255.0, 256.0]))) == [-1, 0, 7, -1]


def test_supervised_mil_learns_a_scale_dependent_label_and_few_shot_reports_each_k():
    """The label is which feature value appears at the fine scale: a bag-level MIL with the scale input learns it;
    the same data with the scale input shuffled does not."""
    rng = np.random.default_rng(1)
    n, k, f = 160, 6, 8
    y = np.arange(n) % 2
    bags, scales = [], []
    for i in range(n):
        s = rng.choice([3.0, 60.0], k)
        x = rng.normal(0, 1, (k, f))
        fine = s < 10
        x[fine, 0] += np.where(y[i] == 1, 2.5, -2.5)           # the signal sits only on fine-scale images
        x[~fine, 0] += rng.choice([-2.5, 2.5], (~fine).sum())  # coarse images carry both values: a decoy
        bags.append(x)
        scales.append(s)
    split = np.array(['train'] * 100 + ['val'] * 20 + ['test'] * 40)
    res = supervised_mil(bags, scales, y, split, 2, np.arange(n), seeds=(0,), epochs=40)
    acc = (np.argmax(res['test_probs'], 1) == y[split == 'test']).mean()
    assert acc >= 0.85, acc
    fs = few_shot_probe(rng.normal(size=(60, 4)), y[:60],
                        rng.normal(size=(20, 4)), y[:20], 2, shots=(1, 4))
    assert set(fs['shots']) == {'1', '4'} and fs['shots']['1']['per_seed'][0]['n_train'] == 2


def test_report_problems_find_what_a_reader_must_not_see(tmp_path):
    assert report_problems('<p>all good: 0.91 [0.85, 0.95]</p>') == []
    bad = {'kernel log line': '[IPKernelApp] WARNING | Kernel is running over TCP',
           'Python warning': 'UserWarning: y_pred contains classes not in y_true',
           'traceback': 'Traceback (most recent call last):',
           'network script': '<script src="https://cdnjs.cloudflare.com/mathjax.js"></script>'}
    for kind, text in bad.items():
        assert [p.split(':')[0] for p in report_problems(f'<p>{text}</p>')] == [kind]
    import nbformat
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('secret_code = 1', outputs=[
        nbformat.v4.new_output('stream', name='stdout', text='visible result\n')])]
    path = tmp_path / 'n.ipynb'
    nbformat.write(nb, path)
    text = to_html(path).read_text()
    assert 'visible result' in text and 'secret_code' not in text and report_problems(text) == []
    assert 'secret_code' in to_html(path, show_code=True).read_text()
