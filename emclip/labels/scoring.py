"""Score the labeler against hand-labelled report texts: per-label precision / recall / F1, and primary diagnosis.

``python -m emclip.labels.scoring CASES.yaml --vocab chexpert|renal|PATH [--part dev|heldout|all]``

A cases file (``tests/data/labeler/*.yaml``) holds ``cases``, each with ``id``, ``text``, ``labels`` (label -> 1 / 0 /
-1; a label not listed is not mentioned) and, for diagnostic vocabularies, ``primary`` (a diagnosis or null) and
``primary_certain``. Findings are scored as binary detection, CheXpert-style: a label is *positive* when its value is
1, and the uncertain value -1 counts as negative (``uncertain='negative'``) or positive (``uncertain='positive'``),
in the gold and in the prediction alike. The mean F1 is over labels with at least one gold positive.

Every case file splits into a ``dev`` part (even positions) and a ``heldout`` part (odd positions): rules may be
tuned on dev errors only, so that heldout stays text nobody tuned on.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from .agreement import Agreement, agreement
from .labeler import NEGATIVE, POSITIVE, Labeler, ReportLabels
from .text import split_sentences

PARTS = ("dev", "heldout", "all")


@dataclass
class Case:
    id: str
    text: str
    labels: dict[str, int]
    primary: str | None = None
    primary_certain: bool | None = None


_KEYWORD_NEGATION = re.compile(r"\b(?:no|not|without|negative for|free of|absent|none)\b", re.IGNORECASE)


class KeywordBaseline:
    """The comparison a rule-based labeler has to beat: the vocabulary's own synonyms and abbreviations, a label
    positive where one occurs, negative where a negation word occurs anywhere earlier in its sentence. No scope, no
    uncertainty, no sections, no hierarchy."""

    def __init__(self, vocab: str | Path):
        self.inner = Labeler(vocab)
        self.vocab, self.labels = self.inner.vocab, self.inner.labels

    def label(self, text: str) -> ReportLabels:
        values: dict[str, int | None] = {}
        for s, e in split_sentences(text):
            sent = text[s:e]
            for spec in self.vocab.labels.values():
                for pat in spec.patterns:
                    for m in pat.finditer(sent, sent.lower()):
                        value = NEGATIVE if _KEYWORD_NEGATION.search(sent, 0, m.start()) else POSITIVE
                        values[spec.name] = max(values.get(spec.name, NEGATIVE), value)
        return ReportLabels({n: values.get(n) for n in self.labels}, None, "")


def load_cases(path: str | Path, part: str = "all") -> list[Case]:
    """The cases of a YAML file, or only its ``dev`` / ``heldout`` part."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    cases = []
    for i, c in enumerate(data["cases"]):
        bad = {k: v for k, v in (c.get("labels") or {}).items() if v not in (1, 0, -1)}
        if bad or not str(c.get("text", "")).strip():
            raise ValueError(f"{path}: case {c.get('id', i)}: empty text or values not in 1/0/-1: {bad}")
        cases.append(Case(str(c["id"]), str(c["text"]), dict(c.get("labels") or {}), c.get("primary"),
                          c.get("primary_certain")))
    if part == "all":
        return cases
    return cases[0::2] if part == "dev" else cases[1::2]


def _binary(value, uncertain: str) -> bool:
    return value == 1 or (value == -1 and uncertain == "positive")


def score_findings(cases: list[Case], labeler: Labeler | KeywordBaseline, uncertain: str = "negative",
                   labels: list[str] | None = None) -> pd.DataFrame:
    """Per label: support (gold positives), predicted positives, precision, recall, F1; the last row is the mean.

    ``labels`` defaults to every label the gold mentions anywhere (so No Finding and unmentioned groups are left out).
    """
    if uncertain not in ("negative", "positive"):
        raise ValueError(f"uncertain must be 'negative' or 'positive', got {uncertain!r}")
    names = labels or sorted({k for c in cases for k in c.labels}, key=str.casefold)
    unknown = [n for n in names if n not in labeler.labels]
    if unknown:
        raise ValueError(f"gold labels not in the {labeler.vocab.name} vocabulary: {unknown}")
    predictions = [labeler.label(c.text).values for c in cases]
    rows = {}
    for name in names:
        gold = [_binary(c.labels.get(name), uncertain) for c in cases]
        pred = [_binary(p.get(name), uncertain) for p in predictions]
        tp = sum(g and p for g, p in zip(gold, pred))
        n_gold, n_pred = sum(gold), sum(pred)
        prec = tp / n_pred if n_pred else float("nan")
        rec = tp / n_gold if n_gold else float("nan")
        f1 = 2 * tp / (n_gold + n_pred) if n_gold + n_pred else float("nan")
        rows[name] = {"support": n_gold, "predicted": n_pred, "precision": prec, "recall": rec, "f1": f1}
    table = pd.DataFrame.from_dict(rows, orient="index")
    scored = table[table.support > 0]
    table.loc["mean (labels with support)"] = {"support": int(scored.support.sum()),
                                               "predicted": int(scored.predicted.sum()),
                                               "precision": scored.precision.mean(), "recall": scored.recall.mean(),
                                               "f1": scored.f1.fillna(0).mean()}
    return table


def mention_errors(cases: list[Case], labeler: Labeler) -> pd.DataFrame:
    """Every (case, label) where the labeler's 1 / 0 / -1 / unmentioned differs from the gold: the list to read."""
    rows = []
    for c in cases:
        values = labeler.label(c.text).values
        for name in sorted(set(c.labels) | {k for k, v in values.items() if v is not None and k in
                                             {n for cc in cases for n in cc.labels}}):
            if c.labels.get(name) != values.get(name):
                rows.append({"id": c.id, "label": name, "gold": c.labels.get(name), "labeler": values.get(name),
                             "text": " ".join(c.text.split())})
    return pd.DataFrame(rows, columns=["id", "label", "gold", "labeler", "text"])


def score_primary(cases: list[Case], labeler: Labeler) -> tuple[Agreement, dict]:
    """Agreement of the primary diagnosis with the gold (null gold = no diagnosis) and of its certainty."""
    results = [labeler.label(c.text) for c in cases]
    ag = agreement(pd.Series([r.primary for r in results], dtype="object"),
                   pd.Series([c.primary for c in cases], dtype="object"))
    both = [(c, r) for c, r in zip(cases, results) if c.primary and r.primary == c.primary]
    certain = sum((r.primary_value == 1) == bool(c.primary_certain) for c, r in both)
    return ag, {"primary_correct": len(both), "certainty_agrees": certain,
                "certainty_accuracy": certain / len(both) if both else float("nan")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emclip.labels.scoring", description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", type=Path, help="cases YAML file (tests/data/labeler/*.yaml)")
    parser.add_argument("--vocab", required=True, help="'renal', 'chexpert' or a vocabulary YAML path")
    parser.add_argument("--part", choices=PARTS, default="all", help="dev (even cases), heldout (odd) or all")
    parser.add_argument("--errors", action="store_true", help="also print every disagreeing (case, label)")
    parser.add_argument("--baseline", action="store_true",
                        help="score the keyword baseline (synonyms + a same-sentence negation word) instead")
    args = parser.parse_args(argv)
    labeler = KeywordBaseline(args.vocab) if args.baseline else Labeler(args.vocab)
    cases = load_cases(args.cases, args.part)
    options = ("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 140,
               "display.float_format", "{:.3f}".format)
    with pd.option_context(*options):
        who = "keyword baseline" if args.baseline else "labeler"
        print(f"{args.cases.name} [{args.part}]: {len(cases)} cases, {who}, vocabulary {labeler.vocab.name}\n")
        for unc in ("negative", "positive"):
            print(f"findings, uncertain counted as {unc}:")
            print(score_findings(cases, labeler, unc).to_string(), "\n")
        if not args.baseline and any(c.primary is not None or c.primary_certain is not None for c in cases):
            ag, cert = score_primary(cases, labeler)
            print(f"primary diagnosis: accuracy {ag.accuracy:.3f} ({round(ag.accuracy * ag.n)}/{ag.n}); certainty "
                  f"agrees on {cert['certainty_agrees']}/{cert['primary_correct']} correct primaries")
            print(ag.per_class.to_string(), "\n")
        if args.errors:
            errors = mention_errors(cases, labeler)
            print(f"{len(errors)} disagreeing (case, label):")
            print(errors.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
