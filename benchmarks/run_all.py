"""Run every benchmark, print their tables, and write reports/benchmarks/benchmarks.{md,json}.

    python benchmarks/run_all.py                            # all benchmarks, sized for < 10 minutes on 2 cores
    python benchmarks/run_all.py --only batching loader     # a subset
    python benchmarks/run_all.py --only retrieval --full --out reports/benchmarks/retrieval_full

Each benchmark runs in a fresh Python process (so that memory peaks and allocator state of one do not leak into the
next) and measures ratios of its variants side by side within that process: absolute times on a shared CPU are
noise. ``--full`` runs retrieval with all 15,000 report queries instead of 1,500 (adds ~3 minutes).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchutil  # first: sets the OpenMP wait policy before torch loads (inherited by the child processes)
from benchutil import fmt, machine_info, markdown_table, print_result

# name -> keyword arguments of bench_<name>.run for the default run: sized for < 10 minutes in all on 2 cores
BENCHMARKS = {
    'threads': dict(repeats=2),
    'batching': dict(n_patients=128, epochs=3, caps=[None, 16]),   # both heads: mlp+mean, add+gated_attention
    'cache': dict(n_patients=24, rounds=5),
    'overhead': dict(rounds=7),
    'loader': dict(n_files=8, items=48, rounds=3),
    'retrieval': dict(),   # 555 queries per round x 3 rounds, extrapolated to 15,000; --full runs all
    'distributed': dict(),
    'scale': dict(),   # the rehearsal at 1/20 size (750 patients, 30,000 images); --full: 15,000 / 600,000
    'search': dict(),  # one text query over 600,000 image embeddings after the index is loaded; peak memory
}

# --smoke: the same code paths on the tiny random model and toy sizes, in about a minute (tests, CI)
SMOKE = {
    'batching': dict(config='tiny', n_patients=16, batch_size=4, epochs=2, max_bag=6, caps=[None, 3]),
    'cache': dict(config='tiny', n_patients=4, batch_size=2, steps=1, max_images=2, rounds=1, image_size=48),
    'overhead': dict(config='tiny', sizes=[2, 1], rounds=1),
    'loader': dict(config='tiny', n_files=2, size=256, items=4, batch_size=2, rounds=1, compressions=[None],
                   workers=[0]),
    'retrieval': dict(n_patients=40, per_patient=5, queries=10, dim=16),
    'distributed': dict(config='tiny', rounds=1),
    'scale': dict(n_patients=40, model='tiny', batch_size=4, rounds=1, n_boot=10, processes=[1]),
    'search': dict(n_patients=200, per_patient=5, dim=32, chunk_patients=64, rounds=3, load_rounds=1),
}

CHILD = """
import json, sys
sys.path.insert(0, {here!r})
import benchutil
import bench_{name} as bench
res = bench.run(**json.loads({kwargs!r}))
with open({out!r}, 'w') as fh:
    json.dump(res, fh, default=str)
"""


def run_isolated(name: str, kwargs: dict) -> dict:
    """``bench_<name>.run(**kwargs)`` in a fresh interpreter; returns its result record (or an error record)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'result.json')
        code = CHILD.format(here=benchutil.HERE, name=name, kwargs=json.dumps(kwargs), out=out)
        proc = subprocess.run([sys.executable, '-c', code], cwd=benchutil.ROOT, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            # keep the traceback, drop the library warnings that precede it
            err = proc.stderr[proc.stderr.rfind('Traceback'):] if 'Traceback' in proc.stderr else proc.stderr[-4000:]
            return dict(name=name, title=name, error=err.strip(), ratios=[])
        with open(out) as fh:
            return json.load(fh)


def to_markdown(report: dict) -> str:
    m = report['machine']
    lines = [
        '# emclip benchmarks', '',
        (f'Command: `{report["command"]}` — {m["date"]}, {report["total_seconds"]:.0f} s in total.' if
         len(report.get('commands', [])) < 2 else
         'Commands: ' + ', '.join(f'`{c}`' for c in report['commands']) +
         f' (each benchmark names the one that measured it); {report["total_seconds"]:.0f} s of benchmarks in total.'),
        '',
        f'Machine: {m["cpu"]}, {m["cores_usable"]} usable cores, {m["memory_gb"]} GB RAM; torch {m["torch"]} with '
        f'{m["torch_threads"]} threads, OMP_WAIT_POLICY={m["omp_wait_policy"]}; Python {m["python"]}; load average '
        f'at start {", ".join(map(str, m["load_average"]))}. The machine is shared: absolute times are noise; each '
        f'benchmark runs in its own process and measures its ratios side by side there (interleaved, medians).', '',
        '## Every ratio measured', '',
    ]
    ratio_rows = []
    for res in report['results']:
        for r in res.get('ratios', []):
            status = '' if not r['target'] else ('met' if r['met'] else '**missed**')
            ratio_rows.append([res['name'], r['name'], fmt(r['value']), r['target'] or '', status, r['meaning']])
    lines += [markdown_table(['benchmark', 'ratio', 'value', 'target', '', 'meaning'], ratio_rows), '']
    for res in report['results']:
        lines += [f'## {res["title"]}', '']
        if 'error' in res:
            lines += ['```', res['error'], '```', '']
            continue
        lines += [markdown_table(res['table']['columns'], res['table']['rows']), '']
        lines += [f'* {note}' for note in res['notes']]
        lines += [f'* settings: `{json.dumps(res["config"])}`']
        if 'measured_by' in res:
            lines += [f'* measured by `{res["measured_by"]["command"]}` on {res["measured_by"]["date"]}, '
                      f'{res.get("seconds", 0):.0f} s']
        lines += ['']
    return '\n'.join(lines) + '\n'


def _updated(previous: dict, now: dict) -> dict:
    """``previous`` with the benchmarks of ``now`` replaced (or added), in the order of ``BENCHMARKS``; each result
    keeps the command and machine it was measured with, and the report lists every command that contributed."""
    for res in previous['results']:
        res.setdefault('measured_by', dict(command=previous['command'], date=previous['machine']['date']))
    for res in now['results']:
        res['measured_by'] = dict(command=now['command'], date=now['machine']['date'])
    ran = {r['name'] for r in now['results']}
    merged = {r['name']: r for r in previous['results'] if r['name'] not in ran}
    merged.update({r['name']: r for r in now['results']})
    order = list(BENCHMARKS)
    results = sorted(merged.values(), key=lambda r: order.index(r['name']) if r['name'] in order else len(order))
    commands = list(dict.fromkeys(previous.get('commands', [previous['command']]) + [now['command']]))
    return dict(now, results=results, commands=commands,
                total_seconds=round(sum(r.get('seconds', 0) for r in results), 1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--only', nargs='+', choices=list(BENCHMARKS), default=None, help='default: all')
    ap.add_argument('--full', action='store_true',
                    help='retrieval with all 15,000 report queries; the scale rehearsal at 15,000 patients')
    ap.add_argument('--smoke', action='store_true', help='tiny model and toy sizes: checks that everything runs')
    ap.add_argument('--out', default=os.path.join(benchutil.ROOT, 'reports', 'benchmarks'))
    ap.add_argument('--update', action='store_true',
                    help='keep the other benchmarks of the report already in --out and replace only those run now')
    args = ap.parse_args(argv)
    argv_used = [os.path.relpath(os.path.abspath(__file__), benchutil.ROOT)] + list(argv if argv is not None
                                                                                    else sys.argv[1:])
    machine = machine_info(argv_used)
    start = time.perf_counter()
    results = []
    names = args.only or list(SMOKE if args.smoke else BENCHMARKS)
    for name in names:
        kwargs = SMOKE.get(name, BENCHMARKS[name]) if args.smoke else BENCHMARKS[name]
        if name == 'retrieval' and args.full:
            kwargs = dict(kwargs, queries=15_000)
        if name == 'scale' and args.full:
            kwargs = dict(kwargs, n_patients=15_000)
        t0 = time.perf_counter()
        print(f'\n[{time.strftime("%H:%M:%S")}] {name} ...', flush=True)
        res = run_isolated(name, kwargs)  # one failing benchmark must not hide the others' numbers
        if 'error' in res:
            print(res['error'], file=sys.stderr)
        else:
            print_result(res)
        res['seconds'] = round(time.perf_counter() - t0, 1)
        print(f'[{name}: {res["seconds"]} s]', flush=True)
        results.append(res)
    total = time.perf_counter() - start
    out = Path(args.out)
    report = dict(command=machine['command'], machine=machine, total_seconds=round(total, 1), results=results)
    if args.update and (out / 'benchmarks.json').exists():
        report = _updated(json.loads((out / 'benchmarks.json').read_text()), report)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'benchmarks.json').write_text(json.dumps(report, indent=2, default=str) + '\n')
    (out / 'benchmarks.md').write_text(to_markdown(report))
    print(f'\nall benchmarks: {total:.0f} s; wrote {out / "benchmarks.md"} and {out / "benchmarks.json"}')
    return 1 if any('error' in r for r in results) else 0


if __name__ == '__main__':
    sys.exit(main())
