"""emclip.evaluation: prompts, zero-shot pooling, retrieval, linear probe, Embeddings I/O, evaluate() end to end."""
import json
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from emclip.evaluation import (
    Embeddings, PromptSet, class_embeddings, compare_runs, embed_cohort, evaluate, image_image_retrieval, linear_probe,
    load_prompts, prompts_from_diagnoses, report_image_retrieval, topj_pool)
from emclip.evaluation.figures import read_image_for_display

RENAL = ['normal', 'thin basement membrane nephropathy', 'diabetic nephropathy', 'Alport syndrome',
         'minimal change disease', 'membranous nephropathy', 'IgA nephropathy', 'lupus nephritis', 'amyloidosis',
         'fibrillary glomerulonephritis']


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class FakeTextEncoder:
    """Maps every prompt of a class to that class's prototype plus a little per-text noise."""

    def __init__(self, prompts: PromptSet, prototypes: np.ndarray):
        self.lookup = {t: c for c, name in enumerate(prompts.classes) for t in prompts.texts(name)}
        self.prototypes = prototypes

    def __call__(self, texts):
        rows = []
        for t in texts:
            rng = np.random.default_rng(zlib.crc32(t.encode()))  # hash() is salted per process
            base = self.prototypes[self.lookup[t]] if t in self.lookup else np.zeros(self.prototypes.shape[1])
            rows.append(base + 0.05 * rng.normal(size=self.prototypes.shape[1]))
        return torch.from_numpy(_unit(np.array(rows))).float()


def synthetic_embeddings(n_per_split=(60, 30, 60), classes=RENAL[:4], dim=24, seed=0, noise=0.6):
    """Patients with class prototypes + noise; reports near their patient; 1-6 images per patient."""
    rng = np.random.default_rng(seed)
    protos = _unit(rng.normal(size=(len(classes), dim)))
    split = np.repeat(['train', 'val', 'test'], n_per_split)
    y = rng.integers(0, len(classes), size=len(split))
    patient = _unit(protos[y] + noise * rng.normal(size=(len(y), dim)) / np.sqrt(dim) * 3)
    report = _unit(patient + 0.3 * rng.normal(size=patient.shape) / np.sqrt(dim) * 3)
    counts = rng.integers(1, 7, size=len(y))
    owner = np.repeat(np.arange(len(y)), counts)
    image = _unit(protos[y[owner]] + 1.0 * rng.normal(size=(len(owner), dim)) / np.sqrt(dim) * 3)
    attention = rng.dirichlet(np.ones(len(owner)))
    dx = np.array([classes[i] for i in y], dtype=object)
    dx[5] = None  # an unlabelled patient
    emb = Embeddings(
        patient_ids=[f'P{i:04d}' for i in range(len(y))], split=split, diagnosis=dx, patient=patient, report=report,
        image=image, image_patient=owner, image_paths=[f'missing/img_{i}.tif' for i in range(len(owner))],
        image_scales=rng.uniform(2, 100, size=len(owner)), image_attention=attention, logit_scale=50.0,
        meta={'model': 'synthetic'})
    return emb, protos


# ------------------------------------------------------------------------------------------------ prompts
def test_bundled_prompts_cover_the_cohort_diagnoses():
    p = load_prompts('renal_em')
    assert p.classes == RENAL
    assert all(len(p.synonyms[c]) >= 2 for c in p.classes) and len(p.templates) >= 2
    assert 'electron micrograph of amyloidosis' in p.texts('amyloidosis')


def test_prompts_from_cohort_values():
    p = prompts_from_diagnoses(['b disease', None, 'a disease', '', 'b disease'])
    assert p.classes == ['a disease', 'b disease'] and p.synonyms['a disease'] == ['a disease']
    assert p.texts('a disease')[0] == 'a disease'
    curated = prompts_from_diagnoses(['amyloidosis', 'new thing'], known=load_prompts())
    assert len(curated.synonyms['amyloidosis']) > 1 and curated.synonyms['new thing'] == ['new thing']
    with pytest.raises(ValueError, match='exactly one'):
        PromptSet(['a'], {}, ['no placeholder'])


def test_class_embedding_is_renormalised_mean():
    prompts = PromptSet(['x', 'y'], {'x': ['x1', 'x2']}, ['{}', 'photo of {}'])
    enc = FakeTextEncoder(prompts, _unit(np.eye(2, 8)))
    emb = class_embeddings(enc, prompts, batch_size=3)
    expected = _unit(enc(prompts.texts('x')).numpy().mean(0))
    np.testing.assert_allclose(emb[0], expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-6)


def test_topj_pool_matches_loop():
    rng = np.random.default_rng(0)
    owner = rng.integers(0, 6, size=40)
    owner[owner == 4] = 5  # patient 4 has no images
    scores = rng.normal(size=(40, 3))
    for j in (1, 3, 100):
        pooled = topj_pool(scores, owner, 6, j)
        for p in range(6):
            s = scores[owner == p]
            expected = np.sort(s, axis=0)[::-1][:j].mean(0) if len(s) else np.full(3, np.nan)
            np.testing.assert_allclose(pooled[p], expected)


# ---------------------------------------------------------------------------------------------- retrieval
def test_image_retrieval_ignores_own_patient():
    emb, _ = synthetic_embeddings(n_per_split=(0, 0, 12))
    emb = emb.subset('test')
    # make every image identical to the others of its patient: same-patient neighbours would be perfect hits
    emb.image = emb.patient[emb.image_patient].copy()
    emb.diagnosis[:] = np.where(np.arange(emb.n_patients) % 2, 'a', 'b')
    res = image_image_retrieval(emb, chunk_size=5)
    assert len(res.ranks) == emb.n_images
    single = np.bincount(emb.image_patient)[emb.image_patient] == emb.n_images  # (never true here)
    assert not single.any()
    rep = report_image_retrieval(emb, chunk_size=4)
    assert np.isfinite(rep.ranks).all() and rep.ranks.min() >= 1
    # a unique diagnosis has no positive among other patients -> rank inf, counted as a miss
    emb.diagnosis[0] = 'unique'
    res = image_image_retrieval(emb)
    assert np.isinf(res.ranks[res.query_patient == 0]).all()


# ------------------------------------------------------------------------------------------------ probe
def _probe_data(seed, shuffle=False):
    rng = np.random.default_rng(seed)
    n, dim = (120, 40, 200), 16
    means = rng.normal(size=(3, dim)) * 1.5
    xs, ys = [], []
    for k in n:
        y = rng.integers(0, 3, size=k)
        xs.append(means[y] + rng.normal(size=(k, dim)))
        ys.append(rng.permutation(y) if shuffle else y)
    return [a for pair in zip(xs, ys) for a in pair]


def test_linear_probe_recovers_signal():
    r = linear_probe(*_probe_data(0), n_classes=3, cs=(0.01, 0.1, 1.0, 10.0))
    assert r['test_roc_auc_macro_ovr']['mean'] > 0.95 and r['test_balanced_accuracy']['mean'] > 0.8
    assert len(r['per_seed']) == 5 and r['refit'] == 'train+val'


def test_linear_probe_never_sees_the_test_labels():
    """Split hygiene: the probe's choice of C, its validation scores and its fitted model depend on train and
    validation only. Relabelling the test patients changes the test scores and nothing else."""
    x_tr, y_tr, x_va, y_va, x_te, y_te = _probe_data(1)
    cs = (0.01, 0.1, 1.0, 10.0)
    honest = linear_probe(x_tr, y_tr, x_va, y_va, x_te, y_te, n_classes=3, cs=cs, seeds=(0, 1))
    relabelled = linear_probe(x_tr, y_tr, x_va, y_va, x_te, np.random.default_rng(5).permutation(y_te),
                              n_classes=3, cs=cs, seeds=(0, 1))
    for a, b in zip(honest['per_seed'], relabelled['per_seed']):
        assert {k: v for k, v in a.items() if not k.startswith('test_')} == \
            {k: v for k, v in b.items() if not k.startswith('test_')}
    assert honest['n_train'] + honest['n_val'] == len(y_tr) + len(y_va) and honest['n_test'] == len(y_te)
    assert honest['test_roc_auc_macro_ovr']['mean'] > 0.9 > relabelled['test_roc_auc_macro_ovr']['mean']


def test_linear_probe_selection_survives_saturated_auc():
    # unit-norm, well separated, imbalanced classes: validation AUC is 1.0 for every C, but at C=1e-3 the
    # unpenalised intercept wins and every patient gets the majority class; selecting on AUC would keep that model
    rng = np.random.default_rng(0)
    protos = _unit(rng.normal(size=(4, 32)))

    def draw(n):
        y = rng.choice(4, size=n, p=[0.4, 0.3, 0.2, 0.1])
        return _unit(protos[y] + 0.05 * rng.normal(size=(n, 32))), y

    r = linear_probe(*draw(150), *draw(50), *draw(200), n_classes=4, cs=(1e-3, 1e-2, 1e-1, 1.0), seeds=(0,))
    assert r['per_seed'][0]['val_roc_auc_macro_ovr'] == 1.0 and r['per_seed'][0]['C'] >= 0.1
    assert r['test_balanced_accuracy']['mean'] > 0.95


def test_linear_probe_chance_on_shuffled_labels():
    r = linear_probe(*_probe_data(1, shuffle=True), n_classes=3, cs=(0.01, 0.1, 1.0), seeds=(0, 1))
    assert abs(r['test_roc_auc_macro_ovr']['mean'] - 0.5) < 0.1
    assert 'skipped' in linear_probe(*_probe_data(2)[:2], np.zeros((0, 16)), np.zeros(0), *_probe_data(2)[4:],
                                     n_classes=3)


# -------------------------------------------------------------------------------------- embeddings I/O
def test_embeddings_roundtrip_and_subset(tmp_path):
    emb, _ = synthetic_embeddings()
    path = emb.save(tmp_path / 'emb.npz')
    back = Embeddings.load(path)  # load uses allow_pickle=False
    for name in ('patient_ids', 'split', 'diagnosis', 'patient', 'image', 'image_patient', 'image_paths'):
        np.testing.assert_array_equal(getattr(back, name), getattr(emb, name))
    assert back.logit_scale == 50.0 and back.meta == {'model': 'synthetic'} and back.diagnosis[5] == ''
    test = back.subset('test')
    assert set(test.split) == {'test'} and test.n_images == int(np.isin(emb.image_patient, np.flatnonzero(
        emb.split == 'test')).sum())
    np.testing.assert_array_equal(test.patient[test.image_patient[:3]], emb.patient[emb.split == 'test'][
        test.image_patient[:3]])


class FakeModel(torch.nn.Module):
    """Follows the model API: encode_bags(scales, mask, features=...) and encode_text(list[str])."""

    def __init__(self, dim=8):
        super().__init__()
        self.proj = torch.nn.Linear(4, dim)
        self.logit_scale = torch.nn.Parameter(torch.tensor(np.log(20.0)))

    def encode_bags(self, scales, mask, images=None, features=None):
        assert not self.training and not torch.is_grad_enabled()
        inst = torch.nn.functional.normalize(self.proj(features), dim=-1) * mask[..., None]
        att = torch.softmax(inst.sum(-1).masked_fill(~mask, float('-inf')), dim=1)
        patient = torch.nn.functional.normalize((att[..., None] * inst).sum(1), dim=-1)
        return SimpleNamespace(patient=patient, instances=inst, attention=att)

    def encode_text(self, texts):
        return torch.nn.functional.normalize(torch.stack([self.proj.weight[:, len(t) % 4] for t in texts]), dim=-1)


def test_embed_cohort_follows_batch_contract():
    model = FakeModel().train()
    batches = []
    for start in (0, 2):
        mask = torch.tensor([[True, True, False], [True, False, False]])
        batches.append({'features': torch.randn(2, 3, 4), 'scales': torch.rand(2, 3) * 50, 'mask': mask,
                        'reports': ['r a', 'r bb'], 'patient_ids': [f'p{start}', f'p{start + 1}'],
                        'diagnoses': ['a', None],
                        # real images only, or one entry per slot with padding (second batch): both accepted
                        'image_paths': [['x.tif', 'y.tif'], ['z.png']] if start == 0 else
                        [['x.tif', 'y.tif', ''], ['z.png', '', '']]})
    emb = embed_cohort(model, batches, split={'p0': 'train', 'p1': 'train', 'p2': 'test', 'p3': 'test'})
    assert model.training  # mode restored
    assert emb.n_patients == 4 and emb.n_images == 6 and list(emb.image_patient) == [0, 0, 1, 2, 2, 3]
    assert list(emb.split) == ['train', 'train', 'test', 'test'] and list(emb.diagnosis) == ['a', '', 'a', '']
    assert emb.logit_scale == pytest.approx(20.0) and list(emb.image_paths) == ['x.tif', 'y.tif', 'z.png'] * 2
    np.testing.assert_allclose(np.linalg.norm(emb.image, axis=1), 1, atol=1e-5)
    assert np.allclose(np.bincount(emb.image_patient, weights=emb.image_attention), 1)


def test_read_image_for_display_16bit(tmp_path):
    arr = (np.arange(64 * 80, dtype=np.uint16).reshape(64, 80) * 13)
    tifffile.imwrite(tmp_path / 'a.tif', arr)
    img = read_image_for_display(tmp_path / 'a.tif', max_size=40)
    assert img.shape == (32, 40) and img.min() == 0 and img.max() == 1
    Image.fromarray(np.full((10, 10, 3), 7, np.uint8)).save(tmp_path / 'b.png')
    assert read_image_for_display(tmp_path / 'b.png').max() == 0  # constant image -> zeros, no division by zero


# ------------------------------------------------------------------------------------------- end to end
def _check_ci(block):
    assert set(block) >= {'value', 'ci_low', 'ci_high'}
    if block['value'] is not None and block['ci_low'] is not None:
        assert block['ci_low'] <= block['ci_high']


def check_metrics_schema(m: dict):
    """The contract of docs/metrics_schema.md (schema_version 3)."""
    assert m['schema_version'] == 3
    for key in ('emclip_version', 'created', 'split', 'n_patients', 'n_images', 'n_labelled_patients', 'classes',
                'labels', 'prompts', 'by_scale', 'attention_by_scale', 'bounds', 'logit_scale', 'ties', 'bootstrap', 'meta', 'zero_shot', 'retrieval', 'linear_probe',
                'comparisons', 'figures', 'headline'):
        assert key in m, key
    assert set(m['bootstrap']) >= {'n_boot', 'seed', 'alpha', 'method', 'unit'}
    pc = m['zero_shot']['prior_corrected']
    assert {'mean_logprob', 'ot_uniform', 'definitions'} <= set(pc)
    for key in ('mean_logprob', 'ot_uniform'):
        for k in ('roc_auc_macro_ovr', 'balanced_accuracy'):
            _check_ci(pc[key][k])
    ps = m['zero_shot']['prompt_subsets']
    assert ps['n_subsets'] == 0 or ps['balanced_accuracy']['min'] <= ps['balanced_accuracy']['median'] \
        <= ps['balanced_accuracy']['max']
    assert sum(b['n_images'] for b in m['by_scale']['bins']) <= m['n_images']
    att = m['attention_by_scale']
    assert len(att['mass']) == len(m['classes']) and all(len(r) == len(att['bins']) for r in att['mass'])
    lab = m['labels']
    assert set(lab['sources']) == {'given', 'labeler', 'none'} and sum(lab['sources'].values()) == m['n_patients']
    assert lab['source'] in ('given', 'labeler', 'given+labeler', 'none')
    blocks = [m['zero_shot']['patient']] + list(m['zero_shot']['image_topj'].values())
    for b in blocks:
        for k in ('roc_auc_macro_ovr', 'balanced_accuracy', 'f1_weighted', 'f1_macro', 'accuracy'):
            _check_ci(b[k])
        assert set(b['roc_auc_per_class']) == set(m['classes'])
        assert b['confusion_matrix']['labels'] == m['classes']
        assert np.asarray(b['confusion_matrix']['matrix']).sum() == b['n']
        assert set(b['n_excluded']) == {'no_diagnosis', 'diagnosis_not_in_classes', 'no_images'}
        assert isinstance(b['classes_absent'], list) and isinstance(b['auc_undefined'], list)
    for task in ('report_to_patient', 'patient_to_report', 'report_to_image', 'image_to_image'):
        r = m['retrieval'][task]
        assert set(r) >= {'definition', 'n_queries', 'n_queries_total', 'n_items', 'n_queries_without_positive',
                          'recall', 'median_rank'}
        for block in r['recall'].values():
            _check_ci(block)
    lp = m['linear_probe']
    assert 'skipped' in lp or (set(lp['test_roc_auc_macro_ovr']) == {'mean', 'sd'} and len(lp['per_seed']) >= 1)
    for c in m['comparisons']:
        assert set(c) >= {'a', 'b', 'metric', 'difference', 'ci_low', 'ci_high', 'p_le_0'}
    assert all(isinstance(v, (int, float)) or v is None for v in m['headline'].values())


def test_evaluate_end_to_end(tmp_path):
    emb, protos = synthetic_embeddings()
    # real files for two images of one test patient: a 16-bit TIFF and an 8-bit PNG, given relative to image_root
    test_rows = np.flatnonzero(emb.split == 'test')
    imgs = np.flatnonzero(np.isin(emb.image_patient, test_rows))
    tifffile.imwrite(tmp_path / 'a.tif', (np.random.default_rng(0).random((300, 300)) * 60000).astype(np.uint16))
    Image.fromarray((np.random.default_rng(1).random((64, 64)) * 255).astype(np.uint8)).save(tmp_path / 'b.png')
    emb.image_paths[imgs[0]], emb.image_paths[imgs[1]] = 'a.tif', 'b.png'
    classes = prompts_from_diagnoses(RENAL[:4] + ['never seen'])  # one class absent from the cohort
    by_name = dict(zip(RENAL[:4], protos), **{'never seen': _unit(np.ones(protos.shape[1]))})
    enc = FakeTextEncoder(classes, np.stack([by_name[c] for c in classes.classes]))
    out = tmp_path / 'run'
    m = evaluate(emb, enc, torch.tensor(np.log(50.0)), out, classes=classes, n_boot=60, topj=(1, 3),
                 probe_cs=(0.1, 1.0, 10.0), probe_seeds=(0, 1, 2), image_root=tmp_path, name='synthetic')
    on_disk = json.loads((out / 'metrics.json').read_text())
    assert on_disk == m
    check_metrics_schema(on_disk)
    assert m['logit_scale'] == pytest.approx(50.0) and m['split'] == 'test' and m['n_patients'] == 60
    zs = m['zero_shot']['patient']
    assert zs['classes_absent'] == ['never seen'] and zs['roc_auc_per_class']['never seen'] is None
    assert zs['roc_auc_macro_ovr']['value'] > 0.8 and zs['n_excluded']['no_diagnosis'] == 0  # unlabelled is train
    assert m['retrieval']['report_to_patient']['recall']['50']['value'] > m['retrieval']['report_to_patient'][
        'recall']['1']['value'] > 0.1
    assert m['linear_probe']['test_roc_auc_macro_ovr']['mean'] > 0.8 and m['linear_probe']['refit'] == 'train+val'
    assert {c['b'] for c in m['comparisons']} == {'zero_shot.image_topj.1', 'zero_shot.image_topj.3'}
    pair = m['zero_shot']['pairs']['thin basement membrane nephropathy vs normal']
    assert set(m['zero_shot']['pairs']) == {'thin basement membrane nephropathy vs normal'}
    assert pair['n'] == pair['n_a'] + pair['n_b'] == sum(e in RENAL[:2] for e in emb.diagnosis[emb.split == 'test'])
    for k in ('accuracy', 'balanced_accuracy', 'roc_auc'):
        _check_ci(pair[k])
    for f in ('roc.png', 'confusion_matrix.png', 'recall_at_k.png', 'attention.png'):
        assert (out / f).stat().st_size > 5000 and m['figures'][f.rsplit('.', 1)[0]] == f
    assert (out / 'predictions.csv').is_file()

    # paired comparison of two runs on the same patients: a run against itself differs by exactly zero
    cmp = compare_runs(out, out, n_boot=30)
    assert cmp['difference'] == 0 and cmp['n'] == 60 and cmp['p_le_0'] == 1.0
    assert compare_runs(out, out, key='top3', n_boot=10)['value_a'] == pytest.approx(
        m['zero_shot']['image_topj']['3']['roc_auc_macro_ovr']['value'])

    # without a text encoder, from the .npz, on the validation split: zero-shot and probe are skipped, not fatal
    path = emb.save(tmp_path / 'emb.npz')
    m2 = evaluate(path, None, None, tmp_path / 'run2', split='val', n_boot=20, figures=False)
    assert 'skipped' in m2['zero_shot'] and 'skipped' in m2['linear_probe']
    assert m2['retrieval']['image_to_image']['n_queries'] > 0
    with pytest.raises(ValueError, match='no patients in split'):
        evaluate(emb, None, None, tmp_path / 'run3', split='holdout')


def test_within_pair_metrics_by_hand():
    from emclip.evaluation.pairs import generator_pairs, paired_pair_difference, pair_metrics, pairs_in
    classes = ['a', 'b', 'c']
    y = np.array([0, 0, 1, 1, 2])
    probs = np.array([[.5, .3, .2], [.2, .3, .5], [.1, .6, .3], [.4, .3, .3], [.3, .3, .4]])
    # within the pair only a and b count: patient 1's argmax c is irrelevant, it is wrong because b > a
    m = pair_metrics(y, probs, classes, [('a', 'b')], n_boot=50)['a vs b']
    assert (m['n'], m['n_a'], m['n_b']) == (4, 2, 2)
    assert m['accuracy']['value'] == 0.5 and m['balanced_accuracy']['value'] == 0.5
    assert m['roc_auc']['value'] == pytest.approx(0.75)   # a-scores 0.51, -0.41 vs b-scores -1.79, 0.29: 3 of 4
    better = probs.copy()
    better[1], better[3] = [.4, .1, .5], [.1, .6, .3]
    d = paired_pair_difference(y, better, probs, classes, ('a', 'b'), n_boot=50)
    assert d['value_a'] == 1.0 and d['difference'] == 0.5
    assert paired_pair_difference(y, probs, probs, classes, ('a', 'b'), n_boot=20)['difference'] == 0
    # pairs come from the generator's disease specification, kept only when both classes are evaluated
    assert ('thin basement membrane nephropathy', 'normal') in generator_pairs()
    assert pairs_in(RENAL[:4]) == [('thin basement membrane nephropathy', 'normal')]
    assert pairs_in(['normal', 'x']) == []


def test_pair_table_rounds_and_tolerates_undefined_values():
    from emclip.summary import pair_table
    ci = {'value': 0.123456, 'ci_low': 0.1, 'ci_high': 0.2}
    undefined = {'value': None, 'ci_low': None, 'ci_high': None}
    metrics = {'zero_shot': {'pairs': {'a vs b': {'n': 3, 'accuracy': ci, 'balanced_accuracy': ci,
                                                  'roc_auc': undefined}}}}
    table = pair_table(metrics)
    assert table.loc['a vs b', 'within-pair accuracy'] == 0.123 and np.isnan(table.loc['a vs b', 'ROC-AUC'])
    assert table.loc['a vs b', 'ROC-AUC 95% CI'] == ''


# ------------------------------------------------------------------------------------------------ library equivalents
def test_softmax_and_log_softmax_equal_the_hand_formulas():
    from emclip.evaluation.priors import log_softmax
    from emclip.evaluation.zeroshot import softmax
    logits = np.random.default_rng(0).normal(scale=30, size=(6, 4))
    z = logits - logits.max(axis=1, keepdims=True)
    np.testing.assert_allclose(softmax(logits), np.exp(z) / np.exp(z).sum(1, keepdims=True), rtol=1e-13, atol=0)
    np.testing.assert_allclose(log_softmax(logits), z - np.log(np.exp(z).sum(1, keepdims=True)), rtol=1e-13, atol=1e-13)
    assert softmax(logits.astype(np.float32)).dtype == np.float32   # float32 logits stay float32


def test_probe_log_loss_equals_the_old_clipped_mean():
    from emclip.evaluation.probe import _log_loss
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), size=9)
    p[:, 3] = 0.0                          # a class the training part lacked: its column is zero
    p /= p.sum(1, keepdims=True)
    y = np.array([0, 1, 1, 0, 3, 1, 0, 1, 3])  # class 2 absent from these labels, class 3 scored at probability 0
    old = float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-15, 1.0))))
    assert _log_loss(y, p) == pytest.approx(old, rel=1e-14, abs=0)
