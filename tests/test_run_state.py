"""Run state is never mixed or lost (issue 13, hostile inputs): best/ survives a kill at any point, one trainer per
run_dir, resuming only with a compatible configuration, and checkpoints verified by checksum with a fallback."""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from emclip.model import build_model
from emclip.train import load_config, train
from emclip.train import loop
from emclip.train.checkpoint import (CheckpointError, best_checkpoint, copy_as, latest_checkpoint, load_checkpoint,
                                     load_model_weights, resolve_checkpoint, save_checkpoint)
from emclip.train.runinfo import IncompatibleResume, RunDirInUse, run_lock


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature_cache")


def _cfg(cohort: Path, run: Path, cache: Path, **extra):
    # 14 train patients, batch 4: 3 steps per epoch; a checkpoint at every step
    base = dict(data_dir=str(cohort), run_dir=str(run), cache_dir=str(cache), batch_size=4, epochs=2,
                checkpoint_every=1, warmup_steps=2, max_instances=3, lr=0.01)
    return load_config("ci", {**base, **extra})


def _log_rows(run: Path) -> list[list[str]]:
    with open(run / "metrics_log.csv", newline="") as fh:
        return [row[:-1] for row in csv.reader(fh)]     # drop wall-clock seconds


def _meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "meta.json").read_text())


# ------------------------------------------------------------------------------------------- 1. best/ under kill -9

def test_kill_between_step_and_best_copy_loses_no_best(tiny_cohort, cache, tmp_path, monkeypatch):
    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"

    def killed(*_):
        raise SystemExit("killed between save_checkpoint and copy_as")

    monkeypatch.setattr(loop, "copy_as", killed)
    with pytest.raises(SystemExit):
        train(_cfg(tiny_cohort, run, cache))            # dies at the end of epoch 1 (step 3), before best/ exists
    monkeypatch.undo()
    assert not (root / "best").exists()
    meta = _meta(root / "step_000003")
    assert meta["is_best"] and meta["best_step"] == 3
    # evaluation does not fall back to the latest checkpoint silently: it uses the recorded best and says so
    said: list[str] = []
    assert best_checkpoint(root, log=said.append) == root / "step_000003"
    assert said == [f"{root / 'best'} is missing; using {root / 'step_000003'}, which the run recorded as its best "
                    f"(step 3)"]
    # resuming re-creates best/ from that step at once, then trains on (its later checkpoints prune step 3)
    said.clear()
    train(_cfg(tiny_cohort, run, cache, max_steps=5), log=said.append)
    assert any(m == f"{root / 'best'} was missing; re-created it from step_000003, which the run recorded as its best"
               for m in said), said
    assert not (root / "step_000003").exists()
    assert _meta(root / "best")["step"] == 3
    assert best_checkpoint(root) == root / "best"


@pytest.mark.parametrize("select_on,best_epoch", [("val_recall", 2), ("val_loss", 3)])
def test_best_is_the_epoch_with_the_best_validation_score(tiny_cohort, cache, tmp_path, monkeypatch, select_on,
                                                          best_epoch):
    """best/ holds the epoch that scored best on what ``select_on`` names; recall and loss disagree on purpose
    (recall peaks at epoch 2, loss is lowest at epoch 3), and a later tie does not replace the best."""
    scripted = iter([(2.0, 0.30), (1.9, 0.60), (1.5, 0.40), (1.6, 0.60)])   # (val loss, val recall) per epoch
    monkeypatch.setattr(loop._Trainer, "validate", lambda self, loader: next(scripted))
    run = tmp_path / "run"
    summary = train(_cfg(tiny_cohort, run, cache, epochs=4, select_on=select_on))
    root = run / "checkpoints"
    assert _meta(root / "best")["step"] == 3 * best_epoch == _meta(latest_checkpoint(root))["best_step"]
    assert summary["best_val_loss"] == 1.5 and summary["select_on"] == select_on
    assert best_checkpoint(root) == root / "best"


def test_the_recorded_best_step_is_not_pruned_until_best_holds_it(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny", lock_image=True, lock_text=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    meta = lambda step, best: {"step": step, "epoch": 0, "batch_in_epoch": step, "best_step": best,  # noqa: E731
                               "is_best": step == best}
    save_checkpoint(tmp_path, model, opt, sched, meta(3, 3))       # best at step 3 ... killed before copy_as
    for step in (4, 5, 6):
        save_checkpoint(tmp_path, model, opt, sched, meta(step, 3))
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000003", "step_000005", "step_000006"]
    with pytest.warns(RuntimeWarning, match="best is missing; using .*step_000003"):
        assert resolve_checkpoint(tmp_path, "best") == tmp_path / "step_000003"
    copy_as(tmp_path, tmp_path / "step_000003", "best")
    save_checkpoint(tmp_path, model, opt, sched, meta(7, 3))       # best/ holds it now: step 3 may go
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000006", "step_000007"]
    assert resolve_checkpoint(tmp_path, "best") == tmp_path / "best"
    # best/ older than the recorded best (killed before the copy of a later improvement): the step is used
    save_checkpoint(tmp_path, model, opt, sched, meta(8, 8))
    with pytest.warns(RuntimeWarning, match=r"best is older \(step 3\) than the run's best \(step 8\); using "):
        assert best_checkpoint(tmp_path) == tmp_path / "step_000008"


def test_evaluation_without_any_best_raises_naming_it(tiny_cohort, cache, tmp_path):
    run = tmp_path / "run"
    train(_cfg(tiny_cohort, run, cache, max_steps=2))     # no epoch ended: there is no best
    root = run / "checkpoints"
    with pytest.raises(CheckpointError, match=rf"^{root / 'best'} is missing: this run has no usable best checkpoint; "
                                              rf"evaluate its latest checkpoint \({root / 'step_000002'}\) explicitly"):
        resolve_checkpoint(root, "best")
    assert resolve_checkpoint(root, "latest") == root / "step_000002"


# ---------------------------------------------------------------------------------------------- 2. one run_dir lock

def test_a_second_trainer_on_the_run_dir_fails_at_once(tiny_cohort, cache, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = run / ".lock"
    with run_lock(run):
        with pytest.raises(RunDirInUse, match=rf"^run_dir {run} is in use by pid {os.getpid()} on host "
                                              rf"{socket.gethostname()} \(lock file {lock}\); wait for it or choose "
                                              rf"another run_dir$"):
            train(_cfg(tiny_cohort, run, cache, max_steps=1))
        assert not (run / "config.json").exists()
    assert train(_cfg(tiny_cohort, run, cache, max_steps=1))["steps"] == 1      # released: it runs
    # a trainer in another process, then killed with SIGKILL: refused while it lives, no stale lock after
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, json, os, socket, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname()}).encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirInUse, match=rf"in use by pid {holder.pid} on host"):
            train(_cfg(tiny_cohort, run, cache, max_steps=2))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert json.loads(lock.read_text())["pid"] == holder.pid        # the dead holder's record is still there ...
    assert train(_cfg(tiny_cohort, run, cache, max_steps=2))["steps"] == 2     # ... and blocks nothing


# ------------------------------------------------------------------------------ 3. resume with the same configuration

@pytest.fixture(scope="module")
def short_run(tiny_cohort, cache, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("short") / "run"
    train(_cfg(tiny_cohort, run, cache, max_steps=2))
    return run


@pytest.mark.parametrize("change, message", [
    (dict(lr=0.02), "lr: 0.01 in the run, 0.02 now"),
    (dict(aggregator="mean"), 'aggregator: "gated_attention" in the run, "mean" now'),
    (dict(epochs=3), "epochs: 2 in the run, 3 now"),
    (dict(lr=0.02, batch_size=2), "batch_size: 4 in the run, 2 now; lr: 0.01 in the run, 0.02 now"),
    ("data_dir", "data_dir: .* in the run, .*cohort\" now"),
])
def test_resume_with_another_configuration_is_refused_and_changes_nothing(short_run, tiny_cohort, cohort_copy, cache,
                                                                          change, message):
    before = {p.relative_to(short_run): p.read_bytes() for p in short_run.rglob("*") if p.is_file()}
    change = dict(data_dir=str(cohort_copy)) if change == "data_dir" else change
    cfg = _cfg(tiny_cohort, short_run, cache, max_steps=3, **change)
    with pytest.raises(IncompatibleResume, match=rf"^run_dir {short_run} holds a run with another configuration "
                                                 rf"\({short_run / 'config.json'}\): {message}; choose a new run_dir, "
                                                 rf"or restore these values to resume it$"):
        train(cfg)
    after = {p.relative_to(short_run): p.read_bytes() for p in short_run.rglob("*") if p.is_file()}
    assert after == before                              # config.json byte for byte, checkpoints, log


def test_resume_with_only_safe_changes_runs_and_keeps_config_json(tiny_cohort, cache, tmp_path):
    run = tmp_path / "run"
    train(_cfg(tiny_cohort, run, cache, max_steps=2))
    config = (run / "config.json").read_bytes()
    said: list[str] = []
    summary = train(_cfg(tiny_cohort, run, cache, max_steps=3, num_workers=1, eval_batch_size=7, checkpoint_every=5,
                         cache_dir=str(tmp_path / "other_cache")), log=said.append)
    assert summary["steps"] == 3 and any(m.startswith(f"resuming {run} from step_000002") for m in said)
    assert (run / "config.json").read_bytes() == config


def test_a_run_refused_before_it_starts_leaves_no_config_to_compare(tiny_cohort, cache, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="fewer than one step needs"):
        train(_cfg(tiny_cohort, run, cache, batch_size=64))
    assert not (run / "config.json").exists()
    assert train(_cfg(tiny_cohort, run, cache, max_steps=1))["steps"] == 1
    # config.json of a run killed before its first checkpoint: refused too, with the way out
    with pytest.raises(IncompatibleResume, match="lr: 0.01 in the run, 0.03 now; .*"):
        train(_cfg(tiny_cohort, run, cache, lr=0.03, max_steps=2))
    for p in (run / "checkpoints").glob("step_*"):
        import shutil
        shutil.rmtree(p)
    (run / "checkpoints" / "latest").unlink()
    with pytest.raises(IncompatibleResume, match=r"the run has no checkpoint yet, so deleting .*config.json starts "
                                                 r"it anew$"):
        train(_cfg(tiny_cohort, run, cache, lr=0.03, max_steps=2))


# ------------------------------------------------------------------------------------- 4. checksums with fallback

def _flip_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[12] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 100)


def _alter_value(path: Path) -> None:
    """Change one weight in place: same size, a header that parses, a valid float — only the checksum tells."""
    data = bytearray(path.read_bytes())
    value = np.frombuffer(bytes(data[-4:]), np.float32)[0]
    data[-4:] = np.float32(value + 1.0).tobytes()
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def three_steps(tiny_cohort, cache, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("three") / "run"
    train(_cfg(tiny_cohort, run, cache, max_steps=3))
    return run


@pytest.mark.parametrize("damage, file", [(_flip_header, "model.safetensors"), (_truncate, "model.safetensors"),
                                          (_alter_value, "model.safetensors"), (_alter_value, "state.pt")])
def test_damaged_latest_checkpoint_resumes_from_the_previous_one(tiny_cohort, cache, three_steps, tmp_path, damage,
                                                                 file):
    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    train(_cfg(tiny_cohort, run, cache, max_steps=2))
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000001", "step_000002"]
    damage(root / "step_000002" / file)
    with pytest.warns(RuntimeWarning, match=rf"step_000002 is damaged \({file} checksum mismatch\); using step_000001"):
        assert latest_checkpoint(root) == root / "step_000001"
    said: list[str] = []
    assert train(_cfg(tiny_cohort, run, cache, max_steps=3), log=said.append)["steps"] == 3
    assert said[0] == (f"checkpoint {root / 'step_000002'} is damaged ({file} checksum mismatch); resuming from "
                       f"step_000001 (kept as damaged-step_000002)")
    assert (root / "damaged-step_000002" / file).is_file()
    # the log was cut back to the checkpoint actually resumed from: identical to an uninterrupted run's
    assert _log_rows(run) == _log_rows(three_steps)
    a = load_file(str(latest_checkpoint(root) / "model.safetensors"))
    b = load_file(str(latest_checkpoint(three_steps / "checkpoints") / "model.safetensors"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _fake_checkpoint(root: Path, step: int) -> Path:
    """A step folder checkpoint_problem accepts (a checkpoint from before checksums: files present, header parses)."""
    from safetensors.numpy import save_file
    ckpt = root / f"step_{step:06d}"
    ckpt.mkdir(parents=True)
    save_file({"w": np.full(2, step, dtype=np.float32)}, str(ckpt / "model.safetensors"))
    (ckpt / "state.pt").write_bytes(b"state")
    (ckpt / "meta.json").write_text(json.dumps({"step": step}))
    return ckpt


def test_resume_takes_the_newest_intact_checkpoint_not_the_oldest(tmp_path):
    from emclip.train.checkpoint import find_checkpoint
    root = tmp_path / "checkpoints"
    steps = [_fake_checkpoint(root, k) for k in (1, 2, 3, 4)]
    assert find_checkpoint(root) == (steps[3], [])                       # no latest pointer: the newest
    (root / "latest").write_text("step_000004\n")
    (steps[3] / "model.safetensors").unlink()                             # the newest is damaged
    found, damaged = find_checkpoint(root)
    assert found == steps[2] and [p for p, _ in damaged] == [steps[3]]  # the one before it, not step 1
    (root / "latest").write_text("step_000002\n")                       # latest names an older step: it wins
    assert find_checkpoint(root)[0] == steps[1]


def test_damaged_only_checkpoint_is_a_clear_error_naming_it(tiny_cohort, cache, tmp_path):
    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    train(_cfg(tiny_cohort, run, cache, max_steps=1))
    ckpt = root / "step_000001"
    _alter_value(ckpt / "model.safetensors")
    message = rf"^checkpoint {ckpt} is damaged \(model.safetensors checksum mismatch\)"
    with pytest.raises(CheckpointError, match=message + rf", and no intact older checkpoint exists in {root}; "):
        train(_cfg(tiny_cohort, run, cache, max_steps=2))
    model = loop.build_run_model(_cfg(tiny_cohort, run, cache))
    with pytest.raises(CheckpointError, match=message + "$"):
        load_model_weights(model, ckpt)
    with pytest.raises(CheckpointError, match=message + "$"):
        load_checkpoint(ckpt, model)


def test_checkpoints_without_checksums_still_load_and_unreadable_ones_name_the_file(tiny_cohort, cache, tmp_path):
    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    train(_cfg(tiny_cohort, run, cache, max_steps=1))
    ckpt = root / "step_000001"
    meta = _meta(ckpt)
    for key in ("checksums", "best_step", "is_best", "processes"):      # as written before these existed
        meta.pop(key)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    model = loop.build_run_model(_cfg(tiny_cohort, run, cache))
    load_model_weights(model, ckpt)
    assert train(_cfg(tiny_cohort, run, cache, max_steps=2))["steps"] == 2          # resumes from it
    legacy = tmp_path / "legacy"
    copy_as(root, root / "step_000002", "old")
    (root / "old").rename(legacy)
    meta = _meta(legacy)
    meta.pop("checksums")
    (legacy / "meta.json").write_text(json.dumps(meta))
    _truncate(legacy / "model.safetensors")                              # no checksum: the parse still fails cleanly
    with pytest.raises(CheckpointError, match=rf"^checkpoint {legacy} is damaged \(model.safetensors cannot be "
                                              rf"parsed: .+\)$"):
        load_model_weights(model, legacy)
    (legacy / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"meta.json cannot be parsed"):
        load_model_weights(model, legacy)


# ------------------------------------------------------------------------------------------- TensorBoard (accelerate)

def test_scalars_land_in_run_dir_tensorboard_when_installed(tiny_cohort, cache, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    train(_cfg(tiny_cohort, run, cache, epochs=1))
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert {"loss", "lr", "logit_scale", "val_loss", "val_recall"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]


def test_training_without_tensorboard_keeps_the_csv_log(tiny_cohort, cache, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "is_tensorboard_available", lambda: False)   # as if not installed
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(_cfg(tiny_cohort, run, cache, epochs=1))
    assert not [w for w in caught if "log_with" in str(w.message)]   # accelerate's warning when asked for a missing one
    assert not (run / "tensorboard").exists()
    assert [r[0] for r in _log_rows(run)] == ["step", "1", "2", "3", "3"]
