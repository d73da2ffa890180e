"""The benchmark scripts run end to end (tiny model, toy sizes) and their "equal results" checks hold."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent.parent / 'benchmarks'


def _import_bench(name: str):
    """Import benchmarks/<name>.py without leaking benchutil's environment defaults into the test session."""
    saved = dict(os.environ)
    sys.path.insert(0, str(BENCH_DIR))
    try:
        return importlib.import_module(name)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        sys.path.remove(str(BENCH_DIR))


@pytest.mark.parametrize('aggregator', ['mean', 'gated_attention', 'transformer'])
@pytest.mark.parametrize('mode,encoding', [('add', 'sincos'), ('add', 'binned'), ('mlp', 'sincos'), ('film', 'sincos')])
def test_previous_padded_arm_equals_encode_bags(aggregator, mode, encoding):
    """The benchmark's "padded (previous)" arm is still the same function as the shipped (packed) encode_bags."""
    bench = _import_bench('bench_batching')
    from emclip.model import build_model
    torch.manual_seed(0)
    model = build_model('tiny', aggregator=aggregator, scale_encoding=encoding, scale_mode=mode)
    with torch.no_grad():  # non-zero scale weights, so that the scale layers are really exercised
        for p in model.scale.parameters():
            p.normal_()
    sizes = torch.tensor([3, 1, 5, 2])
    mask = torch.arange(5)[None] < sizes[:, None]
    feats = torch.randn(4, 5, model.num_features)
    feats[~mask] = float('nan')  # padding may hold anything
    scales = torch.exp(torch.empty(4, 5).uniform_(0.7, 4.6))
    expected = bench.encode_padded(model, scales, mask, feats)
    for instances in (True, False):
        got = model.encode_bags(scales, mask, features=feats, instances=instances).patient
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_batching_bench_runs_both_heads_with_equal_results():
    bench = _import_bench('bench_batching')
    # bags of up to 40: a batch of 4 then packs ~80 instances, past the fused mlp's threshold (scale.FUSE_MIN_INSTANCES)
    res = bench.run(config='tiny', n_patients=8, batch_size=4, epochs=1, max_bag=40, caps=[None])
    cols = res['table']['columns']
    arms = [row[cols.index('arm')] for row in res['table']['rows']]
    assert arms == list(bench.ARMS) * len(bench.HEADS)
    for row in res['table']['rows']:
        assert row[cols.index('|Δ eval loss|')] < 1e-5 and row[cols.index('max rel. |Δ grad|')] < 1e-4
    names = [r['name'] for r in res['ratios']]
    for head in bench.HEADS:
        assert f'packed (shipped) vs batch1-accum, patients/s [{head}, bags 1-40]' in names
    assert all(k.startswith('floor [') for k in res['extra'])


@pytest.mark.slow
def test_run_all_smoke(tmp_path):
    out = tmp_path / 'bench'
    proc = subprocess.run([sys.executable, str(BENCH_DIR / 'run_all.py'), '--smoke', '--out', str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / 'benchmarks.json').read_text())
    names = [r['name'] for r in report['results']]
    assert names == ['batching', 'cache', 'overhead', 'loader', 'retrieval', 'distributed', 'scale', 'search']
    assert all('error' not in r and r['ratios'] for r in report['results'])
    assert report['machine']['cores'] >= 1 and report['machine']['torch'] == torch.__version__
    batching = report['results'][0]
    cols = batching['table']['columns']
    for row in batching['table']['rows']:  # every arm: same loss and gradient as one bag at a time
        assert row[cols.index('|Δ eval loss|')] < 1e-5
        assert row[cols.index('max rel. |Δ grad|')] < 1e-4
        assert row[cols.index('max |Δ train loss|')] < 1e-4
    cache = report['results'][1]
    assert cache['extra']['cache_max_abs_diff'] == 0.0
    md = (out / 'benchmarks.md').read_text()
    assert '## Every ratio measured' in md and '1. Batched bags' in md


def test_an_updated_report_replaces_only_the_benchmarks_run_again():
    run_all = _import_bench('run_all')
    previous = {'command': 'run_all.py', 'machine': {'date': 'd1'},
                'results': [{'name': 'loader', 'seconds': 3.0}, {'name': 'batching', 'seconds': 5.0}]}
    now = {'command': 'run_all.py --only batching --update', 'machine': {'date': 'd2'},
           'results': [{'name': 'batching', 'seconds': 7.0}]}
    merged = run_all._updated(previous, now)
    assert [(r['name'], r['seconds'], r['measured_by']['date']) for r in merged['results']] == \
        [('batching', 7.0, 'd2'), ('loader', 3.0, 'd1')]          # the order of BENCHMARKS, provenance kept
    assert merged['commands'] == ['run_all.py', 'run_all.py --only batching --update']
    assert merged['total_seconds'] == 10.0
    assert 'Commands:' in run_all.to_markdown(dict(merged, machine=dict(
        date='d2', cpu='x', cores_usable=2, memory_gb=1, torch='t', torch_threads=2, omp_wait_policy='PASSIVE',
        python='3', load_average=[0, 0, 0]), results=[]))
