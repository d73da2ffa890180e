"""Training: resumable at any step with identical results, NaN guard, feature cache integrity, 2 processes."""
from __future__ import annotations

import csv
import json
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import pytest
from safetensors.numpy import load_file

from emclip.data import load_cohort
from emclip.model import build_model
from emclip.train import TrainingDiverged, load_config, train
from emclip.train.cache import build_feature_cache, check_cache
from emclip.train.checkpoint import latest_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature_cache")


def _overrides(cohort: Path, run: Path, cache: Path, **extra) -> dict:
    # 14 train patients: batch 4 gives 3 steps per epoch; checkpoints at every step exercise every resume point
    base = dict(data_dir=str(cohort), run_dir=str(run), cache_dir=str(cache), batch_size=4, epochs=3,
                checkpoint_every=1, warmup_steps=2, max_instances=3, lr=0.01)
    base.update(extra)
    return base


def _log_rows(run: Path) -> list[list[str]]:
    with open(run / "metrics_log.csv", newline="") as fh:
        return [row[:-1] for row in csv.reader(fh)]     # drop wall-clock seconds


def _final_weights(run: Path) -> dict:
    return load_file(str(latest_checkpoint(run / "checkpoints") / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_cohort, shared_cache, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    summary = train(load_config("ci", _overrides(tiny_cohort, run, shared_cache)))
    assert summary["steps"] == 9
    return run


def _assert_same_run(a: Path, b: Path) -> None:
    assert _log_rows(a) == _log_rows(b)
    wa, wb = _final_weights(a), _final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


@pytest.mark.parametrize("stop_after", [2, 3, 7])   # mid-epoch, exactly at an epoch end, later mid-epoch
def test_resume_after_stop_equals_uninterrupted(tiny_cohort, shared_cache, uninterrupted, tmp_path, stop_after):
    run = tmp_path / "run"
    first = train(load_config("ci", _overrides(tiny_cohort, run, shared_cache, max_steps=stop_after)))
    assert first["steps"] == stop_after
    second = train(load_config("ci", _overrides(tiny_cohort, run, shared_cache)))
    assert second["steps"] == 9
    _assert_same_run(uninterrupted, run)
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()
    for name in ("config.json", "run_info.json", "train_summary.json"):
        assert (run / name).is_file()


def test_resume_after_sigkill_equals_uninterrupted(tiny_cohort, shared_cache, uninterrupted, tmp_path):
    """Kill the real command line mid-run (no clean shutdown), run the same command again, compare."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "emclip.train", "ci"] + [f"{k}={v}" for k, v in
                                                           _overrides(tiny_cohort, run, shared_cache).items()]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        log = run / "metrics_log.csv"
        # a few steps in and a checkpoint written: the second command must resume, not start again
        if log.exists() and len(log.read_text().splitlines()) >= 4 and (run / "checkpoints" / "latest").exists():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the trainer ended before it was killed: nothing was resumed"
    out = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resuming" in out.stdout + out.stderr and "from step_" in out.stdout + out.stderr
    _assert_same_run(uninterrupted, run)


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tiny_cohort, shared_cache, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(load_config("ci", _overrides(tiny_cohort, run, shared_cache, max_steps=2)))
    ckpt = latest_checkpoint(run / "checkpoints")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ckpt.iterdir()}
    from emclip.train import loop
    original = loop._Trainer.loss

    def poisoned(self, patient, report):
        return original(self, patient, report) * float("nan")

    monkeypatch.setattr(loop._Trainer, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 3 .*Last good checkpoint: .*step_000002"):
        train(load_config("ci", _overrides(tiny_cohort, run, shared_cache)))
    assert latest_checkpoint(run / "checkpoints") == ckpt
    assert before == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ckpt.iterdir()}


def test_feature_cache_reused_and_damage_detected(tiny_cohort, tmp_path):
    model = build_model("tiny", lock_image=True)
    cohort = load_cohort(tiny_cohort)
    logs: list[str] = []
    cache = build_feature_cache(model, cohort, tmp_path, log=logs.append)
    assert cache.features.shape == (len(cohort.images), model.num_features) and len(logs) == 1
    again = build_feature_cache(model, cohort, tmp_path, log=logs.append)
    assert len(logs) == 1 and again.path == cache.path                       # reused, not rebuilt
    reference = np.array(cache.features)
    feats = cache.path / "features_rank0.npy"
    # corrupt one value in place: same size, wrong checksum (hashed because the file's identity changed)
    data = bytearray(feats.read_bytes())
    data[-5] ^= 0xFF
    feats.write_bytes(bytes(data))
    assert check_cache(cache.path, cache.meta["key"], len(cohort.images)) == (False, "features_rank0.npy fails its checksum (corrupt)")
    rebuilt = build_feature_cache(model, cohort, tmp_path, log=logs.append)
    assert "fails its checksum" in logs[1] and np.array_equal(np.array(rebuilt.features), reference)
    # truncate
    with open(feats, "r+b") as fh:
        fh.truncate(feats.stat().st_size - 64)
    assert check_cache(cache.path, cache.meta["key"], len(cohort.images))[1] == ("features_rank0.npy is missing or "
                                                                               "truncated")
    # stale: another trunk (different weights) gets another key, never this cache
    other = build_model("tiny", lock_image=True)
    with torch.no_grad():
        next(other.trunk.parameters()).add_(1.0)
    assert other.trunk_id != model.trunk_id
    fresh = build_feature_cache(other, cohort, tmp_path, log=logs.append)
    assert fresh.path != cache.path


@pytest.mark.distributed
def test_two_processes_end_to_end_match_one_process(tiny_cohort, shared_cache, tmp_path):
    """torchrun, 2 CPU processes x batch 2 == 1 process x batch 4: same global batches, same losses."""
    common = dict(epochs=2, checkpoint_every=100)
    one = tmp_path / "one"
    train(load_config("ci", _overrides(tiny_cohort, one, shared_cache, batch_size=4, **common)))
    two = tmp_path / "two"
    args = [f"{k}={v}" for k, v in _overrides(tiny_cohort, two, shared_cache, batch_size=2, **common).items()]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "emclip.train", "ci", *args], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((two / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 6
    ranks = summary["ranks"]            # every rank's own start-up, epoch times and peak memory (issue 15)
    assert [r["rank"] for r in ranks] == [0, 1] and all(len(r["epoch_seconds"]) == 2 for r in ranks)
    assert all(0 < r["startup_seconds"] <= r["process_startup_seconds"] and r["peak_rss_mb"] > 0 for r in ranks)
    rows_one, rows_two = _log_rows(one)[1:], _log_rows(two)[1:]
    assert len(rows_one) == len(rows_two)
    for a, b in zip(rows_one, rows_two):
        for x, y in zip(a, b):
            if x and y:
                assert float(x) == pytest.approx(float(y), rel=1e-4, abs=1e-6)
    shutil.rmtree(two, ignore_errors=True)


def test_checkpoint_stores_only_trainable_weights_and_checks_frozen_ones(tmp_path):
    import torch
    from emclip.train.checkpoint import load_model_weights, save_checkpoint
    torch.manual_seed(0)
    model = build_model("tiny", lock_image=True, lock_text=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = save_checkpoint(tmp_path, model, opt, sched, {"step": 1, "epoch": 0, "batch_in_epoch": 1})
    saved = load_file(str(path / "model.safetensors"))
    assert not any(k.startswith("trunk.") for k in saved) and "logit_scale" in saved
    assert any(k.startswith("image_proj.") for k in saved)
    torch.manual_seed(0)
    same = build_model("tiny", lock_image=True, lock_text=True)
    with torch.no_grad():
        model.image_proj.proj.weight.add_(1.0)                 # what training changes ...
    path = save_checkpoint(tmp_path, model, opt, sched, {"step": 2, "epoch": 0, "batch_in_epoch": 2})
    load_model_weights(same, path)                             # ... is restored into a freshly built model
    assert torch.equal(same.image_proj.proj.weight, model.image_proj.proj.weight)
    with torch.no_grad():
        next(same.trunk.parameters()).add_(1.0)                # other frozen weights than the run had
    with pytest.raises(RuntimeError, match="frozen weights differ"):
        load_model_weights(same, path)


@pytest.mark.distributed
def test_notebook_launcher_two_processes(tiny_cohort, shared_cache, tmp_path):
    """The path 03_train takes with num_processes=2: accelerate.notebook_launcher forks 2 CPU processes."""
    script = (f"from accelerate import notebook_launcher\nfrom emclip.train import load_config, train\n"
              f"cfg = load_config('ci', {_overrides(tiny_cohort, tmp_path / 'run', shared_cache, batch_size=2, epochs=1)!r})\n"
              f"notebook_launcher(train, args=(cfg,), num_processes=2)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3


def test_an_interrupt_says_where_it_stopped_in_one_line_and_running_again_resumes(tiny_cohort, shared_cache,
                                                                                  uninterrupted, tmp_path,
                                                                                  monkeypatch, capsys):
    from emclip.train import TrainingInterrupted
    from emclip.train import loop
    run = tmp_path / "run"
    original, calls = loop._Trainer.step, []

    def interrupted_at_the_fifth(self, micro):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt   # what Ctrl-C or a notebook's interrupt raises inside the step
        return original(self, micro)
    monkeypatch.setattr(loop._Trainer, "step", interrupted_at_the_fifth)
    with pytest.raises(TrainingInterrupted) as err:
        train(load_config("ci", _overrides(tiny_cohort, run, shared_cache)))
    assert str(err.value) == "interrupted at step 4; run again to resume (from step_000004, the last checkpoint)"

    from IPython.core.interactiveshell import InteractiveShell   # what a notebook shows: the line, no traceback
    shell = InteractiveShell.instance()
    shell.user_ns["error"] = err.value
    capsys.readouterr()
    shell.run_cell("raise error")
    shown = capsys.readouterr()
    assert "interrupted at step 4; run again to resume" in shown.out + shown.err
    assert "Traceback" not in shown.out + shown.err and "KeyboardInterrupt" not in shown.out + shown.err

    monkeypatch.setattr(loop._Trainer, "step", original)      # the lock was released; the same call resumes
    assert train(load_config("ci", _overrides(tiny_cohort, run, shared_cache)))["steps"] == 9
    _assert_same_run(uninterrupted, run)
