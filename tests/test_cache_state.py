"""Cached state is never used stale or damaged: the text and image feature caches are rebuilt (with a message naming
the file) from any damage, an image rewritten with the same size and mtime invalidates the feature cache, and an
evaluation is recomputed, saying why, when anything its metrics depend on changed (issue 13)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from emclip.data import load_cohort
from emclip.model import build_model
from emclip.train.cache import build_feature_cache, check_cache
from emclip.train.text_cache import TextFeatures, read_text_cache, text_cache_key, write_text_cache


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("tiny", lock_image=True, lock_text=True).eval()


@pytest.fixture(scope="module")
def cohort(tiny_cohort):
    return load_cohort(tiny_cohort)


# ------------------------------------------------------------------------------------------------ text cache
@pytest.fixture(scope="module")
def text_reference(tiny_model, cohort, tmp_path_factory):
    folder = tmp_path_factory.mktemp("text_cache")
    logs: list[str] = []
    text = TextFeatures.build(tiny_model, cohort, 8, folder, log=logs.append)
    files = list(folder.glob("text-*.npz"))
    assert len(files) == 1 and logs == []
    return folder, files[0], text.features.clone()


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _damage_text(path: Path, kind: str, key: str, ids: list[str], features: np.ndarray) -> None:
    good = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "zero bytes":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    elif kind == "flipped byte":                     # same size, the zip CRC no longer matches
        data = bytearray(good)
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "bare npy":                         # the previous format: features only
        buffer = io.BytesIO()
        np.save(buffer, features)
        path.write_bytes(buffer.getvalue())
    elif kind == "wrong shape":
        path.write_bytes(_npz(key=np.array(key), patient_ids=np.array(ids), features=features[:, :-1]))
    elif kind == "wrong dtype":
        path.write_bytes(_npz(key=np.array(key), patient_ids=np.array(ids), features=features.astype(np.float64)))
    elif kind == "non-finite":
        bad = features.copy()
        bad[1, 2] = np.nan
        path.write_bytes(_npz(key=np.array(key), patient_ids=np.array(ids), features=bad))
    elif kind == "missing key":
        path.write_bytes(_npz(patient_ids=np.array(ids), features=features))
    elif kind == "other key":
        path.write_bytes(_npz(key=np.array("0" * 20), patient_ids=np.array(ids), features=features))
    elif kind == "other patients":
        path.write_bytes(_npz(key=np.array(key), patient_ids=np.array(ids[::-1]), features=features))
    elif kind == "fewer patients":
        path.write_bytes(_npz(key=np.array(key), patient_ids=np.array(ids[:-1]), features=features[:-1]))
    else:
        raise AssertionError(kind)


TEXT_DAMAGE = ["truncated", "zero bytes", "garbage", "flipped byte", "bare npy", "wrong shape", "wrong dtype",
               "non-finite", "missing key", "other key", "other patients", "fewer patients"]


@pytest.mark.parametrize("kind", TEXT_DAMAGE)
def test_damaged_text_cache_is_rebuilt_with_a_message(tiny_model, cohort, text_reference, tmp_path, kind):
    src, ref_file, reference = text_reference
    folder = Path(shutil.copytree(src, tmp_path / "cache"))
    path = folder / ref_file.name
    ids = [str(p) for p in cohort.reports.patient_id]
    key = text_cache_key(tiny_model, ids, list(cohort.reports.report))
    assert path.name == f"text-{key}.npz"
    _damage_text(path, kind, key, ids, reference.numpy())
    assert read_text_cache(path, key, ids, reference.shape[1])[0] is None
    logs: list[str] = []
    text = TextFeatures.build(tiny_model, cohort, 8, folder, log=logs.append)
    assert len(logs) == 1, logs
    assert logs[0].startswith(f"text cache {path} is damaged (") and logs[0].endswith("); rebuilding"), logs[0]
    assert torch.equal(text.features, reference)                        # rebuilt, never the damaged content
    again, reason = read_text_cache(path, key, ids, reference.shape[1])  # and the file on disk is whole again
    assert reason == "ok" and torch.equal(again, reference)
    assert sorted(p.name for p in folder.iterdir()) == [path.name]      # no temporary file left behind


def test_text_cache_reused_when_whole(tiny_model, cohort, text_reference, tmp_path, monkeypatch):
    src, ref_file, reference = text_reference
    folder = Path(shutil.copytree(src, tmp_path / "cache"))
    stamp = (folder / ref_file.name).stat().st_mtime_ns
    from emclip.train import text_cache
    encoded: list[int] = []
    original = text_cache._encode
    monkeypatch.setattr(text_cache, "_encode", lambda m, t, b: encoded.append(len(t)) or original(m, t, b))
    logs: list[str] = []
    text = TextFeatures.build(tiny_model, cohort, 8, folder, log=logs.append)
    assert logs == [] and torch.equal(text.features, reference)
    assert encoded == [1]                  # one report, to learn the feature size; the cohort is not re-encoded
    assert (folder / ref_file.name).stat().st_mtime_ns == stamp


def test_text_cache_write_is_atomic(tmp_path, monkeypatch):
    """A writer that fails mid-way leaves the previous file intact and no temporary file."""
    path = tmp_path / "text-x.npz"
    write_text_cache(path, "x", ["a"], torch.ones(1, 3))
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        write_text_cache(path, "x", ["a"], torch.zeros(1, 3))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


# --------------------------------------------------------------------------------------------- feature cache
def _rewrite_pixels_in_place(path: Path) -> None:
    """Other pixels, same file size, same inode; then the modification time is set back to what it was."""
    st = os.stat(path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.compression == 1            # uncompressed: the pixel bytes can be rewritten in place
        offset, count = page.dataoffsets[0], page.databytecounts[0]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        pixels = fh.read(count)
        fh.seek(offset)
        fh.write(bytes(255 - b for b in pixels))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


def test_image_rewritten_with_same_size_and_mtime_invalidates_the_feature_cache(tiny_model, cohort_copy, tmp_path):
    cohort = load_cohort(cohort_copy)
    logs: list[str] = []
    first = build_feature_cache(tiny_model, cohort, tmp_path / "cache", log=logs.append)
    reference = np.array(first.features)
    assert build_feature_cache(tiny_model, cohort, tmp_path / "cache", log=logs.append).path == first.path
    assert len(logs) == 1                                                # built once, then reused
    _rewrite_pixels_in_place(Path(cohort.images.path[0]))
    second = build_feature_cache(tiny_model, cohort, tmp_path / "cache", log=logs.append)
    assert second.path != first.path and len(logs) == 2                  # another key: extracted again
    fresh = np.array(second.features)
    assert not np.allclose(fresh[0], reference[0])                       # the new pixels, not the stale features
    np.testing.assert_array_equal(fresh[1:], reference[1:])


@pytest.fixture(scope="module")
def feature_reference(tiny_model, cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("feature_cache")
    cache = build_feature_cache(tiny_model, cohort, root, log=lambda *_: None)
    return root, cache.path.name, np.array(cache.features), np.array(cache.zoom)


def _rewrite_meta(folder: Path, change) -> None:
    meta = json.loads((folder / "manifest.json").read_text())
    change(meta)
    (folder / "manifest.json").write_text(json.dumps(meta))


def _flip_byte_keeping_size_and_mtime(path: Path) -> None:
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def _damage_features(folder: Path, kind: str) -> str:
    """Damage the cache in ``folder``; returns the file name the rebuild message must name."""
    feats, zoom, meta = folder / "features_rank0.npy", folder / "zoom_rank0.npy", folder / "manifest.json"
    if kind == "features truncated":
        with open(feats, "r+b") as fh:
            fh.truncate(feats.stat().st_size // 2)
        return feats.name
    if kind == "features flipped byte, same size and mtime":   # caught by the hash its changed ctime triggers
        _flip_byte_keeping_size_and_mtime(feats)
        return feats.name
    if kind == "zoom zero bytes":
        zoom.write_bytes(b"")
        return zoom.name
    if kind == "features deleted":
        feats.unlink()
        return feats.name
    if kind == "meta deleted":
        meta.unlink()
        return meta.name
    if kind == "meta truncated":
        meta.write_text(meta.read_text()[:40])
        return meta.name
    if kind == "meta not utf-8":
        meta.write_bytes(b"\xff\xfe\x00garbage\x80\x81")
        return meta.name
    if kind == "meta a list":
        meta.write_text("[1, 2, 3]")
        return meta.name
    if kind == "meta without checksums":
        _rewrite_meta(folder, lambda m: m.pop("files"))
        return meta.name
    if kind == "meta bytes not a mapping":
        _rewrite_meta(folder, lambda m: m.update(files="12"))
        return meta.name
    if kind == "meta shards do not tile":
        _rewrite_meta(folder, lambda m: m["shards"][0].update(start=1))
        return meta.name
    if kind == "meta wrong dim":                 # checksums fine, but the array is not what the manifest says
        _rewrite_meta(folder, lambda m: m.update(dim=m["dim"] + 1))
        return feats.name
    if kind == "features header garbage":        # garbage whose size and checksum the manifest was made to match
        feats.write_bytes(b"\x00" * feats.stat().st_size)
        _rewrite_meta(folder, lambda m: m["files"][feats.name].update(sha256=hashlib.sha256(
            feats.read_bytes()).hexdigest()))
        return feats.name
    if kind == "folder is a file":
        shutil.rmtree(folder)
        folder.write_bytes(b"not a cache")
        return meta.name
    raise AssertionError(kind)


FEATURE_DAMAGE = ["features truncated", "features flipped byte, same size and mtime", "zoom zero bytes",
                  "features deleted", "meta deleted", "meta truncated", "meta not utf-8", "meta a list",
                  "meta without checksums", "meta bytes not a mapping", "meta shards do not tile", "meta wrong dim",
                  "features header garbage", "folder is a file"]


def test_a_cache_recorded_under_another_key_is_stale(tiny_model, cohort, feature_reference, tmp_path):
    """The folder name is not trusted: a cache whose meta.json records another key (a folder copied or renamed from
    another trunk, preprocessing or set of images) is refused as stale, even with every file intact."""
    from emclip.train.cache import feature_cache_key
    root, name, _, _ = feature_reference
    key = feature_cache_key(tiny_model, cohort)
    assert name == key and check_cache(root / name, key, len(cohort.images)) == (True, "ok")
    other = "0" * len(key)
    shutil.copytree(root / name, tmp_path / other)
    usable, why = check_cache(tmp_path / other, other, len(cohort.images))
    assert not usable and why.startswith("stale")
    assert check_cache(root / name, key, len(cohort.images) + 1)[0] is False      # another number of images


@pytest.mark.parametrize("kind", FEATURE_DAMAGE)
def test_damaged_feature_cache_is_rebuilt_with_a_message(tiny_model, cohort, feature_reference, tmp_path, kind):
    src, name, reference, zoom = feature_reference
    root = Path(shutil.copytree(src, tmp_path / "cache"))
    folder = root / name
    named = _damage_features(folder, kind)
    ok, reason = check_cache(folder, name, len(cohort.images))
    assert not ok and named in reason, reason
    logs: list[str] = []
    cache = build_feature_cache(tiny_model, cohort, root, log=logs.append)
    assert cache.path == folder
    assert logs[0].startswith(f"feature cache {folder}: ") and named in logs[0] and logs[0].endswith("; rebuilding")
    assert len(logs) == 2                                                 # the message, then the extraction
    np.testing.assert_array_equal(np.array(cache.features), reference)
    np.testing.assert_array_equal(cache.zoom, zoom)
    assert check_cache(folder, name, len(cohort.images)) == (True, "ok")


# ------------------------------------------------------------------------------------------------ evaluation
@pytest.fixture(scope="module")
def trained_run(tiny_cohort, tmp_path_factory) -> Path:
    """A tiny trained run on a private copy of the cohort (the evaluation test edits the cohort's tables)."""
    from emclip.train import load_config, train
    root = tmp_path_factory.mktemp("eval_run")
    data = Path(shutil.copytree(tiny_cohort, root / "cohort"))
    run = root / "run"
    train(load_config("ci", dict(data_dir=str(data), run_dir=str(run), cache_dir=str(root / "cache"), epochs=1,
                                 batch_size=4, max_instances=3)), log=lambda *_: None)
    return run


@pytest.mark.slow
def test_evaluation_is_reused_only_while_nothing_it_depends_on_changed(trained_run, monkeypatch):
    from emclip.evaluation import cached, runs
    run, calls, logs = trained_run, [], []
    original = cached.evaluate

    def counted(*args, **kwargs):          # the real evaluation, made cheaper: fewer probe seeds and prompt sets
        calls.append(kwargs["topj"])
        return original(*args, **kwargs, probe_seeds=(0,), n_prompt_subsets=2, shots=(1,))

    monkeypatch.setattr(cached, "evaluate", counted)
    metrics_path = run / "eval" / "metrics.json"

    def evaluate(**kw):
        kw = {"n_boot": 10, "topj": (1, 3), "figures": False, **kw}
        return cached.evaluate_run(run, log=logs.append, **kw)

    def last() -> str:
        return logs[-1]

    first = evaluate()
    assert len(calls) == 1
    stored = json.loads(metrics_path.read_text())
    assert stored["evaluation_key"] == first["evaluation_key"] and len(first["evaluation_key"]["digest"]) == 16
    assert set(first["evaluation_key"]["parts"]) >= {"checkpoint", "split", "n_boot", "topj", "cohort", "prompts",
                                                      "schema_version", "config", "feature_cache"}
    stamp = metrics_path.stat().st_mtime_ns

    assert evaluate() == first and len(calls) == 1 and last().startswith("reusing ")     # same arguments: reused
    assert metrics_path.stat().st_mtime_ns == stamp

    evaluate(topj=(1, 5))                                                                 # another topj
    assert len(calls) == 2 and last().endswith(": topj changed (1, 3) -> (1, 5)"), last()
    assert evaluate(topj=(1, 5))["zero_shot"]["image_topj"].keys() == {"1", "5"} and len(calls) == 2

    evaluate(topj=(1, 5), n_boot=12)
    assert len(calls) == 3 and "n_boot changed 10 -> 12" in last()

    # relabel: one test patient's diagnosis in reports.csv
    data = Path(json.loads((run / "config.json").read_text())["data_dir"])
    reports = pd.read_csv(data / "reports.csv", dtype=str, keep_default_na=False)
    row = reports.index[(reports.split == "test") & (reports.diagnosis != "")][0]
    pid, old = reports.loc[row, "patient_id"], reports.loc[row, "diagnosis"]
    new = "membranous nephropathy" if old != "membranous nephropathy" else "amyloidosis"
    reports.loc[row, "diagnosis"] = new
    reports.to_csv(data / "reports.csv", index=False)
    evaluate(topj=(1, 5), n_boot=12)
    assert len(calls) == 4 and "cohort.reports changed" in last(), last()
    predictions = pd.read_csv(run / "eval" / "predictions.csv", dtype=str, keep_default_na=False)
    assert predictions.set_index("patient_id").loc[pid, "diagnosis"] == new            # not the stale label

    # relabel through the run's configuration: hedged diagnoses now counted
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(dict(config, label_uncertain="positive")))
    evaluate(topj=(1, 5), n_boot=12)
    assert len(calls) == 5 and "config.label_uncertain changed 'exclude' -> 'positive'" in last(), last()

    # other weights in the checkpoint the evaluation reads
    from safetensors.torch import load_file, save_file
    weights = run / "checkpoints" / "best" / "model.safetensors"
    state = load_file(str(weights))
    state["logit_scale"] = state["logit_scale"] + 0.5
    save_file(state, str(weights))
    meta_path = weights.parent / "meta.json"   # re-sealed, as a new best would be (an unsealed edit is damage)
    meta = json.loads(meta_path.read_text())
    meta["checksums"]["model.safetensors"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))
    evaluate(topj=(1, 5), n_boot=12)
    assert len(calls) == 6 and "checkpoint.sha256 changed" in last(), last()

    # other zero-shot prompts (e.g. an edited prompt file)
    from emclip.evaluation import PromptSet
    renal = runs.load_prompts("renal_em")
    edited = PromptSet(renal.classes, renal.synonyms, renal.templates + ["a micrograph showing {}"])
    monkeypatch.setattr(runs, "load_prompts", lambda name: edited)
    evaluate(topj=(1, 5), n_boot=12)
    assert len(calls) == 7 and "prompts changed" in last(), last()

    # a damaged metrics file, and one written before evaluation keys existed, are recomputed
    metrics_path.write_text('{"schema_version": 3, "split": "te')
    evaluate(topj=(1, 5), n_boot=12)
    assert len(calls) == 8 and "cannot be read" in last(), last()
    legacy = json.loads(metrics_path.read_text())
    legacy.pop("evaluation_key")
    metrics_path.write_text(json.dumps(legacy))
    final = evaluate(topj=(1, 5), n_boot=12)
    assert len(calls) == 9 and "no evaluation key recorded" in last(), last()
    assert evaluate(topj=(1, 5), n_boot=12) == final and len(calls) == 9                  # and reused again

    # a recomputation that fails part-way leaves no metrics behind to be reused against its half-written outputs
    def killed(*args, **kwargs):
        (run / "eval" / "predictions.csv").write_text("half written\n")
        raise RuntimeError("killed mid-evaluation")

    monkeypatch.setattr(cached, "evaluate", killed)
    with pytest.raises(RuntimeError, match="killed"):
        evaluate(topj=(1, 2))
    assert not metrics_path.exists()
