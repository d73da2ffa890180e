"""04's arms run several at once: every arm is attempted, threads are split between kernels, failures are named."""
import threading
import time

import pytest

from emclip import ablation, reports


def _arms():
    return ablation.grid({"scale_mode": ["add", "film"], "aggregator": ["mean"], "scale_embed": [True, False],
                          "seeds": [0]})


def _fake(calls, fail=None):
    lock, running = threading.Lock(), [0, 0]

    def execute(name, out_dir, parameters, env=None):
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
            calls.append((name, out_dir.name, parameters, dict(env or {})))
        if fail and fail in parameters["run_dir"]:
            raise ValueError(f"broken arm {fail}")
    return execute, running


def test_arms_run_in_parallel_with_split_threads(monkeypatch, tmp_path):
    calls = []
    execute, running = _fake(calls)
    monkeypatch.setattr(reports, "execute_notebook", execute)
    monkeypatch.setattr(ablation.os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    arms = _arms()
    runs = ablation.train_arms(arms, "ci", tmp_path / "rep", tmp_path / "runs", parallel=2, log=lambda *_: None,
                               epochs=1)
    assert runs == [tmp_path / "runs" / a.name for a in arms]
    assert running[1] == 2                                    # two at once, never more
    assert sorted(c[1] for c in calls) == sorted(a.name for a in arms)
    for name, _, params, env in calls:
        assert name == "03_train" and params["epochs"] == 1 and params["params"] == "ci"
        assert env["OMP_NUM_THREADS"] == "1"                  # 2 cores / 2 kernels
    by_run = {c[2]["run_dir"]: c[2] for c in calls}
    for arm in arms:                                          # each arm's own overrides reach its notebook
        assert by_run[str(tmp_path / "runs" / arm.name)]["scale_embed"] == arm.scale_embed


def test_one_failing_arm_does_not_stop_the_others_and_is_named(monkeypatch, tmp_path):
    calls = []
    execute, _ = _fake(calls, fail="film-mean-blind")
    monkeypatch.setattr(reports, "execute_notebook", execute)
    with pytest.raises(RuntimeError, match=r"1 of 4 arms failed \(film-mean-blind-s0\)") as err:
        ablation.train_arms(_arms(), "ci", tmp_path, tmp_path, parallel=3, log=lambda *_: None)
    assert len(calls) == 4 and isinstance(err.value.__cause__, ValueError)


def test_one_at_a_time_keeps_the_kernel_environment(monkeypatch, tmp_path):
    calls = []
    execute, running = _fake(calls)
    monkeypatch.setattr(reports, "execute_notebook", execute)
    ablation.train_arms(_arms()[:2], "ci", tmp_path, tmp_path, parallel=1, log=lambda *_: None)
    assert running[1] == 1 and all(c[3] == {} for c in calls)
