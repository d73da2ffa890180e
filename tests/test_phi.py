"""The PHI scan of the data audit (emclip.audit: PHI_PATTERNS, phi_scan) on planted identifiers (issue 13).

tests/data/phi/planted.yaml holds short report-like sentences with identifiers planted in them (dates, record
numbers, names, phones, e-mails, SSNs, ages over 89, addresses) and negatives, clinical text that must not be flagged.
It was written before the patterns were changed; patterns may be tuned on its dev half (even positions) only, so the
held-out half (odd positions) measures them. An identifier counts as found only when matches cover all of it.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from emclip import audit

PLANTED = Path(__file__).parent / "data" / "phi" / "planted.yaml"
KINDS = {"date", "record number", "name", "phone", "email", "ssn", "age", "address"}


@pytest.fixture(scope="module")
def heldout() -> audit.PhiScore:
    return audit.phi_recall(audit.load_phi_cases(PLANTED, "heldout"))


def test_planted_set_is_well_formed():
    cases = audit.load_phi_cases(PLANTED)
    assert len(cases) >= 140 and len({c["id"] for c in cases}) == len(cases)
    negatives = [c for c in cases if not c["phi"]]
    assert len(negatives) >= 40
    kinds = Counter(p["kind"] for c in cases for p in c["phi"])
    assert set(kinds) == KINDS and sum(kinds.values()) >= 100
    for c in cases:
        for p in c["phi"]:
            assert c["text"].count(str(p["text"])) == 1, (c["id"], p["text"])  # the span is where it occurs
    dev, held = audit.load_phi_cases(PLANTED, "dev"), audit.load_phi_cases(PLANTED, "heldout")
    assert [c["id"] for c in dev] == [c["id"] for c in cases[0::2]]
    assert [c["id"] for c in held] == [c["id"] for c in cases[1::2]]


def test_heldout_recall_overall_and_per_kind(heldout):
    table = heldout.per_kind
    assert table.recall["all"] >= 0.95, heldout.missed
    low = table[table.recall < 0.85]
    assert low.empty, f"kinds below 0.85 recall on heldout:\n{low}\nmissed: {heldout.missed}"


def test_few_false_alarms_on_clinical_text(heldout):
    dev = audit.phi_recall(audit.load_phi_cases(PLANTED, "dev"))
    for score in (heldout, dev):
        assert score.negatives >= 20
        assert score.negative_flag_rate <= 0.05, score.false
        assert score.precision >= 0.9, score.false


@pytest.mark.parametrize("text, identifier", [
    ("Results telephoned to DR. SMITH today.", "SMITH"),
    ("Referred by Dr. O'Brien for proteinuria.", "O'Brien"),
    ("Biopsy on 14 March 2023, two cores.", "14 March 2023"),
    ("SSN 123-45-6789 on the request form.", "123-45-6789"),
    ("mrn 1234567, native kidney.", "1234567"),
    ("dr smith asked for EM.", "smith"),
    ("Reviewed with Dr. Anne-Marie Dupont.", "Anne-Marie Dupont"),
    ("Electronically signed: John Smith, MD", "John Smith"),
    ("Copy to j.smith+em@path.uni-hospital.co.uk please.", "j.smith+em@path.uni-hospital.co.uk"),
    ("Queries to +44 20 7946 0958.", "+44 20 7946 0958"),
    ("A 92-year-old woman.", "92-year-old"),
])
def test_examples_from_the_finding_are_flagged(text, identifier):
    matches = audit.phi_matches(text)
    start = text.index(identifier)
    covered = {i for _, s, e, _ in matches for i in range(s, e)}
    assert set(range(start, start + len(identifier))) <= covered, (text, matches)


@pytest.mark.parametrize("text", [
    "Mesangial IgA 3+ and C3 2+ staining; 15 glomeruli; 1:100 dilution.",
    "GBM thickness 350-400 nm at x 10,000 magnification, grade 2/4, pH 7.4, stage III, 100 nm/pixel.",
    "History of MS and hypertension; MR angiography normal; diabetic with DR and neuropathy.",
    "In case no deposits are found, repeat EM.",
    "Grade 2 may progress; a 67-year-old man; blood pressure 150/90.",
])
def test_clinical_text_is_not_flagged(text):
    assert audit.phi_matches(text) == []


def test_phi_scan_keeps_its_table():
    reports = pd.DataFrame({"patient_id": ["p1", "p2", "p3"],
                            "report": ["Seen by DR. SMITH on 2023-03-14.", "No deposits.", "SSN: 123-45-6789"]})
    table = audit.phi_scan(reports)
    assert list(table.columns) == ["patient_id", "pattern", "match"]
    assert set(table.pattern) <= set(audit.PHI_PATTERNS)
    assert set(table.patient_id) == {"p1", "p3"}
    assert {"DR. SMITH", "2023-03-14", "123-45-6789"} <= set(table["match"])
    empty = audit.phi_scan(reports.iloc[1:2])
    assert empty.empty and list(empty.columns) == ["patient_id", "pattern", "match"]


def test_phi_scan_lists_every_match_not_the_first_of_each_kind():
    text = ("Biopsy 2023-03-14, reviewed 2023-04-02 and again on 2023-05-30. Call 555-123-4567 or 555-987-6543; "
            "copy to a.smith@example.org and j.doe@example.org.")
    table = audit.phi_scan(pd.DataFrame({"patient_id": ["p1"], "report": [text]}))
    found = {kind: sorted(table.match[table.pattern == kind]) for kind in ("date", "phone", "email")}
    assert found == {"date": ["2023-03-14", "2023-04-02", "2023-05-30"], "phone": ["555-123-4567", "555-987-6543"],
                     "email": ["a.smith@example.org", "j.doe@example.org"]}


def test_scorer_counts_misses_and_false_alarms():
    cases = [{"id": "a", "text": "Dr. Smith on 1/2/2023.", "phi": [{"kind": "name", "text": "Smith"},
                                                                     {"kind": "date", "text": "1/2/2023"}]},
             {"id": "b", "text": "15 glomeruli.", "phi": []}]
    none = audit.phi_recall(cases, patterns={})
    assert none.per_kind.recall["all"] == 0 and none.flagged == 0 and none.negatives == 1
    noisy = audit.phi_recall(cases, patterns={"digits": r"\d+"})
    assert noisy.per_kind.found["date"] == 0  # pieces of the date do not cover it all ("/" is left)
    assert noisy.false_alarms == 1 and noisy.negatives_flagged == 1 and noisy.negative_flag_rate == 1


# ------------------------------------------------------------------------------ linear time on long hostile texts
@pytest.mark.parametrize("unit", ["a.", "1-", "Dr ", "a@", "1 ", "MRN ", "14 March ", "Name: A, ", "+1 "])
def test_scan_time_grows_linearly(unit):
    """Best of 3 runs for N and 8N characters of a repeated unit: under 8 x 2.5 (quadratic would be 64). The patterns
    before issue 13 took quadratic time on "a." (e-mail) and "1-" (record number) runs."""
    def best(text):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            audit.phi_matches(text)
            times.append(time.perf_counter() - t0)
        return min(times)

    small, large = (unit * (5000 // len(unit)))[:5000], (unit * (40000 // len(unit)))[:40000]
    audit.phi_matches(small)  # compile
    t1, t8 = best(small), best(large)
    assert t8 / t1 < 8 * 2.5, f"{unit!r}: {t1:.4f} s -> {t8:.4f} s for 8x the text"
