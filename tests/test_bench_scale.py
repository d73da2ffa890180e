"""The scale rehearsal (benchmarks/bench_scale.py) runs end to end at toy size: the synthetic cache in the real
format is found by training (not rebuilt), both launch paths train, the sharded embedding equals one process's."""
from __future__ import annotations

import pytest

from test_benchmarks_smoke import _import_bench


@pytest.mark.slow
@pytest.mark.distributed
def test_scale_rehearsal_smoke(tmp_path):
    bench = _import_bench("bench_scale")
    res = bench.run(n_patients=40, model="tiny", batch_size=4, processes=(1, 2), rounds=1, n_boot=10,
                    sharded_embed=True, keep=str(tmp_path / "work"))
    ratios = {r["name"]: r["value"] for r in res["ratios"]}
    assert ratios["sharded_embedding_equal"] == 1.0
    assert ratios["train_1p_startup_s"] > 0 and ratios["train_2p_epoch_s"] > 0 and ratios["embed_s"] > 0
    caches = list((tmp_path / "work" / "cache").glob("*/manifest.json"))
    assert len(caches) == 1                                  # training used the benchmark's synthetic cache
    import json
    assert json.loads(caches[0].read_text()).get("synthetic") is True
