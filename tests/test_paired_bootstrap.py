"""One paired bootstrap (metrics.bootstrap_difference) behind ablation.paired_differences and compare_runs: the
numbers below were computed by the two separate loops before they were merged, on the same fixture and seed."""
import numpy as np
import pytest

from emclip import ablation
from emclip.ablation import Arm
from emclip.evaluation.report import compare_runs
from emclip.metrics import bootstrap_difference, paired_bootstrap

from test_ablation import seeded_runs

# (seed, metric) -> (aware - blind, ci_low, ci_high, p(diff <= 0)) from the former loop in paired_differences
BEFORE = {
    ('s0', 'zero-shot bal. acc.'): (0.18853519668737062, 0.0398935540399733, 0.37936383061383006, 0.01),
    ('s1', 'zero-shot bal. acc.'): (0.04757591442374065, -0.13141667174116023, 0.21444169228270102, 0.35),
    ('pooled', 'zero-shot bal. acc.'): (0.11805555555555564, 0.004285714285714239, 0.25729166666666675, 0.02),
    ('s0', 'thin/normal acc.'): (0.18918918918918926, 0.02596153846153851, 0.38059866962305966, 0.02),
    ('s1', 'thin/normal acc.'): (0.16216216216216217, -0.029244087837837864, 0.3101388888888888, 0.07),
    ('pooled', 'thin/normal acc.'): (0.1756756756756757, 0.03331479421579535, 0.2976325757575756, 0.01),
}
# compare_runs on the seed-0 pair, from the former loop in metrics.paired_bootstrap
BEFORE_COMPARE = {'value_a': 0.8466471747721748, 'value_b': 0.7431189109178239, 'difference': 0.10352826385435088,
                  'ci_low': -0.03218594632062734, 'ci_high': 0.2685684505118005, 'p_le_0': 0.09, 'n_valid': 100}


@pytest.fixture
def runs(tmp_path):
    return seeded_runs(tmp_path, np.random.default_rng(7), 60, right=(0.7, 0.5))


def test_paired_differences_gives_the_numbers_of_its_former_loop(runs):
    d = ablation.paired_differences(runs, n_boot=100, seed=3)
    got = {(r['seed'], r['metric']): (r['aware − blind'], r['ci_low'], r['ci_high'], r['p(diff ≤ 0)'])
           for r in d.to_dict('records')}
    assert got.keys() == BEFORE.keys()
    for key, values in BEFORE.items():
        assert got[key] == pytest.approx(values, abs=1e-15), key


def test_compare_runs_gives_the_numbers_of_its_former_loop(runs):
    c = compare_runs(runs[Arm('film', 'mean', True, 0)] / 'eval', runs[Arm('film', 'mean', False, 0)] / 'eval',
                     n_boot=100, seed=3)
    assert {k: c[k] for k in BEFORE_COMPARE} == pytest.approx(BEFORE_COMPARE, abs=1e-15)


def test_bootstrap_difference_is_the_core_of_paired_bootstrap():
    rng = np.random.default_rng(0)
    y, a, b = rng.integers(0, 2, 40), rng.random(40), rng.random(40)

    def metric(y, p):
        return float(((p > 0.5) == y).mean())
    full = paired_bootstrap(metric, y, a, b, n_boot=50, seed=5)
    core = bootstrap_difference(lambda i: metric(y[i], a[i]) - metric(y[i], b[i]), 40, n_boot=50, seed=5)
    assert {k: full[k] for k in core} == core
    # non-finite resamples are dropped and counted; none valid -> NaN interval, not an error
    empty = bootstrap_difference(lambda i: float('nan'), 10, n_boot=5)
    assert empty['n_valid'] == 0 and np.isnan(empty['ci_low']) and np.isnan(empty['p_le_0'])
