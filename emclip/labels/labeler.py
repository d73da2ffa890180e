"""Rule-based report labeler: label mentions, negation and uncertainty from local context, aggregation per report.

The three stages follow CheXpert's labeler (which builds on NegBio), re-implemented here on regular expressions:

1. **Extraction**: every mention of a label (synonyms, abbreviations, spelling and plural variants, from the
   vocabulary) in every sentence; overlapping mentions keep the longest ("thin basement membrane nephropathy" is one
   diagnosis, not also a thin GBM). Absence phrases ("foot processes are preserved") are negative mentions, and
   measurements ("GBMs measure 180 nm") set labels by range.
2. **Classification** of each mention as positive (1), uncertain (-1) or negative (0) from cues in its clause: a pre-cue
   ("no", "cannot exclude") covers what follows it up to the clause end or the next cue; a post-cue
   ("are not identified", "cannot be excluded") covers what precedes it back to the clause start. Clauses end at the
   sentence end, at terminators ("but", "however", "although") and at commas / "and" that join two clauses.
   Uncertainty outranks negation, as in CheXpert ("no definite deposits" is uncertain).
3. **Aggregation** per label: positive > uncertain > negative > not mentioned. Then the hierarchy: a positive
   (uncertain) child makes its parents positive (at least uncertain); a negative parent makes its unmentioned
   children negative ("no deposits" means no mesangial deposits). Then the No-Finding rule, and the primary
   diagnosis: from the diagnosis section when it names one, else from the whole report, else inferred from findings.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ..progress import bars_disabled
from .text import Section, clause_bounds, split_sections, split_sentences
from .vocab import Vocabulary, load_vocab

POSITIVE, UNCERTAIN, NEGATIVE = 1, -1, 0
# How the label columns of a labels table code an uncertain mention (CheXpert's U-Ignore / U-Ones / U-Zeros).
UNCERTAIN_CODINGS = {"keep": {}, "positive": {UNCERTAIN: POSITIVE}, "negative": {UNCERTAIN: NEGATIVE}}
_RANK = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1, None: 0}  # CheXpert's aggregation priority
# A length: "180 nm", "8-12 nm", "8 to 12 nm", "180 ± 25 nm", "0.2 µm".
_NUMBER = re.compile(r"(\d+(?:\.\d+)?(?:\s*(?:-|\u2013|to)\s*\d+(?:\.\d+)?)?)\s*"
                     r"(?:(?:\u00b1|\+/-)\s*(\d+(?:\.\d+)?)\s*)?(nm|[\u00b5\u03bc]m|um|microns?)\b")


@dataclass
class Mention:
    """One mention of a label: where it is, what decided its value, and which kind of section it sits in."""

    label: str
    text: str
    start: int
    end: int
    section: str
    value: int
    cue: str = ""
    source: str = "phrase"  # 'phrase', 'absent' (absence phrase), 'ambiguous' or 'measurement'


@dataclass
class ReportLabels:
    """Labels of one report: ``values`` maps each output label to 1 / 0 / -1 / None (not mentioned)."""

    values: dict[str, int | None]
    primary: str | None
    primary_source: str
    mentions: list[Mention] = field(default_factory=list)
    primary_value: int | None = None  # POSITIVE, or UNCERTAIN when the report only hedges it; None without one


@dataclass
class _Cue:
    type: str
    start: int
    end: int
    text: str


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _longest_first(items: list, span) -> list:
    """Keep non-overlapping items, longer spans first; items with an identical span are all kept.

    The kept spans are pairwise identical or disjoint, so an item overlaps a kept one exactly when it is not one of
    the kept spans and one of its characters is already covered: a coverage mask makes each check cost the item's
    length instead of the number kept (which made a long sentence quadratic)."""
    spans = [span(it) for it in items]
    if any(e <= s for s, e in spans):  # an empty span overlaps nothing by characters: keep the pairwise rule
        kept: list = []
        for it in sorted(items, key=lambda x: (-(span(x)[1] - span(x)[0]), span(x)[0])):
            s = span(it)
            if all(s == span(k) or not _overlaps(s, span(k)) for k in kept):
                kept.append(it)
        return sorted(kept, key=lambda x: span(x)[0])
    covered = bytearray(max((e for _, e in spans), default=0))
    kept_spans: set[tuple[int, int]] = set()
    kept_idx = []
    for i in sorted(range(len(items)), key=lambda i: (spans[i][0] - spans[i][1], spans[i][0])):
        s, e = spans[i]
        if (s, e) in kept_spans:
            kept_idx.append(i)
        elif covered.find(1, s, e) < 0:
            covered[s:e] = b"\x01" * (e - s)
            kept_spans.add((s, e))
            kept_idx.append(i)
    return sorted((items[i] for i in kept_idx), key=lambda x: span(x)[0])


def _coverage(spans, length: int) -> bytearray:
    """1 at every character covered by one of ``spans``."""
    covered = bytearray(length)
    for s, e in spans:
        if e > s:
            covered[s:e] = b"\x01" * (e - s)
    return covered


class _Scopes:
    """Which cues of a sentence govern a mention, answered by binary search instead of a scan of every cue.

    Built on the invariants of :meth:`Labeler._sentence`: cues are sorted by start and pairwise identical or disjoint
    (``_longest_first``), and no cue overlaps a mention. Then a pre cue reaches a mention only if it is (one of) the
    last pre cue(s) before it, since the next pre cue ends a pre cue's scope; a post cue only if it is (one of) the
    first after it; a "both" cue only if no whole mention lies between the two. The rules are those of the scan they
    replace (kept in tests/test_labeler_scaling.py as the reference), at O(log n) per mention."""

    def __init__(self, cues: list[_Cue], bounds: list[int], spans: list[tuple[int, int]]):
        self.bounds = bounds
        self.pre = [c for c in cues if c.type.endswith("_pre")]
        self.post = [c for c in cues if c.type.endswith("_post")]
        self.both = [c for c in cues if c.type.endswith("_both")]
        self.pre_starts = [c.start for c in self.pre]
        self.post_starts = [c.start for c in self.post]
        self.both_starts = [c.start for c in self.both]
        self.both_ends = [c.end for c in self.both]
        # the last mention start among mentions ending by x, and the first mention end among mentions starting from x
        by_end = sorted(spans, key=lambda x: x[1])
        self.ends, self.max_start, best = [e for _, e in by_end], [], -1
        for s, _ in by_end:
            best = max(best, s)
            self.max_start.append(best)
        by_start = sorted(spans)
        self.starts, self.min_end, best = [s for s, _ in by_start], [0] * len(by_start), float("inf")
        for k in range(len(by_start) - 1, -1, -1):
            best = min(best, by_start[k][1])
            self.min_end[k] = best

    def classify(self, start: int, end: int) -> tuple[int, str]:
        """Value of a mention at [start, end) from the cues whose scope covers it (uncertainty > negation)."""
        bounds = self.bounds
        c_lo = bounds[bisect_right(bounds, start) - 1]
        c_hi = bounds[bisect_left(bounds, end)]
        hits: dict[str, str] = {}
        # a pre cue covers what follows it up to the clause end or the next pre cue
        j = bisect_right(self.pre_starts, start) - 1
        if j >= 0 and c_lo <= self.pre_starts[j]:
            for cue in self.pre[bisect_left(self.pre_starts, self.pre_starts[j]):j + 1]:
                if cue.end <= start:
                    hits.setdefault(cue.type.split("_")[0], cue.text)
        # a post cue covers what precedes it back to the clause start or the previous post cue
        j = bisect_left(self.post_starts, end)
        if j < len(self.post):
            for cue in self.post[j:bisect_right(self.post_starts, self.post_starts[j])]:
                if cue.end <= c_hi:
                    hits.setdefault(cue.type.split("_")[0], cue.text)
        if "uncertainty" in hits:
            return UNCERTAIN, hits["uncertainty"]
        if "negation" in hits:  # "no effusion and/or pneumothorax": a negated alternative is still negated
            return NEGATIVE, hits["negation"]
        # "A versus B" covers only the mentions next to it on either side, in its clause: the first such cue counts
        k = bisect_right(self.ends, start) - 1
        last_start_before = self.max_start[k] if k >= 0 else -1  # no mention may lie between cue and mention
        i = max(bisect_right(self.both_ends, last_start_before), bisect_left(self.both_starts, c_lo))
        if i < len(self.both) and self.both_ends[i] <= start:
            return UNCERTAIN, self.both[i].text
        i = bisect_left(self.both_starts, end)
        if i < len(self.both):
            k = bisect_left(self.starts, end)
            first_end_after = self.min_end[k] if k < len(self.starts) else float("inf")
            if self.both[i].end <= c_hi and self.both_starts[i] < first_end_after:
                return UNCERTAIN, self.both[i].text
        return POSITIVE, ""


def _parse_number(text: str) -> tuple[float, float]:
    """'180', '8-12', '8 to 12', '0.2' -> (low, high)."""
    nums = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", text)]
    return (nums[0], nums[-1]) if nums else (float("nan"), float("nan"))


class Labeler:
    """Labels free-text reports with a vocabulary (a name of a bundled one, a path, or a loaded Vocabulary)."""

    def __init__(self, vocab: str | Path | Vocabulary = "renal"):
        self.vocab = vocab if isinstance(vocab, Vocabulary) else load_vocab(vocab)
        self.labels = self.vocab.output_labels()
        # Children before parents, so that one upward pass rolls a grandchild up to its grandparent.
        depth = {n: len(self.vocab.ancestors(n)) for n in self.vocab.labels}
        self._bottom_up = sorted(self.vocab.labels, key=lambda n: -depth[n])

    # ---------------------------------------------------------------- extraction and classification, per sentence
    def _candidates(self, sent: str) -> list[tuple[int, int, str, str, int | None]]:
        """(start, end, label, source, fixed value or None) for every pattern, absence phrase and measurement."""
        out, lower = [], sent.lower()
        for spec in self.vocab.labels.values():
            for source, pats in (("phrase", spec.patterns), ("absent", spec.absent), ("ambiguous", spec.ambiguous),
                                 ("hedged", spec.hedged)):
                for pat in pats:
                    for m in pat.finditer(sent, lower):
                        g = "m" if "m" in pat.rx.groupindex and m.group("m") else 0
                        if m.end(g) > m.start(g):
                            out.append((m.start(g), m.end(g), spec.name, source, None))
        return out + self._measurements(sent)

    def _measurements(self, sent: str) -> list[tuple[int, int, str, str, int | None]]:
        """Labels set by a length after a subject ("GBMs measure 180 nm" -> thin GBM positive, thick GBM negative)."""
        out = []
        for meas in self.vocab.measurements:
            for subj in meas.subject.finditer(sent):
                num = _NUMBER.search(sent, subj.end(), min(len(sent), subj.end() + meas.window))
                if not num or (meas.exclude and meas.exclude.search(sent, subj.end(), num.start())):
                    continue
                lo, hi = _parse_number(num.group(1))
                sd = float(num.group(2) or 0)
                # a wide range ("120 to 900 nm") or spread ("450 ± 200 nm") describes irregularity, not one value
                if hi > 3 * lo or sd > 0.35 * lo:
                    continue
                if num.group(3) != "nm":
                    lo, hi = lo * 1000, hi * 1000
                value = (lo + hi) / 2
                for r in meas.ranges:
                    if r.get("min", float("-inf")) <= value < r.get("max", float("inf")):
                        for key, val in (("positive", POSITIVE), ("negative", NEGATIVE)):
                            labels = r.get(key) or []
                            for lab in [labels] if isinstance(labels, str) else labels:
                                out.append((num.start(), num.end(), lab, "measurement", val))
        return out

    def _cues(self, sent: str, mentions: list[tuple]) -> tuple[list[_Cue], list[int]]:
        """Cues of the sentence (longest first, none inside a mention) and the positions of terminators."""
        lower = sent.lower()
        found = [_Cue(t, m.start(), m.end(), m.group()) for t, pat in self.vocab.cues
                 for m in pat.finditer(sent, lower) if m.end() > m.start()]
        in_mention = _coverage(((m[0], m[1]) for m in mentions), len(sent))
        found = [c for c in found if in_mention.find(1, c.start, c.end) < 0]
        cues = [c for c in _longest_first(found, lambda c: (c.start, c.end)) if c.type != "pseudo"]
        in_cue = _coverage(((c.start, c.end) for c in cues), len(sent))
        hard = [m.start() for pat in self.vocab.terminators for m in pat.finditer(sent)
                if not (m.start() < len(sent) and in_cue[m.start()])]
        return cues, hard

    @staticmethod
    def _resolve_evidence(sent: str, cues: list[_Cue], bounds: list[int]) -> list[_Cue]:
        """Evidential cues ("to suggest", "concerning for") become pre cues: negations when a negation pre cue governs
        them (same clause, no comma between, at most 80 characters before), uncertainty otherwise. So "no focal
        opacity to suggest pneumonia" negates the pneumonia, and "opacity suggests pneumonia" hedges it."""
        out: list[_Cue] = []
        pre: list[_Cue] = []  # the pre cues of ``out``, in order
        for cue in cues:
            if cue.type == "uncertainty_evidence":
                lo = bounds[bisect_right(bounds, cue.start) - 1]
                # the last pre cue ending before this one (cues are sorted and identical or disjoint, so only
                # cues with this very span are skipped), if it starts in this clause
                k = len(pre) - 1
                while k >= 0 and pre[k].end > cue.start:
                    k -= 1
                prev = pre[k] if k >= 0 and pre[k].start >= lo else None
                governed = (prev is not None and prev.type == "negation_pre" and cue.start - prev.end <= 80
                            and "," not in sent[prev.end:cue.start])
                cue = _Cue("negation_pre" if governed else "uncertainty_pre", cue.start, cue.end, cue.text)
            out.append(cue)
            if cue.type.endswith("_pre"):
                pre.append(cue)
        return out

    def _sentence(self, text: str, start: int, end: int, section: str) -> list[Mention]:
        sent = text[start:end]
        cands = _longest_first(self._candidates(sent), lambda c: (c[0], c[1]))
        # An ambiguous mention ("the cardiac contours") counts only when the sentence says nothing clearer about
        # its label: "heart size is not enlarged" is negative, not negative and uncertain.
        clear = {c[2] for c in cands if c[3] not in ("ambiguous", "hedged")}
        cands = [c for c in cands if not (c[3] in ("ambiguous", "hedged") and c[2] in clear)]
        if not cands:  # nothing to classify: skip the cue search
            return []
        cues, hard = self._cues(sent, cands)
        bounds = clause_bounds(sent, hard, self.vocab.verbs)
        cues = self._resolve_evidence(sent, cues, bounds)
        scopes = _Scopes(cues, bounds, [(c[0], c[1]) for c in cands])
        out = []
        for s, e, label, source, fixed in cands:
            if fixed is not None:
                value, cue = fixed, ""
            else:
                value, cue = scopes.classify(s, e)
                if source == "absent":  # an absence phrase is negative; negated ("not preserved") it is positive
                    value = {POSITIVE: NEGATIVE, NEGATIVE: POSITIVE}.get(value, value)
                elif source == "ambiguous":  # CheXpert's "ambiguous language": uncertain unless negated
                    value = NEGATIVE if value == NEGATIVE else UNCERTAIN
                elif source == "hedged" and value == POSITIVE:  # "the cardiac silhouette is stable" says nothing
                    continue
            out.append(Mention(label, sent[s:e], start + s, start + e, section, value, cue, source))
        return out

    # ---------------------------------------------------------------- aggregation, per report
    @staticmethod
    def _aggregate(mentions: list[Mention]) -> dict[str, int | None]:
        values: dict[str, int | None] = {}
        for m in mentions:
            if _RANK[m.value] > _RANK[values.get(m.label)]:
                values[m.label] = m.value
        return values

    def _hierarchy(self, values: dict[str, int | None]) -> dict[str, int | None]:
        for name in self._bottom_up:  # upward: positive / uncertain children lift their parents
            v = values.get(name)
            if v == POSITIVE or (v == UNCERTAIN and self.vocab.roll_up_uncertain):
                for p in self.vocab.labels[name].parents:
                    if _RANK[v] > _RANK[values.get(p)]:
                        values[p] = v
        if self.vocab.negate_children:
            for name in reversed(self._bottom_up):  # downward: a negative parent negates unmentioned children
                parents = self.vocab.labels[name].parents
                if values.get(name) is None and any(values.get(p) == NEGATIVE for p in parents):
                    values[name] = NEGATIVE
        return values

    def _no_finding(self, values: dict[str, int | None], mentioned_any: bool) -> None:
        """CheXpert's "No Finding": positive only if every other label (bar the ignored) is negative or unmentioned
        and no other finding (suppressor phrase) is mentioned positively or uncertainly."""
        nf = self.vocab.no_finding
        if not nf:
            return
        label, ignore = nf["label"], set(nf.get("ignore") or []) | {nf["label"]}
        # the suppressors are the hidden label "__other_findings__", so this also checks them
        clear = all(values.get(n) in (NEGATIVE, None) for n in self.vocab.labels if n not in ignore)
        if clear and (mentioned_any or not nf.get("require_mention", False)):
            values[label] = POSITIVE

    def _primary(self, mentions: list[Mention], values: dict[str, int | None]) -> tuple[str | None, str, int | None]:
        """Primary diagnosis and where it came from: the first positive (else uncertain) most specific diagnosis of
        the diagnosis section, else of the whole report; else the diagnosis whose ``implied_by`` findings are all
        positive (the largest satisfied rule wins, then the most rules, then file order); else the No-Finding label
        if it is a diagnosis and positive ("normal")."""
        diagnoses = {n for n, s in self.vocab.labels.items() if s.kind == "diagnosis"}
        scopes = (("diagnosis section", [m for m in mentions if m.section == "diagnosis"]), ("report", mentions))
        for where, scope in scopes:
            # a diagnosis named only in a differential ("the differential includes MCD and FSGS") is not the primary
            scope = [m for m in scope if m.label in diagnoses and not m.cue.lower().startswith("differential")]
            agg = self._aggregate(scope)
            for wanted in (POSITIVE, UNCERTAIN):
                cands = {n for n, v in agg.items() if v == wanted}
                # the most specific diagnosis: drop any candidate that is an ancestor of another candidate
                cands -= {a for n in cands for a in self.vocab.ancestors(n)}
                if cands:
                    first = {n: min(m.start for m in scope if m.label == n and m.value == wanted) for n in cands}
                    return min(cands, key=first.get), where, wanted
        best, best_key = None, None
        for order, name in enumerate(n for n in self.vocab.labels if n in diagnoses):
            if values.get(name) in (NEGATIVE, UNCERTAIN):  # "does not meet criteria for TBMN": never inferred
                continue
            spec = self.vocab.labels[name]
            sat = [r for r in spec.implied_by if all(values.get(x) == POSITIVE for x in r.get("all", []))
                   and not any(values.get(x) in (POSITIVE, UNCERTAIN) for x in r.get("none", []))]
            if sat:
                key = (max(len(r.get("all", [])) for r in sat), len(sat), -order)
                if best_key is None or key > best_key:
                    best, best_key = name, key
        if best:
            return best, "findings", POSITIVE
        nf = (self.vocab.no_finding or {}).get("label")
        if nf in diagnoses and values.get(nf) == POSITIVE:
            return nf, "no finding", POSITIVE
        return None, "", None

    # ---------------------------------------------------------------- public API
    def label(self, text: str) -> ReportLabels:
        """Label one report."""
        mentions: list[Mention] = []
        for sec in split_sections(text, self.vocab.sections):
            if sec.kind == "ignore":
                continue
            for s, e in split_sentences(text, sec.start, sec.end):
                mentions.extend(self._sentence(text, s, e, sec.kind))
        values = self._hierarchy(self._aggregate(mentions))
        self._no_finding(values, any(not self.vocab.labels[m.label].hidden for m in mentions))
        primary, source, value = self._primary(mentions, values)
        return ReportLabels({n: values.get(n) for n in self.labels}, primary, source, mentions, value)

    def sections(self, text: str) -> list[Section]:
        """The report's sections as this vocabulary sees them (for debugging a header that was not recognised)."""
        return split_sections(text, self.vocab.sections)

    def label_frame(self, reports: pd.DataFrame, text_column: str = "report",
                    keep: tuple[str, ...] = ("patient_id",), uncertain: str = "keep",
                    progress: bool = False) -> pd.DataFrame:
        """Labels table: the ``keep`` columns present in ``reports``, ``primary_diagnosis``, ``primary_value``
        (1 stated, -1 only hedged, <NA> none found), then one column per label with values 1 / 0 / -1 / <NA>
        (nullable integers, written to CSV as 1, 0, -1 and empty).

        ``uncertain`` recodes the -1 of the label columns: ``keep`` (default, CheXpert's coding), ``positive`` (1)
        or ``negative`` (0); ``primary_value`` always keeps -1 so that a hedged diagnosis stays visible."""
        if uncertain not in UNCERTAIN_CODINGS:
            raise ValueError(f"uncertain must be one of {', '.join(UNCERTAIN_CODINGS)}, got {uncertain!r}")
        texts = reports[text_column].astype(str)
        results = [self.label(t) for t in tqdm(texts, desc=f"labelling reports ({self.vocab.name})", unit="report",
                                               disable=not progress or bars_disabled())]
        table = pd.DataFrame({c: reports[c].to_numpy() for c in keep if c in reports.columns})
        table["primary_diagnosis"] = pd.Series([r.primary for r in results], dtype="object")
        table["primary_value"] = pd.array([r.primary_value for r in results], dtype="Int64")
        recode = UNCERTAIN_CODINGS[uncertain]
        for name in self.labels:
            table[name] = pd.array([recode.get(r.values[name], r.values[name]) for r in results], dtype="Int64")
        return table


def label_reports(reports: pd.DataFrame, vocab: str | Path | Vocabulary = "renal",
                  text_column: str = "report", uncertain: str = "keep") -> pd.DataFrame:
    """Shortcut: ``Labeler(vocab).label_frame(reports, text_column, uncertain=uncertain)``."""
    return Labeler(vocab).label_frame(reports, text_column, uncertain=uncertain)
