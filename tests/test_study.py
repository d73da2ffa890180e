"""The study runner end to end on the seconds-scale cohort: hyper-parameters and default chosen on validation,
a grid of aware/blind arms with two seeds, and the report a reader opens."""
import json

import pytest
import yaml

from emclip.study import run_study

pytestmark = pytest.mark.slow


def test_study_runs_selects_on_validation_and_reports(tmp_path, tiny_cohort):
    params = yaml.safe_load(open('params/ci.yaml'))
    params['name'] = 'ci_study'
    params['train'].update(data_dir=str(tiny_cohort), epochs=1, batch_size=4, cache_dir=str(tmp_path / 'cache'))
    params['hp_search'] = {'lr': [0.001, 0.003]}
    params['ablations'] = {'scale_mode': ['film'], 'aggregator': ['mean'], 'scale_embed': [True, False],
                           'seeds': [0, 1]}
    params["evaluation"]["bootstrap"] = 20
    params["study"] = {"workers": 2}
    path = tmp_path / 'ci_study.yaml'
    path.write_text(yaml.safe_dump(params))
    out, summary = tmp_path / 'report', tmp_path / 'summary'
    run_study(str(path), log=lambda *a: None, runs_root=tmp_path / 'runs', out=out, summary_dir=summary)
    record = json.loads((out / 'study.json').read_text())
    assert record['chosen_hyperparameters']['lr'] in (0.001, 0.003)
    assert record['default_variant'] == 'film-mean'
    assert {r['seed'] for r in record['paired_differences']} == {'s0', 's1', 'pooled'}
    assert len(record['per_run']) == 4 and {r['scale'] for r in record['per_run']} == {'aware', 'blind'}
    # every run used the chosen value, and evaluated on both splits
    for run in (tmp_path / 'runs').glob('film-mean-*'):
        assert json.loads((run / 'config.json').read_text())['lr'] == record['chosen_hyperparameters']['lr']
        assert json.loads((run / 'eval_val' / 'metrics.json').read_text())['split'] == 'val'
        assert json.loads((run / 'eval' / 'metrics.json').read_text())['split'] == 'test'
    text = (out / 'study.md').read_text()
    assert 'Headline' in text and 'film-mean' in text and (out / 'study.png').stat().st_size > 10_000
    assert (summary / 'study.md').read_text() == text
