"""Report text structure for the labeler: sections, sentences and clauses, all as character spans of the report.

Spans (not copies) are passed around so that every mention and cue keeps its offset in the original report, which
the audit needs to show where a label came from.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

# Words before a full stop that do not end a sentence ("vs. FSGS", "approx. 200 nm", "e.g. deposits").
_ABBREV = {"e.g", "i.e", "vs", "approx", "ca", "cf", "dr", "fig", "no", "nos", "etc", "resp", "incl", "al", "st"}
# A run of . ! ? ; ends a sentence when whitespace or the end follows it. The run is matched whole and the test made in
# ``split_sentences``: a lookahead inside the pattern made every position of a long run ("......x") rescan the rest.
_SENT_END = re.compile(r"[.!?;]+|\n[ \t]*(?=\n|[-*\u2022]\s|\d+[.)]\s)")
_WORD_BEFORE = re.compile(r"[\w.]+$")
_ABBREV_WINDOW = 2 + max(map(len, _ABBREV))  # a word longer than any abbreviation needs no more characters read
# An all-capitals phrase at the start of a line followed by a colon is a section header even if the vocabulary does
# not know it ("LIGHT MICROSCOPY:"); mixed-case unknown ones are not, so "Deposits: none." stays a sentence.
_CAPS_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z0-9 /&()'-]{2,50}?)[ \t]*:", re.M)


@dataclass
class Section:
    """A part of the report: ``kind`` is 'diagnosis', 'findings' or 'ignore'; ``name`` is the header as written."""

    kind: str
    name: str
    start: int
    end: int


def _norm(name: str) -> str:
    return re.sub(r"\s+", " ", name.strip().lower())


def _header_kind(name: str, names: dict[str, list[str]]) -> str:
    """Kind of a header the vocabulary does not list verbatim: one that contains an ignored name ("CLINICAL
    DIAGNOSIS (REFERRAL)") is ignored, one that contains a diagnosis name ("FINAL DIAGNOSIS (EM)") is a diagnosis
    section, anything else is findings."""
    for kind in ("ignore", "diagnosis"):
        if any(re.search(rf"\b{re.escape(n)}\b", name) for n in names.get(kind, [])):
            return kind
    return "findings"


def split_sections(text: str, names: dict[str, list[str]]) -> list[Section]:
    """Split a report at its headers; text before the first header is findings.

    ``names`` maps a section kind ('diagnosis', 'findings', 'ignore') to header names (lower case). A known header
    matches anywhere a sentence could start, followed by a colon or dash, or alone on its line; an unknown
    all-capitals header at a line start is a findings section. Header names match whole, so "Clinical diagnosis"
    is not "diagnosis".
    """
    known = {_norm(n): kind for kind, lst in names.items() for n in lst}
    headers: list[tuple[int, int, str, str]] = []  # (start, end_of_header, kind, name)
    if known:
        alts = "|".join(re.escape(n).replace(r"\ ", r"\s+") for n in sorted(known, key=len, reverse=True))
        # (one [ \t]* per gap: two in a row made a long run of spaces quadratic)
        pat = re.compile(rf"(?:^|(?<=[.!?;:])(?=[ \t])|(?<=\n))[ \t]*({alts})s?[ \t]*(?:\([^)\n]{{0,30}}\)[ \t]*)?"
                         rf"(?:[:\u2013\u2014-]|(?=\n|$))", re.IGNORECASE | re.M)
        for m in pat.finditer(text):
            name = _norm(m.group(1))
            headers.append((m.start(1), m.end(), known[name], m.group(1)))
    known_starts = [h[0] for h in headers]  # in order and disjoint (one finditer)
    for m in _CAPS_HEADER.finditer(text):
        k = bisect_right(known_starts, m.start(1)) - 1
        if not (k >= 0 and m.start(1) < headers[k][1]):
            headers.append((m.start(1), m.end(), _header_kind(_norm(m.group(1)), names), m.group(1)))
    headers.sort()
    sections, pos, kind, name = [], 0, "findings", ""
    for start, end, hkind, hname in headers:
        if start < pos:  # overlapping header matches: keep the first
            continue
        if text[pos:start].strip():
            sections.append(Section(kind, name, pos, start))
        pos, kind, name = end, hkind, hname
    if text[pos:].strip():
        sections.append(Section(kind, name, pos, len(text)))
    return sections


def split_sentences(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Sentence spans within ``text[start:end]``, each including its final punctuation, trimmed of whitespace.

    Boundaries: . ! ? ; followed by whitespace (not after an abbreviation such as "vs." or inside a number), a blank
    line, and a line starting with a bullet or a number. A single line break inside a paragraph is not a boundary,
    because wrapped report text breaks lines mid-sentence.
    """
    end = len(text) if end is None else end
    spans, s = [], start
    for m in _SENT_END.finditer(text, start, end):
        if m.group()[0] != "\n" and m.end() < end and not text[m.end()].isspace():
            continue  # punctuation inside a token ("3.5", "e.g.,")
        if m.group().startswith("?") and m.start() > start and text[m.start() - 1].isspace():
            continue  # "vasculature, ? early CHF": a spaced question mark is a query cue, not a sentence end
        if m.group().startswith("."):
            word = _WORD_BEFORE.search(text, max(s, m.start() - _ABBREV_WINDOW), m.start())
            if word and word.group().lower().rstrip(".") in _ABBREV:
                continue
        spans.append((s, m.end()))
        s = m.end()
    spans.append((s, end))
    out = []
    for a, b in spans:
        seg = text[a:b]
        lead, trail = len(seg) - len(seg.lstrip()), len(seg) - len(seg.rstrip())
        if seg.strip():
            out.append((a + lead, b - trail))
    return out


def clause_bounds(sentence: str, hard: list[int], verbs: re.Pattern | None) -> list[int]:
    """Positions inside a sentence where a cue's scope ends: the ``hard`` ones (terminators such as "but") plus
    commas and "and" that join two clauses.

    A comma or "and" joins two clauses, rather than items of a list, when the text on each side (back to the previous
    boundary, and on to the end of the stretch) holds a verb: "The GBM is thin, and no deposits are seen" splits,
    "No deposits, fibrils and inclusions are seen" does not.
    """
    bounds = sorted(set([0, len(sentence)] + hard))
    if verbs is None:
        return bounds
    # Each verb is found once, in order and only as far as a question needs (finditer, resumed), and "a verb in
    # [lo, hi)" is a binary search: searching every stretch anew made a long verbless list ("deposits, deposits,
    # ...") quadratic.
    found: list[tuple[int, int]] = []
    starts: list[int] = []
    pending = [verbs.finditer(sentence)]

    def has_verb(lo: int, hi: int) -> bool:
        while pending and (not starts or starts[-1] < lo):
            m = next(pending[0], None)
            if m is None:
                pending.clear()
            else:
                found.append((m.start(), m.end()))
                starts.append(m.start())
        i = bisect_left(starts, lo)
        return i < len(found) and found[i][1] <= hi

    out = [0]
    for a, b in zip(bounds, bounds[1:]):
        last = a
        for m in re.finditer(r",(?:\s*and\b)?|\band\b", sentence[a:b]):
            pos = a + m.start()
            if pos <= last:
                continue
            if has_verb(last, pos) and has_verb(a + m.end(), b):
                out.append(pos)
                last = pos
        out.append(b)
    return sorted(set(out))
