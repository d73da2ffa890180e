"""Shared helpers of the benchmark scripts: side-by-side timing, peak memory, machine info, tables, result records.

Absolute times on a shared 2-core CPU are noise; what the benchmarks report are *ratios* of variants measured in
the same process, interleaved round-robin (the order rotates every round so that neither variant always runs right
after the other), each summarised by its median. ``interleave`` is the one timing primitive everything uses.
"""
from __future__ import annotations

import os

# Must precede the first torch import (bench scripts import this module first). Without it, torch's OpenMP threads
# spin-wait between parallel regions; on a CPU shared with other jobs the spinning threads steal each other's time
# slices and small ops ran 30x, the trunk 3x slower than with passive waiting (see bench_threads.py).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
os.environ.setdefault('TQDM_DISABLE', '1')  # progress bars of the package (cache building) would clutter the tables

import copy
import datetime as _dt
import platform
import statistics
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch  # noqa: E402

GB, MB = 1024 ** 3, 1024 ** 2
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ---------------------------------------------------------------------------------------------------- timing
def interleave(variants: Dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Run every variant ``warmup + rounds`` times, round-robin with a rotating order; return seconds per variant.

    Warm-up rounds are not recorded: the first call of a shape pays for allocator growth and oneDNN kernel choice.
    """
    names = list(variants)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            variants[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def paired_ratio(times: Dict[str, List[float]], num: str, den: str) -> float:
    """Median of per-round ratios num/den: rounds share the machine's momentary load, so pairing cancels most of it."""
    return median([a / b for a, b in zip(times[num], times[den])])


# ---------------------------------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open('/proc/self/statm') as fh:
            return int(fh.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except OSError:
        return 0


class PeakRSS:
    """Sample the process RSS every few ms in a thread; ``peak`` after the block.

    RSS rather than tracemalloc: torch allocates outside Python's allocator, tracemalloc would not see it.
    """

    def __init__(self, interval: float = 0.005):
        self.interval, self.start = interval, rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = rss_bytes()
        self.peak = self.start
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# ---------------------------------------------------------------------------------------------------- context
def machine_info(argv: Optional[Sequence[str]] = None) -> dict:
    """What the numbers were measured on: cores, CPU model, torch, threads, load, date, command."""
    cpu = platform.processor() or ''
    try:
        with open('/proc/cpuinfo') as fh:
            cpu = next((line.split(':', 1)[1].strip() for line in fh if line.startswith('model name')), cpu)
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    try:
        mem = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GB
    except (ValueError, OSError):
        mem = float('nan')
    return dict(
        date=_dt.datetime.now().astimezone().isoformat(timespec='seconds'),
        command=' '.join(['python'] + list(argv if argv is not None else sys.argv)),
        cpu=cpu, cores=os.cpu_count(), cores_usable=affinity, memory_gb=round(mem, 1),
        torch=torch.__version__, torch_threads=torch.get_num_threads(), python=platform.python_version(),
        platform=platform.platform(), load_average=[round(x, 2) for x in os.getloadavg()],
        omp_wait_policy=os.environ.get('OMP_WAIT_POLICY'),
    )


_MODELS: dict = {}


def build(config: str = 'efficientnet_lite0_minilm', **overrides):
    """A fresh copy of ``emclip.model.build_model(config, **overrides)``; each distinct build happens once.

    Building the pretrained model reads ~100 MB of weights (several seconds); run_all's benchmarks share it.
    """
    from emclip.model import build_model
    key = (config, tuple(sorted(overrides.items())))
    if key not in _MODELS:
        torch.manual_seed(0)
        _MODELS[key] = build_model(config, **overrides)
    return copy.deepcopy(_MODELS[key])


def set_trunk_trainable(model, trainable: bool):
    """Frozen (feature-cache / LiT) or end-to-end trunk, as the training loop's two modes set it."""
    model.lock_image = not trainable
    model.trunk.requires_grad_(trainable)
    model.train()
    return model


def text_width(model) -> int:
    """Width D of the text tower's pooled output, what ``encode_text_pooled`` returns and a text cache stores."""
    with torch.no_grad():
        return int(model.encode_text_pooled(['glomerular basement membrane']).shape[-1])


# ---------------------------------------------------------------------------------------------------- tables
def fmt(value, digits: int = 3) -> str:
    """Compact human formatting: ints with separators, floats to ``digits`` significant figures."""
    if isinstance(value, bool) or value is None:
        return '' if value is None else ('yes' if value else 'no')
    if isinstance(value, int):
        return f'{value:,d}'
    if isinstance(value, float):
        if value != value:
            return 'nan'
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f'{value:,.{digits}g}' if abs(value) < 1000 else f'{value:,.0f}'
        return f'{value:.{digits}g}'
    return str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '|'.join('---' for _ in columns) + '|']
    lines += ['| ' + ' | '.join(fmt(v) for v in row) + ' |' for row in rows]
    return '\n'.join(lines)


def result(name: str, title: str, columns: Sequence[str], rows: Sequence[Sequence], ratios: Sequence[dict],
           notes: Sequence[str] = (), config: Optional[dict] = None, extra: Optional[dict] = None) -> dict:
    """The record every benchmark returns (and run_all writes to JSON)."""
    table = dict(columns=list(columns), rows=[list(r) for r in rows])
    return dict(name=name, title=title, config=config or {}, table=table, ratios=list(ratios), notes=list(notes),
                extra=extra or {})


def ratio(name: str, value: float, target: Optional[str] = None, met: Optional[bool] = None, meaning: str = '') -> dict:
    """One measured ratio; ``target`` like '>= 5' and whether it was met, when the issue sets one."""
    return dict(name=name, value=float(value), target=target, met=met, meaning=meaning)


def print_result(res: dict) -> None:
    print(f'\n## {res["title"]}\n')
    print(markdown_table(res['table']['columns'], res['table']['rows']))
    if res['ratios']:
        print()
        for r in res['ratios']:
            target = f'  (target {r["target"]}: {"met" if r["met"] else "MISSED"})' if r['target'] else ''
            print(f'  {r["name"]}: {fmt(r["value"])}{target}' + (f'  - {r["meaning"]}' if r['meaning'] else ''))
    for note in res['notes']:
        print(f'  * {note}')
