"""Benchmark 0: torch's OpenMP thread waiting on a shared CPU (``OMP_WAIT_POLICY`` unset vs ``PASSIVE``).

    python benchmarks/bench_threads.py

Why this exists: on this 2-core machine, shared with other jobs, the first runs of every benchmark were dominated by
noise of up to 50x on small operations. The cause: between parallel regions, torch's OpenMP threads spin-wait for
work by default; when another process holds one of the cores, the spinning thread burns the time slice its partner
needs, and every small op waits for a descheduled thread. ``OMP_WAIT_POLICY=PASSIVE`` makes idle threads sleep.
All other benchmarks set it (``benchutil``); this one measures the difference, because the training loop and the
notebooks run with the default.

Each policy runs in fresh subprocesses (the policy is read once, when the OpenMP runtime starts), alternating
unset, passive, unset, passive; each child times a cache-mode-like head step (32 bags x 16 instances x 1280
features: linear layers, gated attention, backward; many small ops) and an EfficientNet-Lite0 forward of 8 images
at 224 px (few large ops), with torch's default thread count. The effect depends on what else the machine runs at
that moment: the load average is recorded. On an idle machine both policies are about equally fast.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

CHILD_FLAG = '--child'


def child() -> None:
    """Runs in the subprocess: the policy under test is already in the environment; torch is imported here."""
    import statistics

    import timm
    import torch

    torch.manual_seed(0)
    x = torch.randn(32, 16, 1280)
    proj, v, u, w = (torch.nn.Linear(1280, 256), torch.nn.Linear(256, 128), torch.nn.Linear(256, 128),
                     torch.nn.Linear(128, 1))

    def head():
        z = proj(x)
        a = torch.softmax(w(torch.tanh(v(z)) * torch.sigmoid(u(z))).squeeze(-1), dim=1)
        torch.nn.functional.normalize(torch.einsum('bk,bkd->bd', a, z), dim=-1).sum().backward()

    trunk = timm.create_model('tf_efficientnet_lite0', pretrained=False, num_classes=0).eval()
    trunk = trunk.to(memory_format=torch.channels_last)
    images = torch.randn(8, 3, 224, 224).to(memory_format=torch.channels_last)

    def forward():
        with torch.no_grad():
            trunk(images)

    out = {}
    for name, fn, reps in (('head_step', head, 20), ('trunk_forward_8', forward, 3)):
        fn()  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    out['threads'] = torch.get_num_threads()
    print(json.dumps(out))


def run(repeats: int = 2) -> dict:
    from benchutil import median, ratio, result
    load_before = os.getloadavg()[0]
    times = {'unset': [], 'PASSIVE': []}
    start = time.perf_counter()
    for _ in range(repeats):
        for policy in times:
            env = {k: v for k, v in os.environ.items() if k != 'OMP_WAIT_POLICY'}
            if policy != 'unset':
                env['OMP_WAIT_POLICY'] = policy
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), CHILD_FLAG], env=env, check=True,
                                  capture_output=True, text=True)
            times[policy].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows, ratios = [], []
    for key, label in (('head_step', 'cache-mode head step, 32 x 16 instances (ms)'),
                       ('trunk_forward_8', 'trunk forward, 8 images at 224 px (ms)')):
        unset, passive = (median([t[key] for t in times[p]]) for p in times)
        rows.append([label, round(unset * 1e3, 1), round(passive * 1e3, 1), round(unset / passive, 2)])
        ratios.append(ratio(f'OMP_WAIT_POLICY unset / PASSIVE time: {label.split(" (")[0]}', unset / passive,
                            meaning='> 1: passive waiting is faster on this shared machine'))
    notes = [f'load average before: {load_before:.2f}, after: {os.getloadavg()[0]:.2f} (on '
             f'{os.cpu_count()} cores); {repeats} subprocess(es) per policy, alternating; '
             f'{times["unset"][0]["threads"]} torch threads']
    cfg = dict(repeats=repeats, seconds=round(time.perf_counter() - start, 1))
    return result('threads', '0. OpenMP thread waiting on a shared CPU', ['operation', 'policy unset', 'PASSIVE',
                  'unset / PASSIVE'], rows, ratios, notes, cfg, dict(raw=times))


def main(argv=None):
    import argparse

    from benchutil import print_result
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--repeats', type=int, default=2, help='subprocesses per policy')
    res = run(ap.parse_args(argv).repeats)
    print_result(res)
    return res


if __name__ == '__main__':
    if CHILD_FLAG in sys.argv:
        child()
    else:
        main()
