"""The report labeler runs in time linear in the report's length (issue 13).

It used to be quadratic or worse: a 20 kB report took seconds, and ``"deposits, " * 20000`` (one "sentence" of
200 kB, no full stop) more than five minutes. The checks here never compare with an absolute time, since the machine
is shared and noisy; they compare a text of length N with one of length 8N in the same run:

* **work counted deterministically**: Python lines executed inside ``emclip.labels`` and characters handed to the
  vocabulary's regular expressions. Linear code does about 8 times the work for 8 times the text; quadratic code 64.
* **time**: the best of 3 runs at N and at 8N, side by side; a run at 8N is cut off once it is clearly too slow.

Both must stay under 8 x 2.5 = 20. The fast scope lookup (``_Scopes``) and verb search (``clause_bounds``) must also
give exactly what the plain scans they replace gave; those scans are kept below as the reference.
"""
from __future__ import annotations

import functools
import random
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from emclip.labels import Labeler
from emclip.labels import labeler as labeler_module
from emclip.labels import text as text_module
from emclip.labels.text import clause_bounds

CASES = Path(__file__).parent / "data" / "labeler"
LIMIT = 8 * 2.5  # allowed growth of work or time for 8 times the text; quadratic would be 64
LABELS_DIR = str(Path(labeler_module.__file__).resolve().parent)


def realistic(n_chars: int, cases: str = "renal_cases.yaml", one_sentence: bool = False) -> str:
    """Hand-written report texts one after another, cut to ``n_chars`` (with ``one_sentence``: no sentence ends)."""
    texts = [c["text"] for c in yaml.safe_load((CASES / cases).read_text(encoding="utf-8"))["cases"]]
    text = "\n".join(texts)
    if one_sentence:
        text = re.sub(r"[.;!?:]+(?=\s)", ",", " ".join(text.split()))
    return (text * (n_chars // len(text) + 1))[:n_chars]


def repeated(unit: str, n_chars: int) -> str:
    return (unit * (n_chars // len(unit) + 1))[:n_chars]


# ------------------------------------------------------------------------------------------ deterministic work count
class _CountedPattern:
    """A compiled regex that adds the length of every text window it is asked to scan to a counter."""

    def __init__(self, rx: re.Pattern, counter: list[int]):
        self.rx, self.counter = rx, counter
        self.groupindex = rx.groupindex

    def _count(self, string: str, pos: int, endpos: int) -> None:
        self.counter[0] += max(0, min(endpos, len(string)) - pos)

    def finditer(self, string, pos=0, endpos=sys.maxsize):
        self._count(string, pos, endpos)
        return self.rx.finditer(string, pos, endpos)

    def search(self, string, pos=0, endpos=sys.maxsize):
        self._count(string, pos, endpos)
        return self.rx.search(string, pos, endpos)


@functools.lru_cache(maxsize=None)
def _counting_labeler(vocab: str) -> tuple[Labeler, list[int]]:
    """A labeler whose vocabulary patterns count the characters they scan."""
    lab, counter = Labeler(vocab), [0]
    v = lab.vocab
    phrases = [p for spec in v.labels.values() for group in (spec.patterns, spec.absent, spec.ambiguous, spec.hedged)
               for p in group] + [p for _, p in v.cues]
    for p in phrases:
        p.rx = _CountedPattern(p.rx, counter)
    v.terminators = [_CountedPattern(t, counter) for t in v.terminators]
    if v.verbs is not None:
        v.verbs = _CountedPattern(v.verbs, counter)
    for m in v.measurements:
        m.subject = _CountedPattern(m.subject, counter)
        if m.exclude is not None:
            m.exclude = _CountedPattern(m.exclude, counter)
    return lab, counter


def _work(lab: Labeler, counter: list[int], text: str) -> tuple[int, int]:
    """(Python lines executed in emclip/labels, characters given to vocabulary regexes) for labelling ``text``."""
    lines = [0]

    def local(frame, event, arg):
        if event == "line":
            lines[0] += 1
        return local

    def global_(frame, event, arg):
        return local if frame.f_code.co_filename.startswith(LABELS_DIR) else None

    counter[0] = 0
    # the sentence splitter's own patterns count too
    saved = {name: getattr(text_module, name) for name in ("_SENT_END", "_WORD_BEFORE")}
    for name, rx in saved.items():
        setattr(text_module, name, _CountedPattern(rx, counter))
    previous = sys.gettrace()
    sys.settrace(global_)
    try:
        lab.label(text)
    finally:
        sys.settrace(previous)
        for name, rx in saved.items():
            setattr(text_module, name, rx)
    return lines[0], counter[0]


WORK_INPUTS = {  # name: (vocabulary, text of a length, N)
    "deposits, x N (no full stop)": ("renal", lambda n: repeated("deposits, ", n), 1000),
    "no deposits suggest x N": ("renal", lambda n: repeated("no deposits suggest ", n), 1000),
    "x vs y x N": ("chexpert", lambda n: repeated("effusion vs atelectasis ", n), 1000),
    "vs. x N (abbreviations: no sentence end)": ("renal", lambda n: repeated("FSGS vs. ", n), 1000),
    "realistic renal reports": ("renal", realistic, 500),
    "realistic, one sentence": ("renal", lambda n: realistic(n, one_sentence=True), 500),
    "realistic chest reports": ("chexpert", lambda n: realistic(n, "chexpert_cases.yaml"), 500),
}


@pytest.mark.parametrize("name", list(WORK_INPUTS))
def test_work_grows_linearly(name):
    vocab, make, n = WORK_INPUTS[name]
    lab, counter = _counting_labeler(vocab)
    (lines_1, chars_1), (lines_8, chars_8) = _work(lab, counter, make(n)), _work(lab, counter, make(8 * n))
    assert lines_1 > 0 and chars_1 > 0
    assert lines_8 / lines_1 < LIMIT, f"{name}: {lines_1} -> {lines_8} Python lines for 8x the text"
    assert chars_8 / chars_1 < LIMIT, f"{name}: {chars_1} -> {chars_8} characters scanned for 8x the text"


# ------------------------------------------------------------------------------------------------------ timings
class _TooSlow(Exception):
    pass


def _timed(lab: Labeler, text: str, deadline: float | None = None) -> float:
    """Seconds to label ``text``; ``deadline`` (seconds) stops a run that is far too slow and returns the deadline."""
    use_alarm = (deadline is not None and threading.current_thread() is threading.main_thread()
                 and hasattr(signal, "setitimer") and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None))
    if use_alarm:
        def stop(signum, frame):
            raise _TooSlow

        old = signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, deadline)
    t0 = time.perf_counter()
    try:
        lab.label(text)
        return time.perf_counter() - t0
    except _TooSlow:
        return deadline
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


def _time_ratio(lab: Labeler, small: str, large: str, reps: int = 3) -> tuple[float, float]:
    """Best of ``reps`` seconds for ``small`` and for ``large``, runs interleaved so that load hits both alike; it stops
    early once the ratio is below half the limit (clearly linear), to keep the test short."""
    lab.label(small[:200])  # warm up (regex caches)
    t_small, t_large = [], []
    for _ in range(reps):
        t_small.append(_timed(lab, small))
        t_large.append(_timed(lab, large, deadline=3 * LIMIT * min(t_small) + 0.5))
        if min(t_large) / min(t_small) < LIMIT / 2:
            break
    return min(t_small), min(t_large)


TIME_INPUTS = {  # name: (vocabulary, text of a length, N); regex backtracking shows only here, not in the counts
    "deposits, x N (no full stop)": ("renal", lambda n: repeated("deposits, ", n), 2000),
    "mesangial, x N (a list without its head word)": ("renal", lambda n: repeated("mesangial, ", n), 2000),
    "realistic renal reports, 2 kB vs 16 kB": ("renal", realistic, 2000),
}


@pytest.mark.parametrize("name", list(TIME_INPUTS))
def test_time_grows_linearly(name, renal, chexpert):
    vocab, make, n = TIME_INPUTS[name]
    lab = renal if vocab == "renal" else chexpert
    t1, t8 = _time_ratio(lab, make(n), make(8 * n))
    assert t8 / t1 < LIMIT, f"{name}: {t1:.3f} s -> {t8:.3f} s for 8x the text (ratio {t8 / t1:.1f})"


# --------------------------------------------------------------------- exactness of the fast lookups (vs the scans)
def _reference_classify(start, end, cues, bounds, spans):
    """The per-mention scan over every cue that ``_Scopes.classify`` replaced (as it was before issue 13)."""
    c_lo = max(b for b in bounds if b <= start)
    c_hi = min(b for b in bounds if b >= end)
    hits: dict[str, str] = {}
    for i, cue in enumerate(cues):
        if cue.type.endswith("_both"):
            lo, hi = (cue.end, start) if cue.end <= start else (end, cue.start)
            if lo <= hi and c_lo <= min(cue.start, start) and max(cue.end, end) <= c_hi and not any(
                    lo <= s and e <= hi for s, e in spans):
                hits.setdefault("uncertainty_both", cue.text)
            continue
        if cue.type.endswith("_pre"):
            if c_lo <= cue.start and cue.end <= start:
                nxt = [c.start for c in cues[i + 1:] if c.start >= cue.end and c.type.endswith("_pre")]
                if not nxt or start < nxt[0]:
                    hits.setdefault(cue.type.split("_")[0], cue.text)
        if cue.type.endswith("_post"):
            if end <= cue.start and cue.end <= c_hi:
                prv = [c.end for c in cues[:i] if c.end <= cue.start and c.type.endswith("_post")]
                if not prv or start >= prv[-1]:
                    hits.setdefault(cue.type.split("_")[0], cue.text)
    if "uncertainty" in hits:
        return labeler_module.UNCERTAIN, hits["uncertainty"]
    if "negation" in hits:
        return labeler_module.NEGATIVE, hits["negation"]
    if "uncertainty_both" in hits:
        return labeler_module.UNCERTAIN, hits["uncertainty_both"]
    return labeler_module.POSITIVE, ""


def _random_layout(rng: random.Random):
    """Mentions and cues on a line of slots as ``_sentence`` makes them: cues sorted by start, pairwise identical or
    disjoint, none overlapping a mention; mentions pairwise identical or disjoint; clause bounds anywhere."""
    pos, spans, cues = 0, [], []
    types = ["negation_pre", "negation_post", "uncertainty_pre", "uncertainty_post", "uncertainty_both",
             "affirmation_pre"]
    for k in range(rng.randint(1, 14)):
        pos += rng.randint(0, 3)
        length = rng.randint(1, 4)
        if rng.random() < 0.45:
            for _ in range(1 + (rng.random() < 0.15)):  # sometimes the same span twice
                spans.append((pos, pos + length))
        else:
            for _ in range(1 + (rng.random() < 0.2)):
                cues.append(labeler_module._Cue(rng.choice(types), pos, pos + length, f"cue{k}"))
        pos += length
    n = pos + rng.randint(0, 3)
    bounds = sorted({0, n} | {rng.randint(0, n) for _ in range(rng.randint(0, 4))})
    return spans, cues, bounds


def test_scopes_match_the_reference_scan():
    rng = random.Random(13)
    checked = 0
    for _ in range(3000):
        spans, cues, bounds = _random_layout(rng)
        scopes = labeler_module._Scopes(cues, bounds, spans)
        for s, e in spans:
            assert scopes.classify(s, e) == _reference_classify(s, e, cues, bounds, spans), (s, e, cues, bounds, spans)
            checked += 1
    assert checked > 4000


def _reference_clause_bounds(sentence, hard, verbs):
    bounds = sorted(set([0, len(sentence)] + hard))
    out = [0]
    for a, b in zip(bounds, bounds[1:]):
        last = a
        for m in re.finditer(r",(?:\s*and\b)?|\band\b", sentence[a:b]):
            pos = a + m.start()
            if pos <= last:
                continue
            if verbs.search(sentence, last, pos) and verbs.search(sentence, a + m.end(), b):
                out.append(pos)
                last = pos
        out.append(b)
    return sorted(set(out))


def test_clause_bounds_match_the_reference_search(renal):
    rng = random.Random(7)
    words = ["deposits", "are", "is", "seen", ",", "and", "no", "fibrils", "the", "GBM", "thin", "shows", "but",
             ", and", "measures", "180 nm", "foot", "processes"]
    verbs = renal.vocab.verbs
    for _ in range(1000):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(1, 25)))
        hard = [m.start() for m in re.finditer(r"\bbut\b", sentence)]
        assert clause_bounds(sentence, hard, verbs) == _reference_clause_bounds(sentence, hard, verbs), sentence


def test_long_inputs_label_as_their_short_parts(renal):
    """Scaling up changes nothing per part: each "no deposits." sentence is a negative mention."""
    text = "No deposits. " * 300
    result = renal.label(text)
    assert result.values["electron-dense deposits"] == 0
    assert len(result.mentions) == 300 and {m.value for m in result.mentions} == {0}
