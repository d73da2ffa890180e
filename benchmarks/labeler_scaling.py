"""Seconds the report labeler takes against report length, now and at an earlier revision, side by side.

    python benchmarks/labeler_scaling.py                          # this checkout
    python benchmarks/labeler_scaling.py --before 171db9c         # and revision 171db9c (before issue 13's fix)
    python benchmarks/labeler_scaling.py --sizes 2000 20000 --timeout 600

Inputs: ``realistic`` (the hand-written renal cases of tests/data/labeler one after another, cut to the length),
``one sentence`` (the same with every sentence end and colon turned into a comma: one long sentence), and
``deposits, x N`` (the degenerate list without a full stop). Each length runs in a fresh process per revision
(``--before REV`` is exported with ``git archive`` into a temporary folder; no worktree is created), best of
``--repeat`` runs; a run longer than ``--timeout`` seconds is shown as ``> timeout`` and longer lengths of that input
are skipped. Linear code takes about 8 times as long for 8 times the text, quadratic 64 times.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INPUTS = ("realistic", "one sentence", "deposits, x N")

# Run inside a checkout (ours or the export of --before): label one text, print the best time.
_RUN = r"""
import json, re, sys, time
import yaml
from emclip.labels import Labeler
kind, n, reps, cases = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if kind == "deposits, x N":
    text = "deposits, " * (n // 10)
else:
    base = "\n".join(c["text"] for c in yaml.safe_load(open(cases, encoding="utf-8"))["cases"])
    if kind == "one sentence":
        base = re.sub(r"[.;!?:]+(?=\s)", ",", " ".join(base.split()))
    text = (base * (n // len(base) + 1))[:n]
lab = Labeler("renal")
lab.label(text[:200])
best = float("inf")
for _ in range(reps):
    t = time.perf_counter(); lab.label(text); best = min(best, time.perf_counter() - t)
print(json.dumps({"seconds": best, "chars": len(text)}))
"""


def _time(root: Path, kind: str, n: int, reps: int, timeout: float) -> float | None:
    env = dict(os.environ, PYTHONPATH=str(root))
    cases = str(REPO / "tests" / "data" / "labeler" / "renal_cases.yaml")
    try:
        proc = subprocess.run([sys.executable, "-c", _RUN, kind, str(n), str(reps), cases], env=env, cwd=root,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode:
        raise RuntimeError(f"{root}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]


def _column(root: Path, sizes: list[int], reps: int, timeout: float) -> dict[tuple[str, int], float | None]:
    out: dict[tuple[str, int], float | None] = {}
    for kind in INPUTS:
        gave_up = False
        for n in sizes:
            out[kind, n] = None if gave_up else _time(root, kind, n, reps, timeout)
            gave_up = gave_up or out[kind, n] is None
            print(f"  {root.name}: {kind} {n}: {out[kind, n]}", file=sys.stderr, flush=True)
    return out


def _fmt(seconds: float | None, timeout: float) -> str:
    return f"> {timeout:g}" if seconds is None else f"{seconds:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="git revision to compare with (exported into a temporary folder)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 4000, 8000, 16000, 20000, 200000],
                        help="report lengths in characters (default: 2000 ... 20000 and 200000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per length, best shown (default 3)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds before a run is given up (default 120)")
    args = parser.parse_args(argv)
    columns = {"now": _column(REPO, args.sizes, args.repeat, args.timeout)}
    if args.before:
        with tempfile.TemporaryDirectory() as tmp:
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.before, "emclip"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            columns[args.before] = _column(Path(tmp), args.sizes, args.repeat, args.timeout)
    names = list(columns)
    print("| input | characters | " + " | ".join(f"seconds ({n})" for n in names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for kind in INPUTS:
        for n in args.sizes:
            print(f"| {kind} | {n} | " + " | ".join(_fmt(columns[c][kind, n], args.timeout) for c in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
