"""Cohort audit: tables and figures for ``01_data_audit`` (leakage, PHI patterns, distributions, examples)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .data import DIAGNOSIS_SOURCES, UNLABELLED, Cohort, read_image
from .data.splits import SPLITS

# Patterns of protected health information that must not reach a model or a report. Deliberately broad: a false
# alarm costs a look, a miss costs a disclosure. Case-insensitive ("(?i)") except where case is the evidence: a name
# starts with a capital ("DR and neuropathy", "MR angiography" are no names), a postcode or a bare accession number
# is in capitals. Every repetition that could meet a long run of text is bounded or starts only at the start of a run
# (lookbehind), so a scan stays linear in the text length (tests/test_phi.py). Planted test set, recall per kind:
# tests/data/phi/planted.yaml, ``phi_recall``.
_MONTH = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?"
          r"|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)(?![^\W\d_])\.?")
# without a year, "may" only as a capitalised month: "grade 2 may progress" is no date
_MONTH_NO_YEAR = _MONTH.replace("|may|", "|(?-i:May|MAY)|")
_ORD = r"(?:st|nd|rd|th)?"
_YEAR = r"(?:\d{4}|\d{2})(?!\d)"
_DATE = "|".join([
    r"(?<![\d.,/-])(?<!version )(?<!v)\d{1,2}([/.-])\d{1,2}\1" + _YEAR,  # 12/03/2023, 3.14.23, 14-03-23 (one separator)
    r"(?<![\d.,/-])(?:19|20)\d{2}([/.-])\d{1,2}\2\d{1,2}(?!\d)",  # 2023-03-14, 2024/01/19, 2023.03.14
    r"(?<!\d)(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])(?!\d)",  # 20230314
    rf"(?<!\d)\d{{1,2}}{_ORD}(?:\s+of)?[\s-]+{_MONTH}(?:,?[\s-]+{_YEAR})",  # 14 March 2023, 14-Mar-23, 3rd of Jan 2023
    rf"(?<!\d)\d{{1,2}}{_ORD}(?:\s+of)?[\s-]+{_MONTH_NO_YEAR}",  # 14 March, the 14th of March
    rf"\b{_MONTH}\s+\d{{1,2}}{_ORD}(?:,?\s+{_YEAR})",  # March 14th, 2023; Dec. 5, 2022
    rf"\b{_MONTH_NO_YEAR}\s+\d{{1,2}}{_ORD}(?!\d)",  # March 14
    rf"\b{_MONTH},?\s+(?:19|20)\d{{2}}(?!\d)",  # Mar 2023, June 2024
])
# A record label ("MRN", "case no.", "Patient ID", "Accession #") and an identifier with a digit in it; or a bare
# accession-like number in capitals (S23-12345).
_REC_WORD = r"(?:(?:numbers?|num|nr|no|id|identifier)(?![^\W\d_])|#)"
_REC_LABEL = (r"\b(?:(?:mrn|accession|nhs|chart|mr(?=\s*#))(?![^\W\d_])(?:\s*" + _REC_WORD + r")?"
              r"|(?:(?:medical\s+)?record|hospital|unit|case|specimen|sample|lab(?:oratory)?|patient|encounter"
              r"|account|acct|biopsy|em|(?:surgical\s+)?pathology|ref(?:erence)?|accession)\s*" + _REC_WORD + ")")
_REC_ID = r"(?=[\w/-]{4})[a-z]{0,5}[/-]?\d[\da-z/-]*(?:\s\d{2,}){0,4}"
_TITLE_NAME_WORD = r"(?:[A-ZÀ-ÖØ-Þ]\.|[A-ZÀ-ÖØ-Þ](?:[^\W\d_]|['’-](?=[^\W\d_]))+)"  # J.  Smith  O'Brien  Anne-Marie
_PARTICLE = r"(?:van|von|de|del|della|der|den|di|da|du|la|le|ten|ter|bin|al|el)"
_NAME = (rf"(?-i:(?:{_PARTICLE}\s+){{0,3}}{_TITLE_NAME_WORD}"
         rf"(?:[ \t]+(?:{_PARTICLE}\s+){{0,3}}{_TITLE_NAME_WORD}){{0,3}})")
_TITLES = r"(?:dr|mrs?|ms|miss|mx|prof(?:essor)?|doctor)"
_TITLES_CAP = "Dr|Mrs?|Ms|Miss|Mx|Prof(?:essor)?|Doctor|DR|MRS|MISS|MX|PROF(?:ESSOR)?|DOCTOR"  # bare MR / MS: below
PHI_PATTERNS = {
    "date": "(?i)" + _DATE,
    "record number": "(?i)" + _REC_LABEL + r"[\s:#.]{0,10}" + _REC_ID + r"|(?-i:\b[A-Z]{1,3}\d{2}[-/]\d{3,}\b)",
    # a title, then a capitalised name in any case: Dr. Smith, DR. SMITH, Dr. O'Brien, Prof. J. K. Lee, Dr van der
    # Berg; after a lower-case title also a lower-case name ("dr smith"); after a bare MR / MS (magnetic resonance,
    # multiple sclerosis) only a name in capitals ("MS NGUYEN"), so "MS and", "MR angiography" are not names
    "name after title": (rf"(?-i:\b(?:{_TITLES_CAP})\b|\b(?:MR|MS)\b(?=\.))\.?[ \t]+{_NAME}"
                         rf"|(?-i:\b(?:MR|MS)\b)[ \t]+(?-i:[A-Z][A-Z'’-]+\b)"
                         rf"|(?-i:\b{_TITLES}\b)\.?[ \t]+(?:(?-i:[a-z][a-z'’-]+)|{_NAME})"),
    # names on signature and role lines: "Pathologist: Jane Doe", "Electronically signed: John Smith, MD",
    # "Signed by Maria Garcia", "Name: Smith, John" (a role noun needs its colon or dash, "signed by" does not)
    "name after role": (r"(?:(?i:\b(?:(?:electronically\s+)?signed(?:\s+(?:off\s+)?by)?|(?:reported|verified|dictated"
                        r"|reviewed|authori[sz]ed|transcribed|requested|examined|approved)\s+by))[ \t]{0,5}[:-]?"
                        r"|(?i:\b(?:referring\s+(?:physician|clinician|doctor|consultant|nephrologist)"
                        r"|patient(?:'s)?\s+name|pathologist|consultant|attending|surgeon|physician|nephrologist"
                        r"|clinician|patient|name|cc|attn))[ \t]{0,5}[:\u2013-])[ \t]{0,5}"
                        rf"(?:(?i:{_TITLES})\.?[ \t]+)?{_NAME}(?:,[ \t]{{0,3}}{_NAME})?"),
    "phone": "(?i)(?:" + "|".join([
        r"(?<![\w+])\+\d{1,3}[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?\d{1,4}(?:[\s.-]\d{2,4}){1,4}(?!\d)",  # +44 20 7946 0958
        r"(?<![\w(+-])(?:1[\s.-])?(?:\(\d{3}\)[\s.-]?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?!\d)",  # (555) 123-4567
        r"(?<![\w+.-])0\d{2,4}[ -]?\d{3,4}[ -]?\d{3,4}(?!\d)",  # 020 7946 0958, 07700 900123
    ]) + r")(?:[ \t]{0,3}(?:ext\.?|extension|x)[ \t]{0,3}\d{1,5})?",  # with an extension
    "email": r"(?<![\w.+%'-])[\w.+%'-]+@[\w-]+(?:\.[\w-]+)+",
    "ssn": (r"(?<![\d-])\d{3}([- ])\d{2}\1\d{4}(?![\d-])"
            r"|(?i:\b(?:ssn|ss#|social\s+security(?:\s+(?:number|no\.?|#))?)[\s:#.]{0,10}\d{9}(?!\d))"),
    # HIPAA: ages over 89
    "age over 89": (r"(?i)(?<!\d)(?:9\d|1[01]\d)[\s-]{0,3}(?:years?|yrs?|y)[\s-]{0,3}(?:old|o)\b"
                    r"|\bage[ds]?[\s:]{0,5}(?:9\d|1[01]\d)(?!\d)"),
    "address": (r"(?<!\w)\d{1,5}[A-Z]?[ \t]+(?:[A-Z][a-z]+[ \t]+){1,3}(?:Street|St|Road|Rd|Avenue|Ave|Lane|Ln|Drive"
                r"|Boulevard|Blvd|Court|Ct|Place|Pl|Way|Terrace|Close|Crescent|Square|Gardens)\b\.?"
                r"|\b[A-Z]{1,2}\d[A-Z\d]?[ \t]?\d[A-Z]{2}\b"  # UK postcode SW1A 1AA
                r"|\b(?:A[LKZR]|C[AOT]|DE|FL|GA|HI|I[DLNA]|K[SY]|LA|M[EDAINSOT]|N[EVHJMYCD]|O[HKR]|PA|RI|S[CD]|T[NX]"
                r"|UT|V[TA]|W[AVIY]|DC)[ \t]+\d{5}(?:-\d{4})?\b"),  # US state and ZIP code: MA 02115
}


def leakage(cohort: Cohort) -> pd.DataFrame:
    """Patients found in more than one split (expected empty; the loader refuses such cohorts anyway)."""
    counts = cohort.reports.groupby("patient_id").split.nunique()
    return counts[counts > 1].rename("n_splits").reset_index()


def phi_matches(text: str, patterns: dict | None = None) -> list[tuple[str, int, int, str]]:
    """(pattern kind, start, end, matched text) of every PHI-like match in ``text``, by kind then position;
    ``patterns`` defaults to ``PHI_PATTERNS`` (kind -> regex source or compiled pattern)."""
    out = []
    for kind, pattern in (PHI_PATTERNS if patterns is None else patterns).items():
        rx = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
        out.extend((kind, m.start(), m.end(), m.group(0)) for m in rx.finditer(text) if m.end() > m.start())
    return out


def phi_scan(reports: pd.DataFrame) -> pd.DataFrame:
    """One row per PHI-like match: patient, pattern, the matched text."""
    rows = []
    for pid, text in zip(reports.patient_id, reports.report):
        for kind, _, _, match in phi_matches(text):
            rows.append({"patient_id": pid, "pattern": kind, "match": match})
    return pd.DataFrame(rows, columns=["patient_id", "pattern", "match"])


@dataclass
class PhiScore:
    """How a set of PHI patterns does on planted identifiers (``phi_recall``).

    ``per_kind``: planted, found and recall per identifier kind, and ``all``. An identifier is found when the matches
    (of any pattern) together cover all of its characters: half a name flagged is half a name disclosed.
    ``flagged`` / ``false_alarms``: matches, and matches that touch no planted identifier; ``negatives`` /
    ``negatives_flagged``: cases without identifiers, and those with any match. ``missed`` and ``false`` list them."""

    per_kind: pd.DataFrame
    flagged: int
    false_alarms: int
    negatives: int
    negatives_flagged: int
    missed: list[dict] = field(default_factory=list)
    false: list[dict] = field(default_factory=list)

    @property
    def precision(self) -> float:
        return (self.flagged - self.false_alarms) / self.flagged if self.flagged else float("nan")

    @property
    def negative_flag_rate(self) -> float:
        return self.negatives_flagged / self.negatives if self.negatives else float("nan")


def load_phi_cases(path: str | Path, part: str = "all") -> list[dict]:
    """Cases of a planted-identifier file (``tests/data/phi/planted.yaml``): each ``id``, ``text`` and ``phi`` (a list
    of ``kind`` and ``text``, the identifier as it occurs in the text). ``part``: ``dev`` (even positions),
    ``heldout`` (odd) or ``all``."""
    import yaml

    cases = yaml.safe_load(Path(path).read_text(encoding="utf-8"))["cases"]
    for c in cases:
        for p in c.get("phi") or []:
            if str(p["text"]) not in c["text"]:
                raise ValueError(f"{path}: case {c.get('id')}: {p['text']!r} is not in its text")
    if part not in ("all", "dev", "heldout"):
        raise ValueError(f"part must be all, dev or heldout, got {part!r}")
    return cases if part == "all" else cases[0::2] if part == "dev" else cases[1::2]


def phi_recall(cases: list[dict], patterns: dict | None = None) -> PhiScore:
    """Recall per kind of planted identifiers, false alarms and flagged negatives of ``patterns`` (default
    ``PHI_PATTERNS``) on ``cases`` as ``load_phi_cases`` returns them."""
    counts: dict[str, list[int]] = {}
    flagged = false_alarms = negatives = negatives_flagged = 0
    missed, false = [], []
    for c in cases:
        text, planted = c["text"], c.get("phi") or []
        matches = phi_matches(text, patterns)
        covered = bytearray(len(text))
        for _, s, e, _ in matches:
            covered[s:e] = b"\x01" * (e - s)
        spans = []
        for p in planted:
            s = text.index(str(p["text"]))
            e = s + len(str(p["text"]))
            spans.append((s, e))
            found = covered.find(0, s, e) < 0
            tally = counts.setdefault(p["kind"], [0, 0])
            tally[0] += 1
            tally[1] += found
            if not found:
                missed.append({"id": c.get("id"), "kind": p["kind"], "text": p["text"],
                               "matches": [m[3] for m in matches if m[1] < e and s < m[2]]})
        flagged += len(matches)
        for kind, s, e, match in matches:
            if not any(s < pe and ps < e for ps, pe in spans):
                false_alarms += 1
                false.append({"id": c.get("id"), "pattern": kind, "match": match})
        if not planted:
            negatives += 1
            negatives_flagged += bool(matches)
    rows = {k: {"planted": v[0], "found": v[1]} for k, v in sorted(counts.items())}
    rows["all"] = {"planted": sum(v[0] for v in counts.values()), "found": sum(v[1] for v in counts.values())}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table["recall"] = table.found / table.planted
    return PhiScore(table, flagged, false_alarms, negatives, negatives_flagged, missed, false)


def label_sources(cohort: Cohort) -> pd.DataFrame:
    """Where the diagnoses came from: patients per ``diagnosis_source`` (given / labeler / none) and split."""
    table = pd.crosstab(cohort.reports.diagnosis_source, cohort.reports.split).reindex(
        index=list(DIAGNOSIS_SOURCES), columns=list(SPLITS), fill_value=0)
    table["total"] = table.sum(axis=1)
    table.index.name = "diagnosis source"
    return table


def unlabelled_reasons(cohort: Cohort) -> pd.DataFrame:
    """Why patients have no usable diagnosis (``diagnosis_note`` of the ``none`` rows), most frequent first; a hedged
    diagnosis is grouped by its name."""
    notes = cohort.reports.diagnosis_note[cohort.reports.diagnosis_source == "none"]
    reasons = notes.str.replace(r" \(.*?\)", "", regex=True).str.replace(r"; excluded.*$", "", regex=True)
    return reasons.value_counts().rename_axis("reason").rename("patients").to_frame()


def labeler_agreement(cohort: Cohort, labels: pd.DataFrame):
    """Agreement of the labeler's primary diagnosis with the *given* diagnoses only (None when none is given):
    a diagnosis the labeler derived agrees with itself and would prove nothing."""
    from .labels import agreement
    given = (cohort.reports.diagnosis_source == "given").to_numpy()
    if not given.any():
        return None
    return agreement(labels.primary_diagnosis[given], cohort.reports.diagnosis[given])


def prevalence(cohort: Cohort) -> pd.DataFrame:
    """Diagnosis x split counts (patients without a usable diagnosis shown as '(no diagnosis)')."""
    dx = cohort.reports.diagnosis.fillna(UNLABELLED)
    table = pd.crosstab(dx, cohort.reports.split).reindex(columns=list(SPLITS), fill_value=0)
    table["total"] = table.sum(axis=1)
    return table


def overview_figure(cohort: Cohort, out: str | Path | None = None):
    """Images per patient, scale distribution by diagnosis, report length, diagnosis prevalence per split."""
    images = cohort.images.merge(cohort.reports[["patient_id", "diagnosis"]], on="patient_id")
    images["diagnosis"] = images.diagnosis.fillna(UNLABELLED)
    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    per = cohort.images.groupby("patient_id").size()
    ax[0, 0].hist(per, bins=np.arange(0.5, per.max() + 1.5, max(1, per.max() // 30)), color="#4c72b0")
    ax[0, 0].set(title=f"images per patient (n={len(per)}, median {per.median():g})", xlabel="images",
                 ylabel="patients")
    names = sorted(images.diagnosis.unique(), key=str)
    data = [np.log10(images.nm_per_pixel[images.diagnosis == n]) for n in names]
    ax[0, 1].boxplot(data, vert=False, tick_labels=names)
    ax[0, 1].set(title="physical scale by diagnosis", xlabel="log10 nm per pixel")
    ax[0, 1].tick_params(axis="y", labelsize=7)
    words = cohort.reports.report.str.split().str.len()
    ax[1, 0].hist(words, bins=30, color="#55a868")
    ax[1, 0].set(title=f"report length (median {words.median():g} words)", xlabel="words", ylabel="reports")
    prev = prevalence(cohort).drop(columns="total")
    (prev / prev.sum()).plot.barh(ax=ax[1, 1], width=0.8)
    ax[1, 1].set(title="diagnosis prevalence per split (fraction of split)", xlabel="fraction")
    ax[1, 1].tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=100)
    return fig


def examples_figure(cohort: Cohort, n_scales: int = 5, per_row: int = 6, seed: int = 0,
                    out: str | Path | None = None):
    """Example images across scales: rows are scale quantile bins, columns random images of that bin."""
    rng = np.random.default_rng(seed)
    images = cohort.images.merge(cohort.reports[["patient_id", "diagnosis"]], on="patient_id")
    edges = np.quantile(images.nm_per_pixel, np.linspace(0, 1, n_scales + 1))
    fig, axes = plt.subplots(n_scales, per_row, figsize=(1.9 * per_row, 2.0 * n_scales), squeeze=False)
    for i in range(n_scales):
        sel = images[(images.nm_per_pixel >= edges[i]) & (images.nm_per_pixel <= edges[i + 1])]
        picks = sel.iloc[rng.choice(len(sel), min(per_row, len(sel)), replace=False)] if len(sel) else sel
        for j, ax in enumerate(axes[i]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(picks):
                row = picks.iloc[j]
                ax.imshow(read_image(row.path), cmap="gray", vmin=0, vmax=1)
                ax.set_title(f"{row.nm_per_pixel:.1f} nm/px\n{str(row.diagnosis)[:22]}", fontsize=6)
        axes[i, 0].set_ylabel(f"{edges[i]:.0f}-{edges[i + 1]:.0f} nm/px", fontsize=8)
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=100)
    return fig
