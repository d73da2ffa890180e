"""medspaCy ConText vs emclip's rule-based CheXpert labeler on the held-out half of chexpert_cases.yaml.

medspaCy's spaCy 3.7 needs numpy < 2, which the project's environment does not have, so this runs in its own venv:

    python3 -m venv /tmp/medspacy && /tmp/medspacy/bin/pip install medspacy "numpy<2" "pandas<2.3" pyyaml tabulate
    /tmp/medspacy/bin/python benchmarks/labeler_vs_medspacy.py [options]

It compares with the project's labeler by reading `python -m emclip.labels.scoring ... --part heldout` numbers from
docs/labeler.md; its own output is medspaCy's per-label table under both conventions.

Pipeline (main run): medspacy.load() = spacy.blank("en") + medspaCy's custom tokenizer + medspacy_pyrush (sentences)
+ medspacy_target_matcher (TargetRules from the project's chexpert vocabulary) + medspacy_context (DEFAULT rules,
default settings). No trained spaCy model is used or downloaded.

Options:
  --strict-vocab     only the vocabulary phrases exactly as written (no plural / hyphen variants)
  --unc-first        when a target is both negated and uncertain/hypothetical, -1 wins (default: negated -> 0 wins)
  --sections         also add medspacy_sectionizer with the project's own section headers and drop targets in the
                     project's "ignore" sections (indication, history, comparison, ...)
  --drop-colon       ConText default rules minus the BACKWARD ": no" / ": none" rules, which (being longer) prune
                     the FORWARD "no" after any header ("IMPRESSION: No pneumothorax" -> not negated)
  --errors N         print N sampled disagreements
  --json PATH        write per-case predictions
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
CASES = REPO / "tests" / "data" / "labeler" / "chexpert_cases.yaml"
VOCAB = REPO / "emclip" / "labels" / "vocab" / "chexpert.yaml"
CHILDREN_OF_LUNG_OPACITY = ["Edema", "Consolidation", "Pneumonia", "Atelectasis", "Lung Lesion"]


# ---------------------------------------------------------------- data
def load_cases(part: str = "heldout"):
    data = yaml.safe_load(CASES.read_text(encoding="utf-8"))
    cases = data["cases"]
    return cases[1::2] if part == "heldout" else cases[0::2] if part == "dev" else cases


def load_vocab():
    v = yaml.safe_load(VOCAB.read_text(encoding="utf-8"))
    out = {}
    for spec in v["labels"]:
        name = spec["name"]
        syn = [s for s in (spec.get("synonyms") or []) if not str(s).startswith("re:")]
        if spec.get("match_name", True):
            syn = [name.lower()] + syn
        abbr = [a for a in (spec.get("abbreviations") or []) if not str(a).startswith("re:")]
        if syn or abbr:
            out[name] = {"synonyms": list(dict.fromkeys(syn)), "abbreviations": list(dict.fromkeys(abbr))}
    return v, out


def _plural(word: str) -> str:
    w = word.lower()
    if w.endswith("thorax"):
        return word[:-1] + "ces"          # pneumothorax -> pneumothoraces
    if w.endswith("sis"):
        return word[:-2] + "es"           # metastasis -> metastases
    if re.search(r"[^aeiou]y$", w):
        return word[:-1] + "ies"          # density -> densities
    if re.search(r"(s|sh|ch|x|z)$", w):
        return word + "es"
    return word + "s"


def variants(phrase: str) -> list[str]:
    """What the project's phrase compiler also accepts: plural of the last word, hyphen <-> space / nothing."""
    forms = {phrase}
    if "-" in phrase:
        forms |= {phrase.replace("-", " "), phrase.replace("-", "")}
    if " " in phrase:
        forms.add(phrase.replace(" ", "-"))
    for f in list(forms):
        head, _, last = f.rpartition(" ")
        forms.add((head + " " if head else "") + _plural(last))
    return sorted(forms)


# ---------------------------------------------------------------- pipeline
def build_nlp(labels: dict, strict: bool, sections: dict | None, drop_colon: bool = False):
    import medspacy
    from medspacy.ner import TargetRule

    if not drop_colon:
        nlp = medspacy.load()  # blank en + medspacy_tokenizer + pyrush + target_matcher + context (default rules)
    else:  # same, but ConText's default rules without the BACKWARD ": no" / ": none" rules
        nlp = medspacy.load(medspacy_enable=["medspacy_tokenizer", "medspacy_pyrush", "medspacy_target_matcher"])
        import medspacy.context.context as C
        from pathlib import Path as _P
        src = _P(C.__file__).resolve().parents[2] / "resources" / "en" / "context_rules.json"
        d = json.loads(src.read_text())
        d["context_rules"] = [r for r in d["context_rules"] if r["literal"] not in (": no", ": none")]
        import tempfile
        dst = _P(tempfile.mkdtemp()) / "context_rules_no_colon.json"
        dst.write_text(json.dumps(d, indent=1))
        nlp.add_pipe("medspacy_context", config={"rules": str(dst)})
    rules = []
    for name, spec in labels.items():
        for phrase in spec["synonyms"]:
            for form in ([phrase] if strict else variants(phrase)):
                rules.append(TargetRule(literal=form, category=name))       # PhraseMatcher on LOWER
        for a in spec["abbreviations"]:                                       # case-sensitive, like the project
            forms = [a] if strict else [a, a + "s"]
            rules.append(TargetRule(literal=a, category=name, pattern=[{"ORTH": {"IN": forms}}]))
    nlp.get_pipe("medspacy_target_matcher").add(rules)

    if sections is not None:
        from medspacy.section_detection import SectionRule
        sec = nlp.add_pipe("medspacy_sectionizer", config={"rules": None})
        srules = []
        for cat, headers in sections.items():
            for h in headers:
                pat = [{"LOWER": t} for t in h.lower().split()] + [{"ORTH": ":"}]
                srules.append(SectionRule(literal=h + ":", category=cat, pattern=pat))
        sec.add(srules)
    return nlp, len(rules)


def ent_value(ent, unc_first: bool) -> int:
    neg = ent._.is_negated
    unc = ent._.is_uncertain or ent._.is_hypothetical
    if unc_first:
        return -1 if unc else 0 if neg else 1
    return 0 if neg else -1 if unc else 1


def _rank(v):  # priority positive > uncertain > negative > not mentioned
    return {1: 3, -1: 2, 0: 1, None: 0}[v]


def label_doc(doc, names, unc_first: bool, use_sections: bool):
    values = {n: None for n in names}
    mentions = []
    for ent in doc.ents:
        if use_sections and ent._.section_category == "ignore":
            continue
        v = ent_value(ent, unc_first)
        mods = [(m.category, m.span.text if hasattr(m, "span") else str(m)) for m in ent._.modifiers]
        mentions.append((ent.label_, ent.text, ent.sent.text.strip(), v, mods))
        if _rank(v) > _rank(values[ent.label_]):
            values[ent.label_] = v
    if values.get("Cardiomegaly") == 1:
        values["Enlarged Cardiomediastinum"] = 1
    if any(values.get(c) == 1 for c in CHILDREN_OF_LUNG_OPACITY):
        values["Lung Opacity"] = 1
    return values, mentions


# ---------------------------------------------------------------- scoring (= emclip.labels.scoring.score_findings)
def _binary(value, uncertain: str) -> bool:
    return value == 1 or (value == -1 and uncertain == "positive")


def score(cases, predictions, uncertain: str) -> pd.DataFrame:
    names = sorted({k for c in cases for k in (c.get("labels") or {})}, key=str.casefold)
    rows = {}
    for name in names:
        gold = [_binary((c.get("labels") or {}).get(name), uncertain) for c in cases]
        pred = [_binary(p.get(name), uncertain) for p in predictions]
        tp = sum(g and p for g, p in zip(gold, pred))
        n_gold, n_pred = sum(gold), sum(pred)
        rows[name] = {"support": n_gold, "predicted": n_pred,
                      "precision": tp / n_pred if n_pred else float("nan"),
                      "recall": tp / n_gold if n_gold else float("nan"),
                      "f1": 2 * tp / (n_gold + n_pred) if n_gold + n_pred else float("nan")}
    table = pd.DataFrame.from_dict(rows, orient="index")
    s = table[table.support > 0]
    table.loc["mean (labels with support)"] = {"support": int(s.support.sum()), "predicted": int(s.predicted.sum()),
                                               "precision": s.precision.mean(), "recall": s.recall.mean(),
                                               "f1": s.f1.fillna(0).mean()}
    return table


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--strict-vocab", action="store_true")
    ap.add_argument("--unc-first", action="store_true")
    ap.add_argument("--sections", action="store_true")
    ap.add_argument("--drop-colon", action="store_true", help="remove ConText's default ': no' / ': none' rules")
    ap.add_argument("--part", default="heldout", choices=["heldout", "dev", "all"])
    ap.add_argument("--errors", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--score-json", type=Path, help="score saved predictions {id: {label: value}} instead")
    args = ap.parse_args(argv)

    try:  # PyRuSH logs every sentence decision at DEBUG through loguru: silence it (it also distorts the timing)
        from loguru import logger
        logger.remove()
        logger.add(sys.stderr, level="WARNING")
    except ImportError:
        pass
    import medspacy, spacy
    cases = load_cases(args.part)
    vocab, labels = load_vocab()

    if args.score_json:
        saved = json.loads(args.score_json.read_text())
        preds = [saved[str(c["id"])] for c in cases]
    else:
        sections = None
        if args.sections:
            sections = {k: list(v) for k, v in vocab["sections"].items()}
        t0 = time.perf_counter()
        nlp, n_rules = build_nlp(labels, args.strict_vocab, sections, args.drop_colon)
        t1 = time.perf_counter()
        docs = list(nlp.pipe([c["text"] for c in cases]))
        t2 = time.perf_counter()
        out = [label_doc(d, labels, args.unc_first, args.sections) for d in docs]
        preds = [o[0] for o in out]
        print(f"medspacy {medspacy.__version__}, spacy {spacy.__version__}; pipeline {nlp.pipe_names}, "
              f"tokenizer {type(nlp.tokenizer).__module__}.{type(nlp.tokenizer).__name__}; {n_rules} target rules, "
              f"{len(nlp.get_pipe('medspacy_context').rules)} ConText rules")
        print(f"{len(cases)} cases: build {t1 - t0:.2f}s, label {t2 - t1:.3f}s ({len(cases) / (t2 - t1):.0f} reports/s)\n")
        if args.json:
            args.json.write_text(json.dumps({str(c["id"]): p for c, p in zip(cases, preds)}, indent=1))

    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        for unc in ("negative", "positive"):
            print(f"uncertain counted as {unc}:")
            print(score(cases, preds, unc).to_string(), "\n")

    if args.errors and not args.score_json:
        errs = []
        for c, (vals, ments) in zip(cases, out):
            gold = c.get("labels") or {}
            for name in sorted(set(gold) | {k for k, v in vals.items() if v is not None}):
                if name in {k for cc in cases for k in (cc.get("labels") or {})} and gold.get(name) != vals.get(name):
                    rel = [m for m in ments if m[0] == name]
                    errs.append((c["id"], name, gold.get(name), vals.get(name), rel, " ".join(c["text"].split())))
        print(f"{len(errs)} disagreeing (case, label)")
        from collections import Counter
        print(Counter((e[1], e[2], e[3]) for e in errs).most_common(25))
        random.seed(0)
        for e in random.sample(errs, min(args.errors, len(errs))):
            print(f"\n{e[0]} {e[1]}: gold {e[2]} pred {e[3]}\n  mentions: {e[4]}\n  text: {e[5][:400]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
