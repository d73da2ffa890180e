"""emclip.metrics: retrieval ranks (ties, several positives, chunking), classification vs scikit-learn, bootstrap."""
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score)

from emclip import metrics
from emclip.metrics import (
    bootstrap_ci, classification_metrics, headline_metrics, median_rank, paired_bootstrap, recall_at_k,
    recall_at_k_from_embeddings, recall_from_ranks, retrieval_ranks, retrieval_ranks_from_embeddings)

# ------------------------------------------------------------------------------------ hand-built retrieval case
SIM = np.array([
    [0.9, 0.5, 0.9, 0.1, 0.3],   # q0: positive 2 ties with negative 0
    [0.1, 0.8, 0.7, 0.6, 0.2],   # q1: positives 3, 4; best is 3 (0.6), two negatives above
    [0.5, 0.5, 0.5, 0.9, 0.0],   # q2: positives 0, 1 tie with each other and with negative 2; negative 3 above
    [0.4, 0.3, 0.2, 0.1, 0.0],   # q3: no positive
    [0.99, 0.2, 0.4, 0.3, 0.1],  # q4: positive 2; item 0 scores higher but is excluded
], dtype=np.float32)
POS = [[2], [3, 4], [0, 1], [], [2]]
EXCL = [[], [], [], [], [0]]
PESSIMISTIC = [2, 3, 3, np.inf, 1]
OPTIMISTIC = [1, 3, 2, np.inf, 1]


def _mask(lists, n_items=5):
    m = np.zeros((len(lists), n_items), dtype=bool)
    for q, items in enumerate(lists):
        m[q, items] = True
    return m


@pytest.mark.parametrize('ties, expected', [('pessimistic', PESSIMISTIC), ('optimistic', OPTIMISTIC)])
def test_hand_built_ranks(ties, expected):
    np.testing.assert_array_equal(retrieval_ranks(SIM, POS, exclude=EXCL, ties=ties), expected)


def test_hand_built_recall_and_median():
    r = recall_at_k(SIM, POS, ks=(1, 2, 3, 5), exclude=EXCL)
    assert r == {1: pytest.approx(0.2), 2: pytest.approx(0.4), 3: pytest.approx(0.8), 5: pytest.approx(0.8)}
    assert recall_at_k(SIM, POS, ks=(1,), exclude=EXCL, ties='optimistic')[1] == pytest.approx(0.4)
    assert median_rank(retrieval_ranks(SIM, POS, exclude=EXCL)) == 3
    # without the exclusion q4's positive sits behind item 0
    assert retrieval_ranks(SIM, POS)[4] == 2


def test_positive_formats_agree():
    mask, excl = _mask(POS), _mask(EXCL)
    ref = retrieval_ranks(SIM, POS, exclude=EXCL)
    np.testing.assert_array_equal(retrieval_ranks(SIM, mask, exclude=excl), ref)
    np.testing.assert_array_equal(retrieval_ranks(torch.from_numpy(SIM), torch.from_numpy(mask), exclude=EXCL), ref)
    np.testing.assert_array_equal(
        retrieval_ranks(SIM, lambda a, b: mask[a:b], exclude=lambda a, b: excl[a:b], chunk_size=2), ref)


def test_constant_scores_give_no_hits_by_default():
    sim = np.zeros((4, 10))
    assert recall_at_k(sim, np.arange(4), ks=(1, 9, 10))[1] == 0.0
    assert recall_at_k(sim, np.arange(4), ks=(10,))[10] == 1.0  # rank = 10: every other item ties ahead
    assert recall_at_k(sim, np.arange(4), ks=(1,), ties='optimistic')[1] == 1.0


def _brute_force_ranks(sim, positives, exclude=None):
    """Reference: sort each row (no ties in random data) and find the first positive."""
    ranks = []
    for q, row in enumerate(sim):
        keep = np.ones(len(row), bool)
        if exclude is not None:
            keep[exclude[q]] = False
        order = [i for i in np.argsort(-row, kind='stable') if keep[i]]
        hits = [r + 1 for r, i in enumerate(order) if i in set(positives[q])]
        ranks.append(hits[0] if hits else np.inf)
    return np.array(ranks, dtype=float)


@pytest.mark.parametrize('block_elements', [2 ** 22, 50])  # 50: column blocks of a few items inside each chunk
def test_chunked_equals_dense_and_brute_force(monkeypatch, block_elements):
    monkeypatch.setattr(metrics, '_BLOCK_ELEMENTS', block_elements)
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(37, 8, generator=g, dtype=torch.float64), dim=1)
    x = torch.nn.functional.normalize(torch.randn(120, 8, generator=g, dtype=torch.float64), dim=1)
    rng = np.random.default_rng(0)
    positives = [rng.choice(120, size=rng.integers(0, 6), replace=False) for _ in range(37)]
    exclude = [rng.choice(120, size=3, replace=False) for _ in range(37)]
    sim = (q @ x.T).numpy()
    ref = _brute_force_ranks(sim, positives, exclude)
    np.testing.assert_array_equal(retrieval_ranks(sim, positives, exclude=exclude), ref)
    for chunk in (1, 7, 37, 1000):
        np.testing.assert_array_equal(
            retrieval_ranks_from_embeddings(q, x, positives, exclude=exclude, chunk_size=chunk), ref)
    ks = (1, 5, 10, 50)
    assert recall_at_k_from_embeddings(q.numpy(), x.numpy(), positives, ks, chunk_size=5, exclude=exclude) == \
        recall_at_k(sim, positives, ks, exclude=exclude) == recall_from_ranks(ref, ks)
    # lazily built boolean masks (the image->image path) give the same ranks
    pos_mask = np.zeros((37, 120), bool)
    excl_mask = np.zeros((37, 120), bool)
    for i in range(37):
        pos_mask[i, positives[i]], excl_mask[i, exclude[i]] = True, True
    np.testing.assert_array_equal(retrieval_ranks_from_embeddings(
        q, x, lambda a, b: pos_mask[a:b], exclude=lambda a, b: excl_mask[a:b], chunk_size=6), ref)
    # ties against several positives inside blocks: quantised scores, pessimistic vs optimistic bounds
    coarse = np.round(sim, 1)
    pes = retrieval_ranks(coarse, positives, ties='pessimistic')
    opt = retrieval_ranks(coarse, positives, ties='optimistic')
    np.testing.assert_array_equal(pes, retrieval_ranks(coarse, pos_mask, ties='pessimistic'))
    for qi in range(37):
        if len(positives[qi]):
            best = coarse[qi, positives[qi]].max()
            neg = np.delete(coarse[qi], positives[qi])
            assert pes[qi] == 1 + (neg >= best).sum() and opt[qi] == 1 + (neg > best).sum()


def test_float32_chunking_matches_unchunked():
    g = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(64, 32, generator=g), dim=1)
    x = torch.nn.functional.normalize(torch.randn(500, 32, generator=g), dim=1)
    pos = np.arange(64) * 7
    full = retrieval_ranks_from_embeddings(q, x, pos, chunk_size=64)
    for chunk in (1, 10):
        np.testing.assert_array_equal(retrieval_ranks_from_embeddings(q, x, pos, chunk_size=chunk), full)


# -------------------------------------------------------------------------------------------- classification
def _random_probs(rng, n, c, signal=1.5):
    y = rng.integers(0, c, size=n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), y] += signal
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_classification_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    names = [f'class {i}' for i in range(5)]
    y, p = _random_probs(rng, 300, 5)
    p = np.round(p, 2)  # create tied scores: AUC must average ties like sklearn
    m = classification_metrics(y, p, names)
    pred = p.argmax(1)
    assert m['accuracy'] == pytest.approx(accuracy_score(y, pred))
    assert m['balanced_accuracy'] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m['f1_macro'] == pytest.approx(f1_score(y, pred, average='macro'))
    assert m['f1_weighted'] == pytest.approx(f1_score(y, pred, average='weighted'))
    per_class = [roc_auc_score(y == c, p[:, c]) for c in range(5)]
    assert m['roc_auc_macro_ovr'] == pytest.approx(np.mean(per_class))
    assert [m['roc_auc_per_class'][name] for name in names] == pytest.approx(per_class)
    # sklearn's multi-class OvR path needs rows summing to one, which rounding broke
    p_exact = _random_probs(np.random.default_rng(seed), 300, 5)[1]
    assert headline_metrics(y, p_exact)['roc_auc_macro_ovr'] == pytest.approx(
        roc_auc_score(y, p_exact, multi_class='ovr', average='macro'))
    np.testing.assert_array_equal(m['confusion_matrix'], confusion_matrix(y, pred, labels=range(5)))
    assert m['classes_absent'] == [] and m['auc_undefined'] == [] and m['n'] == 300
    # string labels give the same numbers
    assert classification_metrics([names[i] for i in y], p, names)['f1_macro'] == m['f1_macro']


def test_absent_classes_are_reported_not_fatal():
    rng = np.random.default_rng(3)
    names = ['a', 'b', 'c', 'd']
    y, p = _random_probs(rng, 200, 4, signal=0.5)
    y[y == 2] = 0  # class 'c' has no true example but can still be predicted
    pred = p.argmax(1)
    assert (pred == 2).any()
    m = classification_metrics(y, p, names)
    assert m['classes_absent'] == ['c'] and m['auc_undefined'] == ['c'] and m['roc_auc_per_class']['c'] is None
    expected_auc = np.mean([roc_auc_score(y == c, p[:, c]) for c in (0, 1, 3)])
    assert m['roc_auc_macro_ovr'] == pytest.approx(expected_auc)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert m['balanced_accuracy'] == pytest.approx(balanced_accuracy_score(y, pred))
        assert m['f1_macro'] == pytest.approx(f1_score(y, pred, average='macro', zero_division=0))
        assert m['f1_weighted'] == pytest.approx(f1_score(y, pred, average='weighted', zero_division=0))
    assert m['support']['c'] == 0 and np.asarray(m['confusion_matrix'])[2].sum() == 0


def test_single_class_and_empty_inputs():
    p = np.full((3, 2), 0.5)
    m = classification_metrics([0, 0, 0], p, ['x', 'y'])
    assert np.isnan(m['roc_auc_macro_ovr']) and m['auc_undefined'] == ['x', 'y']
    assert np.isnan(headline_metrics(np.zeros(0, int), np.zeros((0, 2)))['accuracy'])
    with pytest.raises(ValueError, match='not in class_names'):
        classification_metrics(['z'], p[:1], ['x', 'y'])


# ------------------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_coverage_close_to_nominal():
    rng = np.random.default_rng(0)
    covered = 0
    n_sim = 150
    for s in range(n_sim):
        x = rng.normal(loc=1.0, size=60)
        ci = bootstrap_ci(np.mean, x, n_boot=300, seed=s)
        covered += ci['ci_low'] <= 1.0 <= ci['ci_high']
    assert 0.85 <= covered / n_sim <= 0.995


def test_bootstrap_deterministic_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    x = rng.normal(size=2000)
    a, b = bootstrap_ci(np.mean, x[:100], seed=5, n_boot=400), bootstrap_ci(np.mean, x[:100], seed=5, n_boot=400)
    assert a == b and a['n_valid'] == 400 and a['ci_low'] < a['value'] < a['ci_high']
    wide, narrow = a, bootstrap_ci(np.mean, x, seed=5, n_boot=400)
    assert (narrow['ci_high'] - narrow['ci_low']) < 0.5 * (wide['ci_high'] - wide['ci_low'])
    assert narrow['ci_low'] <= 0.0 <= narrow['ci_high']


def test_bootstrap_dict_metric_groups_and_invalid_resamples():
    rng = np.random.default_rng(2)
    y, p = _random_probs(rng, 40, 3)
    ci = bootstrap_ci(headline_metrics, y, p, n_boot=100, seed=0)
    assert set(ci) == set(headline_metrics(y, p)) and ci['accuracy']['ci_low'] <= ci['accuracy']['ci_high']
    # cluster bootstrap: two rows per group, drawn together
    groups = np.repeat(np.arange(20), 2)
    g = bootstrap_ci(lambda v: float(np.mean(v[::2] == v[1::2])), groups, n_boot=50, groups=groups)
    assert g['ci_low'] == g['ci_high'] == 1.0
    # a metric undefined on some resamples: those are dropped and counted
    tiny = np.array([0, 0, 0, 1])
    r = bootstrap_ci(lambda v: float('nan') if v.min() == v.max() else float(v.mean()), tiny, n_boot=200)
    assert 0 < r['n_valid'] < 200


def test_paired_bootstrap():
    rng = np.random.default_rng(4)
    y, good = _random_probs(rng, 200, 3, signal=3.0)
    bad = rng.dirichlet(np.ones(3), size=200)
    auc = lambda yy, pp: headline_metrics(yy, pp)['roc_auc_macro_ovr']  # noqa: E731
    r = paired_bootstrap(auc, y, good, bad, n_boot=300, seed=0)
    assert r['difference'] == pytest.approx(r['value_a'] - r['value_b']) and r['ci_low'] > 0 and r['p_le_0'] == 0.0
    same = paired_bootstrap(auc, y, good, good, n_boot=50)
    assert same['difference'] == 0 and same['p_le_0'] == 1.0
