"""Scale hygiene of the caches (issue 15): sharded feature files read through one view, checks once per process
group and without re-hashing at every start, a format-2 cache read (not rebuilt), text features built once, and a
sharded evaluation embedding equal to one process's."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from emclip.data import load_cohort
from emclip.model import build_model
from emclip.train import cache as cache_mod
from emclip.train.cache import ShardedRows, build_feature_cache, check_cache, shard_bounds

WORKER = Path(__file__).with_name("dist_cache_worker.py")


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("tiny", lock_image=True, lock_text=True).eval()


@pytest.fixture(scope="module")
def cohort(tiny_cohort):
    return load_cohort(tiny_cohort)


@pytest.fixture(scope="module")
def one_process(tiny_model, cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("one_process_cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # as torchrun's ranks run: a convolution's float rounding depends on its threads
    try:
        cache = build_feature_cache(tiny_model, cohort, root, batch_size=4, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    return root, cache.path.name, np.array(cache.features), np.array(cache.zoom)


def _hashes(monkeypatch) -> list[str]:
    calls: list[str] = []
    original = cache_mod.file_sha256
    monkeypatch.setattr(cache_mod, "file_sha256", lambda p, *a: calls.append(Path(p).name) or original(p, *a))
    return calls


def test_sharded_rows_reads_like_the_concatenation():
    whole = np.arange(40, dtype=np.float32).reshape(10, 4)
    view = ShardedRows([whole[:3], whole[3:4], whole[4:]])
    for rows in (np.array([9, 0, 3, 4, 2, 3]), slice(2, 8), slice(None, None, -3), 5, -1, np.array([], int),
                 np.arange(10) % 3 == 0):
        np.testing.assert_array_equal(view[rows], whole[rows])
    np.testing.assert_array_equal(np.asarray(view), whole)
    assert view.shape == (10, 4) and len(view) == 10 and view.dtype == np.float32 and view.nbytes == 160
    with pytest.raises(IndexError):
        view[np.array([10])]
    assert shard_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)] and shard_bounds(2, 3) == [(0, 0), (0, 1), (1, 2)]
    assert shard_bounds(34, 2, 4) == [(0, 16), (16, 34)] and shard_bounds(3, 2, 4) == [(0, 0), (0, 3)]


def test_a_start_on_a_whole_cache_hashes_nothing_and_verify_hashes_everything(tiny_model, cohort, one_process,
                                                                           tmp_path, monkeypatch):
    src, name, reference, _ = one_process
    root = Path(shutil.copytree(src, tmp_path / "cache"))     # a copy: other inodes, so hashed once ...
    calls = _hashes(monkeypatch)
    logs: list[str] = []
    first = build_feature_cache(tiny_model, cohort, root, log=logs.append)
    assert sorted(calls) == ["features_rank0.npy", "zoom_rank0.npy"] and logs == []
    calls.clear()
    again = build_feature_cache(tiny_model, cohort, root, log=logs.append)   # ... and not at the next start
    assert calls == [] and logs == [] and again.path == first.path
    np.testing.assert_array_equal(np.asarray(again.features), reference)
    assert check_cache(root / name, name, len(cohort.images), verify=True) == (True, "ok")
    assert sorted(calls) == ["features_rank0.npy", "zoom_rank0.npy"]
    (root / name / "verified.json").write_text("[not json")      # a damaged stamp file costs a hash, nothing more
    calls.clear()
    assert check_cache(root / name, name, len(cohort.images)) == (True, "ok") and len(calls) == 2


def test_a_single_file_cache_of_format_2_is_read_not_rebuilt(tiny_model, cohort, one_process, tmp_path,
                                                             monkeypatch):
    """The previous layout (features.npy + zoom.npy + meta.json with checksums) is verified once and adopted as one
    shard; a damaged one is rebuilt, naming the file."""
    src, name, reference, zoom = one_process
    root = tmp_path / "cache"
    folder = root / name
    folder.mkdir(parents=True)
    manifest = json.loads((src / name / "manifest.json").read_text())
    for new, old in (("features.npy", "features_rank0.npy"), ("zoom.npy", "zoom_rank0.npy")):
        shutil.copy(src / name / old, folder / new)
    old_meta = {k: v for k, v in manifest.items() if k not in ("format", "shards", "files")}
    old_meta.update(version=2, bytes={n: (folder / n).stat().st_size for n in ("features.npy", "zoom.npy")},
                    sha256={n: manifest["files"][o]["sha256"] for n, o in (("features.npy", "features_rank0.npy"),
                                                                            ("zoom.npy", "zoom_rank0.npy"))})
    (folder / "meta.json").write_text(json.dumps(old_meta))
    legacy = Path(shutil.copytree(root, tmp_path / "legacy_copy"))
    ok, why = check_cache(folder, name, len(cohort.images))
    assert not ok and "format 2" in why
    monkeypatch.setattr(cache_mod, "_extract", lambda *a, **k: pytest.fail("a whole format-2 cache was rebuilt"))
    logs: list[str] = []
    cache = build_feature_cache(tiny_model, cohort, root, log=logs.append)
    assert len(logs) == 1 and "format 2" in logs[0] and "one shard" in logs[0], logs
    np.testing.assert_array_equal(np.asarray(cache.features), reference)
    np.testing.assert_array_equal(cache.zoom, zoom)
    assert check_cache(folder, name, len(cohort.images)) == (True, "ok")
    monkeypatch.undo()
    # damaged: one flipped byte in the old features file
    data = bytearray((legacy / name / "features.npy").read_bytes())
    data[-3] ^= 0xFF
    (legacy / name / "features.npy").write_bytes(bytes(data))
    logs.clear()
    rebuilt = build_feature_cache(tiny_model, cohort, legacy, log=logs.append)
    assert "features.npy fails its checksum" in logs[0] and logs[0].endswith("; rebuilding"), logs
    np.testing.assert_allclose(np.asarray(rebuilt.features), reference, rtol=1e-4, atol=1e-7)   # other threads
    assert sorted(p.name for p in (legacy / name).iterdir()) == ["features_rank0.npy", "manifest.json",
                                                                  "verified.json", "zoom_rank0.npy"]


def test_shards_of_several_ranks_load_as_one_cache(tiny_model, cohort, one_process, tmp_path):
    """A cache in three shards (as three ranks write it) reads like the one-shard cache, through a view."""
    src, name, reference, zoom = one_process
    folder = Path(shutil.copytree(src / name, tmp_path / name))
    manifest = json.loads((folder / "manifest.json").read_text())
    n, shards, files = len(reference), [], {}
    for rank, (start, stop) in enumerate(shard_bounds(n, 3)):
        names = {"features": f"features_rank{rank}.npy", "zoom": f"zoom_rank{rank}.npy"}
        np.save(folder / names["features"], reference[start:stop])
        np.save(folder / names["zoom"], zoom[start:stop])
        shards.append({"rank": rank, "start": start, "stop": stop, **names})
        for f in names.values():
            files[f] = {"bytes": (folder / f).stat().st_size, "sha256": cache_mod.file_sha256(folder / f)}
    manifest.update(shards=shards, files=files, processes=3)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert check_cache(folder, name, n) == (True, "ok")
    cache = build_feature_cache(tiny_model, cohort, tmp_path, log=lambda *_: None)
    assert isinstance(cache.features, ShardedRows) and cache.features.shape == reference.shape
    np.testing.assert_array_equal(np.asarray(cache.features), reference)
    rows = np.array([n - 1, 0, shards[1]["start"], shards[1]["start"] - 1])
    np.testing.assert_array_equal(cache.features[rows], reference[rows])
    np.testing.assert_array_equal(cache.zoom, zoom)
    (folder / "features_rank1.npy").unlink()
    ok, why = check_cache(folder, name, n)
    assert not ok and "features_rank1.npy" in why


@pytest.fixture(scope="module")
def trained_run(tiny_cohort, tmp_path_factory) -> Path:
    from emclip.train import load_config, train
    root = tmp_path_factory.mktemp("shard_run")
    run = root / "run"
    train(load_config("ci", dict(data_dir=str(tiny_cohort), run_dir=str(run), cache_dir=str(root / "cache"),
                                 epochs=1, batch_size=4, max_instances=3)), log=lambda *_: None)
    return run


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_build_shards_check_once_share_text_and_embed_like_one(tiny_cohort, tiny_model, cohort,
                                                                         one_process, trained_run, tmp_path):
    """torchrun, 2 CPU processes: each rank writes its own shard; the features equal the 1-process cache; the key
    and the checks run on rank 0 only and a restart hashes nothing; the text tower runs on rank 0 only; the sharded
    embedding equals one process's exactly."""
    _, name, reference, _ = one_process
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), str(tiny_cohort), str(cache), str(out), str(trained_run)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((cache / name / "manifest.json").read_text())
    half = shard_bounds(len(reference), 2, 4)[0][1]             # batch 4: the blocks are cut at batch boundaries
    assert [(s["start"], s["stop"], s["features"]) for s in manifest["shards"]] == [
        (0, half, "features_rank0.npy"), (half, len(reference), "features_rank1.npy")]
    np.testing.assert_array_equal(np.load(out / "features.npy"), reference)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    build0, build1 = ranks[0]["phases"]["build"], ranks[1]["phases"]["build"]
    assert build0["cache_key"] == 1 and "cache_key" not in build1                    # 1 stat pass per group
    assert build0["file_sha256"] == 2 and build1["file_sha256"] == 2                 # each hashes its own shard
    assert ranks[0]["phases"]["restart"] == {"cache_key": 1} and ranks[1]["phases"]["restart"] == {}
    assert ranks[0]["phases"]["text"].get("_encode", 0) >= 1 and ranks[1]["phases"]["text"] == {}
    assert ranks[0]["same_folder"] and not ranks[0]["emb_is_none"] and ranks[1]["emb_is_none"]
    # one process reads the two-shard cache as it is
    again = build_feature_cache(tiny_model, cohort, cache, log=lambda *_: pytest.fail("rebuilt"))
    np.testing.assert_array_equal(np.asarray(again.features), reference)
    from emclip.train.text_cache import TextFeatures
    np.testing.assert_array_equal(np.load(out / "text.npy"), TextFeatures.build(tiny_model, cohort, 8).features)
    # the sharded embedding, gathered on rank 0, equals the single-process one
    from emclip.evaluation import Embeddings
    from emclip.evaluation.runs import embed_run
    single, sharded = embed_run(trained_run, batch_size=3), Embeddings.load(out / "embeddings.npz")
    for field in ("patient_ids", "split", "diagnosis", "patient", "report", "image", "image_patient", "image_paths",
                  "image_scales", "diagnosis_source"):
        np.testing.assert_array_equal(getattr(sharded, field), getattr(single, field), err_msg=field)
    np.testing.assert_array_equal(np.isnan(sharded.image_attention), np.isnan(single.image_attention))
    assert sharded.logit_scale == single.logit_scale and sharded.n_patients == len(cohort.reports)


def test_embeddings_concat_of_consecutive_shards_is_the_whole():
    from emclip.evaluation import Embeddings
    rng = np.random.default_rng(0)
    sizes = [2, 1, 3, 2, 1]
    n_img = sum(sizes)
    whole = Embeddings(patient_ids=[f"p{i}" for i in range(5)], split=["a", "a", "b", "b", "b"],
                       diagnosis=["x", "y", "x", "", "y"], patient=rng.normal(size=(5, 4)),
                       report=rng.normal(size=(5, 4)), image=rng.normal(size=(n_img, 4)),
                       image_patient=np.repeat(np.arange(5), sizes), image_paths=[f"i{j}" for j in range(n_img)],
                       image_scales=rng.uniform(2, 100, n_img), image_attention=rng.uniform(size=n_img),
                       logit_scale=14.0, meta={"run": 1})
    joined = Embeddings.concat([whole.subset("a"), whole.subset("b")])
    for field in ("patient_ids", "split", "diagnosis", "patient", "report", "image", "image_patient", "image_paths",
                  "image_scales", "image_attention", "diagnosis_source"):
        np.testing.assert_array_equal(getattr(joined, field), getattr(whole, field), err_msg=field)
    assert joined.logit_scale == 14.0 and joined.meta == {"run": 1}
    from emclip.evaluation.runs import shard_patients
    blocks = [shard_patients(10, 3, r, 3) for r in range(3)]
    assert [(b.start, b.stop) for b in blocks] == [(0, 3), (3, 6), (6, 10)]          # cut at batches of 3
    assert [len(shard_patients(2, 4, r, 2)) for r in range(2)] == [0, 2]             # fewer batches than ranks
