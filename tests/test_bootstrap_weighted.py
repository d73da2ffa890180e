"""The bootstrap scores all resamples at once from row multiplicities; it must equal the per-resample loop."""
import numpy as np
import pytest

from emclip.metrics import (HEADLINE_METRICS, bootstrap_ci, headline_metrics, headline_metrics_weighted, macro_auc,
                            paired_bootstrap)


def _data(seed, n=60, c=5, ties=False, absent=None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    if absent is not None:
        y[y == absent] = (absent + 1) % c
    p = rng.dirichlet(np.ones(c), n)
    if ties:
        p = np.round(p * 4) / 4 + 1e-3     # many exact ties, in scores and in the arg-max
    return y, p


@pytest.mark.parametrize("seed, ties, absent", [(0, False, None), (1, True, None), (2, True, 3), (3, False, 0)])
def test_weighted_headline_metrics_equal_the_metric_of_each_resample(seed, ties, absent):
    y, p = _data(seed, ties=ties, absent=absent)
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(y), len(y)) for _ in range(40)] + [np.zeros(len(y), int)]   # one single-row draw
    weights = np.stack([np.bincount(d, minlength=len(y)) for d in draws])
    got = headline_metrics_weighted(y, p, weights)
    for b, d in enumerate(draws):
        want = headline_metrics(y[d], p[d])
        for k in HEADLINE_METRICS:
            np.testing.assert_allclose(got[k][b], want[k], rtol=1e-12, atol=1e-12, equal_nan=True, err_msg=k)


def test_bootstrap_and_paired_bootstrap_give_the_loops_intervals():
    y, p = _data(4, n=80, ties=True)
    _, q = _data(5, n=80)
    groups = np.repeat(np.arange(40), 2)
    for g in (None, groups):
        fast = bootstrap_ci(headline_metrics, y, p, n_boot=200, seed=3, groups=g)
        slow = bootstrap_ci(lambda a, b: headline_metrics(a, b), y, p, n_boot=200, seed=3, groups=g)   # no weights
        for k in HEADLINE_METRICS:
            assert fast[k] == pytest.approx(slow[k], rel=1e-12, abs=1e-12), k
        fast = paired_bootstrap(macro_auc, y, p, q, n_boot=200, seed=3, groups=g)
        slow = paired_bootstrap(lambda a, b: macro_auc(a, b), y, p, q, n_boot=200, seed=3, groups=g)
        assert fast == pytest.approx(slow, rel=1e-12, abs=1e-12)
