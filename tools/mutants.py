"""Hand-made mutation testing: break the code on purpose, one breakage at a time, and check that a test notices.

Each mutant in ``tools/mutants.yaml`` names a file, an exact ``old`` text (it must occur exactly once), the ``new``
text that replaces it, why the behaviour matters, and the pytest selection expected to catch it. This script copies
the git-tracked files into a temporary folder, applies one mutant there, runs its selection with a timeout and
restores the file, then prints a markdown table:

* ``caught``   the selection failed (what we want);
* ``survived`` the selection passed with the code broken: a behaviour without a test;
* ``timeout``  the selection did not finish in time (counted as not caught);
* ``stale``    the ``old`` text is not in the file (or not exactly once): the mutant must be updated (loud error);
* ``error``    pytest could not run the selection (collection error, no test selected).

Usage (from the repository root, with the project's environment)::

    python tools/mutants.py                   # every mutant
    python tools/mutants.py --only bags-mask-all-real --only auc-ranks-flipped
    python tools/mutants.py --baseline        # also run every selection unmutated first (each must pass)
    python tools/mutants.py --out reports/mutants.md

Exit status 0 only when every mutant run was caught (and every baseline passed).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "--no-header"]
REQUIRED = ("id", "file", "old", "new", "why", "tests")


def load_mutants(path: Path) -> list[dict]:
    mutants = yaml.safe_load(path.read_text())["mutants"]
    seen = set()
    for i, m in enumerate(mutants):
        missing = [k for k in REQUIRED if k not in m]
        if missing:
            raise SystemExit(f"{path}: mutant {i} ({m.get('id', '?')}) lacks {', '.join(missing)}")
        if m["id"] in seen:
            raise SystemExit(f"{path}: duplicate mutant id {m['id']!r}")
        if m["old"] == m["new"]:
            raise SystemExit(f"{path}: mutant {m['id']!r} changes nothing")
        seen.add(m["id"])
    return mutants


def copy_tracked(dest: Path) -> None:
    """The git-tracked files of the repository (as they are in the working tree) into ``dest``."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def failing_tests(output: str) -> list[str]:
    """Node ids of the failed tests in pytest's short summary (``-ra``), without the parameter id's message."""
    return [line.split(" ", 1)[1].split(" - ", 1)[0] for line in output.splitlines()
            if line.startswith(("FAILED ", "ERROR ")) and " " in line]


def run_pytest(root: Path, tests: list[str], timeout: float) -> tuple[str, float, str]:
    """(outcome, seconds, pytest's output) of one pytest selection run inside ``root``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               PYTHONDONTWRITEBYTECODE="1")
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", *PYTEST_ARGS, *tests], cwd=root, env=env,
                              capture_output=True, text=True, timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"")
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        return "timeout", time.perf_counter() - start, out
    seconds = time.perf_counter() - start
    outcome = {0: "passed", 1: "failed"}.get(proc.returncode, f"error (pytest exit {proc.returncode})")
    return outcome, seconds, proc.stdout + proc.stderr


def apply(root: Path, mutant: dict) -> str | None:
    """Apply the mutant inside ``root``; returns the original text (None when the mutant is stale)."""
    path = root / mutant["file"]
    if not path.is_file():
        return None
    text = path.read_text()
    if text.count(mutant["old"]) != 1:
        return None
    path.write_text(text.replace(mutant["old"], mutant["new"]))
    return text


def _tail(output: str, n: int = 15) -> str:
    return "\n".join(output.strip().splitlines()[-n:])


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mutants", default=str(REPO / "tools" / "mutants.yaml"))
    ap.add_argument("--only", action="append", default=[], help="run only this mutant id (repeatable)")
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per selection (a mutant may set its own)")
    ap.add_argument("--baseline", action="store_true", help="first run every selection on the unmutated copy")
    ap.add_argument("--verbose", "-v", action="store_true", help="print pytest's last lines for every run")
    args = ap.parse_args(argv)

    mutants = load_mutants(Path(args.mutants))
    if args.only:
        unknown = sorted(set(args.only) - {m["id"] for m in mutants})
        if unknown:
            raise SystemExit(f"no mutant with id {', '.join(unknown)}")
        mutants = [m for m in mutants if m["id"] in args.only]

    rows, bad = [], 0
    with tempfile.TemporaryDirectory(prefix="emclip-mutants-") as tmp:
        root = Path(tmp) / "repo"
        copy_tracked(root)
        if args.baseline:
            for tests in dict.fromkeys(tuple(m["tests"]) for m in mutants):
                outcome, seconds, output = run_pytest(root, list(tests), args.timeout)
                print(f"baseline {' '.join(tests)}: {outcome} in {seconds:.0f} s", file=sys.stderr, flush=True)
                if outcome != "passed":
                    bad += 1
                    print(_tail(output), file=sys.stderr)
        for m in mutants:
            original = apply(root, m)
            if original is None:
                outcome, seconds, output = "stale", 0.0, ""
                print(f"STALE MUTANT {m['id']}: its old text is not exactly once in {m['file']}: update "
                      f"tools/mutants.yaml", file=sys.stderr, flush=True)
            else:
                try:
                    result, seconds, output = run_pytest(root, list(m["tests"]), m.get("timeout", args.timeout))
                finally:
                    (root / m["file"]).write_text(original)
                outcome = {"failed": "caught", "passed": "survived"}.get(result, result)
            bad += outcome != "caught"
            by = failing_tests(output) if outcome == "caught" else []
            print(f"{m['id']}: {outcome} in {seconds:.0f} s {' '.join(by)}", file=sys.stderr, flush=True)
            if args.verbose or outcome != "caught":
                print(_tail(output), file=sys.stderr)
            rows.append((m, outcome, seconds, by))

    lines = ["| id | file | breakage (why it matters) | selection | result | caught by | s |",
             "|---|---|---|---|---|---|---|"]
    for m, outcome, seconds, by in rows:
        lines.append(f"| {m['id']} | {m['file']} | {_cell(m['why'])} | {_cell(' '.join(m['tests']))} | "
                     f"{outcome} | {_cell(', '.join(by))} | {seconds:.0f} |")
    counts = {k: sum(r[1] == k for r in rows) for k in ("caught", "survived", "timeout", "stale")}
    lines.append("")
    lines.append(f"{len(rows)} mutants: " + ", ".join(f"{v} {k}" for k, v in counts.items()) +
                 f"; {sum(r[2] for r in rows):.0f} s of tests")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
