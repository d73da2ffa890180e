"""Vocabulary files for the report labeler: labels, synonyms, cues and section names, compiled to regexes.

A vocabulary is a YAML file (format in ``docs/labeler.md``). Two ship with the package: ``renal`` (renal electron
microscopy) and ``chexpert`` (the 14 CheXpert chest X-ray observations). Both include ``cues.yaml``, the negation
and uncertainty cues shared by any English report.

Phrases are written in plain words and compiled here so that vocabulary writers never need a regex for the common
variations: case, a hyphen or space between words ("basket-weave", "basket weave", "basketweave"), an optional
hyphen after a Latin prefix ("subepithelial", "sub-epithelial") and the plural of the last word ("deposit",
"deposits"; "inclusion body", "inclusion bodies"). A phrase starting with ``re:`` is a raw regex instead; if it has
a group named ``m`` that group is the mention (so a pattern may anchor on context it does not claim).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

VOCAB_DIR = Path(__file__).with_name("vocab")
BUNDLED = ("renal", "chexpert")
KINDS = ("diagnosis", "finding", "group")
# A hyphen after these prefixes is optional in running text ("sub-epithelial"), so the compiled phrase allows it.
_PREFIXES = ("sub", "intra", "para", "peri", "extra", "inter", "non", "post", "hyper", "hypo", "micro", "ultra")
# Latin and -y plurals of a phrase's last word; any other word takes an optional -s / -es.
_PLURALS = (("is", "(?:is|es)"), ("us", "(?:us|i)"), ("ax", "(?:ax|aces|axes)"), ("y", "(?:y|ies)"))
_SPACE = r"(?:\s+|\s*-\s*)"  # a space in a phrase also matches a hyphen
_HYPHEN = r"[\s-]*"  # a hyphen in a phrase also matches a space or nothing
# Most items a starred macro ``{name*}`` matches. Unbounded, a long list that does not end in the phrase
# ("mesangial, mesangial, ..." without "deposits") was rescanned from each item: quadratic in the report length.
MAX_STAR = 20


class VocabError(ValueError):
    """A vocabulary file that cannot be used; the message names the file and the entry."""


def _word(word: str, last: bool, plural: bool) -> str:
    """Regex for one word of a phrase: optional hyphen after a prefix, plural forms when it ends the phrase."""
    low = word.lower()
    stem, tail = word, ""
    if plural and last and word.isalpha() and len(word) >= 3:
        for singular, forms in _PLURALS:
            if low.endswith(singular) and not (singular == "y" and low[-2:-1] in "aeiou"):
                stem, tail = word[: -len(singular)], forms
                break
        else:
            tail = "(?:es|s)?" if not low.endswith("s") else "(?:es)?"
    for prefix in _PREFIXES:
        if stem.lower().startswith(prefix) and len(stem) > len(prefix) + 3 and stem[len(prefix)].isalpha():
            return re.escape(stem[: len(prefix)]) + "-?" + re.escape(stem[len(prefix):]) + tail
    return re.escape(stem) + tail


def phrase_regex(phrase: str, macros: dict[str, str] | None = None, plural: bool = True, bounded: bool = True) -> str:
    """Regex source for one vocabulary phrase (plain words, ``{macro}`` references, or ``re:`` + a raw regex).

    ``{name}`` inserts macro ``name`` (exactly one of its alternatives); ``{name*}`` inserts zero or more of them
    (at most ``MAX_STAR``), each followed by spaces, commas, a colon or a slash, which is how lists of modifiers are
    matched ("subepithelial {loc*} deposits" matches "subepithelial and mesangial deposits"). Words in angle brackets
    are the mention and the rest is context: "<mesangial> {loc*} deposits" claims only "mesangial", so that in
    "subendothelial and mesangial deposits" both locations are found without overlapping.
    """
    macros = macros or {}

    def macro(name: str) -> str:
        star = name.endswith("*")
        key = name.rstrip("*")
        if key not in macros:
            raise VocabError(f"unknown macro {{{key}}} in phrase {phrase!r}")
        return f"(?:{macros[key]}[\\s,:/]+){{0,{MAX_STAR}}}" if star else macros[key]

    if phrase.startswith("re:"):
        return re.sub(r"\{(\w+\*?)\}", lambda m: macro(m.group(1)), phrase[3:].strip())
    tokens = [t for t in re.split(r"(\{\w+\*?\}|\s+|-)", phrase.strip()) if t]
    words = [i for i, t in enumerate(tokens) if not (t.isspace() or t == "-")]
    out: list[str] = []
    for i, tok in enumerate(tokens):
        prev_star = i > 0 and tokens[i - 1].endswith("*}")
        nxt_star = i + 1 < len(tokens) and tokens[i + 1].endswith("*}")
        if tok.isspace() or tok == "-":
            if prev_star:  # a starred macro consumes its own trailing separator
                continue
            out.append(r"[\s,:/]+" if nxt_star else (_SPACE if tok.isspace() else _HYPHEN))
        elif tok.startswith("{") and tok.endswith("}"):
            out.append(macro(tok[1:-1]))
        else:
            opens, closes = tok.startswith("<"), tok.endswith(">")
            word = _word(tok.strip("<>"), last=i == words[-1], plural=plural)
            out.append(("(?P<m>" if opens else "") + word + (")" if closes else ""))
    body = "".join(out)
    return r"(?<![\w])" + body + r"(?![\w])" if bounded else body


def _stems(phrase: str) -> tuple[str, ...]:
    """Short lower-case strings that every match of a plain phrase contains (empty for raw regexes).

    One per word of three letters or more: its first letters, short of any plural ending ("bod" for "body"/"bodies")
    and after any optional-hyphen prefix ("epit" for "subepithelial"/"sub-epithelial"). The labeler runs a pattern on
    a sentence only if some phrase has all its stems in the sentence: most sentences mention few labels, and substring
    tests are far cheaper than regex scans.
    """
    if phrase.startswith("re:"):
        return ()
    out = []
    for word in re.split(r"[^a-z]+", re.sub(r"\{\w+\*?\}", " ", phrase.lower())):
        for prefix in _PREFIXES:
            if word.startswith(prefix) and len(word) > len(prefix) + 3:
                word = word[len(prefix):]
                break
        if len(word) >= 3:
            out.append(word[: min(4, len(word) - 2)])
    return tuple(out)


@dataclass
class Phrases:
    """A compiled pattern and the stems that gate it: ``gates`` holds one stem tuple per phrase, None = always run."""

    rx: re.Pattern
    gates: tuple[tuple[str, ...], ...] | None = None

    def finditer(self, text: str, lower: str):
        """Matches in ``text``; ``lower`` is ``text.lower()``, shared by all patterns of a sentence."""
        if self.gates is not None and not any(all(s in lower for s in g) for g in self.gates):
            return iter(())
        return self.rx.finditer(text)


def _phrases(phrases, macros, where: str, plural: bool = True, flags: int = re.IGNORECASE) -> list[Phrases]:
    """Phrases compiled with their gates: gated plain phrases share one alternation, ungated ones (no word of three
    letters, e.g. "no") another; raw regexes and phrases with a <mention> compile alone."""
    phrases = [phrases] if isinstance(phrases, str) else list(phrases or [])
    plain = [p for p in phrases if isinstance(p, str) and not (p.startswith("re:") or "<" in p)]
    gated = [p for p in plain if _stems(p)]
    out = []
    if gated:
        out.append(Phrases(_compile(gated, macros, where, plural, flags)[0], tuple({_stems(p) for p in gated})))
    if len(gated) < len(plain):
        out.append(Phrases(_compile([p for p in plain if not _stems(p)], macros, where, plural, flags)[0]))
    for p in phrases:
        if p not in plain:
            out.extend(Phrases(rx, (_stems(p),) if _stems(p) else None)
                       for rx in _compile([p], macros, where, plural, flags))
    return out


def _compile(phrases, macros, where: str, plural: bool = True, flags: int = re.IGNORECASE) -> list[re.Pattern]:
    """Compile plain phrases into one alternation (longest first) and each ``re:`` phrase into its own pattern."""
    if isinstance(phrases, str):
        phrases = [phrases]
    plain, raw = [], []
    for p in phrases or []:
        if not isinstance(p, str) or not p.strip():
            raise VocabError(f"{where}: phrases must be non-empty strings, got {p!r} (quote YAML words like no / on)")
        try:
            # raw regexes and phrases with a <mention> group compile alone: group names must be unique per regex
            (raw if p.startswith("re:") or "<" in p else plain).append(phrase_regex(p, macros, plural))
        except re.error as err:  # pragma: no cover - phrase_regex escapes plain words
            raise VocabError(f"{where}: bad phrase {p!r}: {err}") from err
    out = []
    try:
        if plain:
            out.append(re.compile("|".join(f"(?:{s})" for s in sorted(plain, key=len, reverse=True)), flags))
        out.extend(re.compile(s, flags) for s in raw)
    except re.error as err:
        raise VocabError(f"{where}: bad regex: {err}") from err
    return out


def _abbreviations(abbrs, where: str) -> list[Phrases]:
    """Abbreviations match case-sensitively as written or in capitals ("IgAN", "IGAN"), with an optional plural s."""
    alts = set()
    for a in abbrs or []:
        if not isinstance(a, str) or not a.strip():
            raise VocabError(f"{where}: abbreviations must be non-empty strings, got {a!r}")
        alts.update({re.escape(a.strip()), re.escape(a.strip().upper())})
    if not alts:
        return []
    rx = re.compile(r"(?<![\w-])(?:" + "|".join(sorted(alts, key=len, reverse=True)) + r")s?(?![\w])")
    return [Phrases(rx, tuple({(a.strip().lower(),) for a in abbrs}))]


@dataclass
class LabelSpec:
    """One label: its patterns (positive mentions), absence patterns (negative mentions) and place in the tree."""

    name: str
    kind: str = "finding"
    parents: list[str] = field(default_factory=list)
    patterns: list[Phrases] = field(default_factory=list)
    absent: list[Phrases] = field(default_factory=list)
    ambiguous: list[Phrases] = field(default_factory=list)
    hedged: list[Phrases] = field(default_factory=list)  # count only when a cue hedges or negates them
    implied_by: list[dict] = field(default_factory=list)
    hidden: bool = False  # internal labels (e.g. No-Finding suppressors) that never reach the output table


@dataclass
class Measurement:
    """A number + unit near a subject ("GBM ... 180 nm") that sets labels by range, e.g. GBM thickness."""

    name: str
    subject: re.Pattern
    exclude: re.Pattern | None
    ranges: list[dict]
    window: int = 60


@dataclass
class Vocabulary:
    """A compiled vocabulary: labels in file order, cues by type, section names, measurements, No-Finding rule."""

    name: str
    labels: dict[str, LabelSpec]
    cues: list[tuple[str, Phrases]]  # (type, pattern); types below in CUE_TYPES
    terminators: list[re.Pattern]
    verbs: re.Pattern | None
    sections: dict[str, list[str]]
    measurements: list[Measurement]
    no_finding: dict | None
    negate_children: bool = True  # a negative parent makes its unmentioned children negative
    roll_up_uncertain: bool = True  # an uncertain child makes its parent at least uncertain

    def output_labels(self) -> list[str]:
        """Label names in file order, without hidden ones: the columns of the labels table."""
        return [n for n, spec in self.labels.items() if not spec.hidden]

    def ancestors(self, name: str) -> set[str]:
        """All labels above ``name`` in the hierarchy."""
        seen, todo = set(), list(self.labels[name].parents)
        while todo:
            p = todo.pop()
            if p not in seen:
                seen.add(p)
                todo.extend(self.labels[p].parents)
        return seen


CUE_TYPES = ("negation_pre", "negation_post", "uncertainty_pre", "uncertainty_evidence", "uncertainty_post",
             "uncertainty_both", "affirmation_pre", "pseudo")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise VocabError(f"vocabulary file not found: {path}") from err
    except yaml.YAMLError as err:
        raise VocabError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise VocabError(f"{path}: expected a mapping at the top level")
    return data


def _merge(base: dict, extra: dict) -> dict:
    """Merge an included file under the including one: lists concatenate, mappings merge, scalars of ``base`` win."""
    out = dict(extra)
    for key, val in base.items():
        if isinstance(val, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(val, out[key])
        elif isinstance(val, list) and isinstance(out.get(key), list):
            out[key] = out[key] + val
        else:
            out[key] = val
    return out


def resolve_vocab_path(vocab: str | Path) -> Path:
    """``renal`` / ``chexpert`` name a bundled vocabulary; anything else is a path to a YAML file."""
    if str(vocab) in BUNDLED:
        return VOCAB_DIR / f"{vocab}.yaml"
    path = Path(vocab)
    if not path.exists():
        raise VocabError(f"vocabulary {str(vocab)!r} is neither a bundled one ({', '.join(BUNDLED)}) nor a file")
    return path


# compiled vocabularies of this process: {path: (files read, their (size, mtime) when read, vocabulary)}
_COMPILED: dict[Path, tuple[list[Path], list[tuple[int, int]], Vocabulary]] = {}


def _file_stamps(files: list[Path]) -> list[tuple[int, int]]:
    return [(f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def load_vocab(vocab: str | Path) -> Vocabulary:
    """Load and compile a vocabulary by bundled name or path; raises VocabError naming the file and entry.

    Compiling takes about a second (hundreds of alternations), and training, evaluation and the labeler each ask for
    it: the compiled vocabulary is kept for this process until one of its files changes size or mtime. Treat the
    returned object as read-only."""
    path = resolve_vocab_path(vocab).resolve()
    if path in _COMPILED:
        files, stamps, compiled = _COMPILED[path]
        try:
            if _file_stamps(files) == stamps:
                return compiled
        except OSError:
            pass
    files = [path]
    compiled = _compile_vocab(path, files)
    _COMPILED[path] = (files, _file_stamps(files), compiled)
    return compiled


def _compile_vocab(path: Path, files: list[Path]) -> Vocabulary:
    """``load_vocab`` without the cache; appends every included file to ``files``."""
    data = _read_yaml(path)
    for inc in data.pop("include", []) or []:
        files.append(path.parent / inc)
        data = _merge(data, _read_yaml(path.parent / inc))
    where = str(path)
    for k, v in (data.get("macros") or {}).items():
        if not isinstance(v, list) or not all(isinstance(p, str) for p in v):
            raise VocabError(f"{where}: macro {k!r} must be a list of strings (quote YAML words like no / on / yes)")
    # A macro is a named set of alternatives, e.g. deposit locations; phrases reference it as {name} or {name*}.
    macros = {k: "(?:" + "|".join(phrase_regex(p, None, plural=True, bounded=False)
                                  for p in sorted(v, key=len, reverse=True)) + ")"
              for k, v in (data.get("macros") or {}).items()}

    labels: dict[str, LabelSpec] = {}
    for i, entry in enumerate(data.get("labels") or []):
        if not isinstance(entry, dict) or not entry.get("name"):
            raise VocabError(f"{where}: labels[{i}] needs a 'name'")
        name, here = str(entry["name"]), f"{where}: label {entry['name']!r}"
        kind = entry.get("kind", "finding")
        if kind not in KINDS:
            raise VocabError(f"{here}: kind must be one of {KINDS}, got {kind!r}")
        if name in labels:
            raise VocabError(f"{here}: defined twice")
        parents = entry.get("parent") or []
        synonyms = [name] if entry.get("match_name", True) else []
        labels[name] = LabelSpec(
            name=name, kind=kind, parents=[parents] if isinstance(parents, str) else list(parents),
            patterns=_phrases(synonyms + list(entry.get("synonyms") or []), macros, here)
            + _abbreviations(entry.get("abbreviations"), here),
            absent=_phrases(entry.get("absent") or [], macros, here),
            ambiguous=_phrases(entry.get("ambiguous") or [], macros, here),
            hedged=_phrases(entry.get("hedged") or [], macros, here),
            implied_by=[r if isinstance(r, dict) else {"all": list(r)} for r in entry.get("implied_by") or []])
    for spec in labels.values():
        for p in spec.parents + [x for r in spec.implied_by for x in r.get("all", []) + r.get("none", [])]:
            if p not in labels:
                raise VocabError(f"{where}: label {spec.name!r} refers to unknown label {p!r}")

    nf = data.get("no_finding")
    if nf:
        if nf.get("label") not in labels:
            raise VocabError(f"{where}: no_finding.label {nf.get('label')!r} is not a label")
        if nf.get("suppressors"):
            suppressors = _phrases(nf["suppressors"], macros, where + ": no_finding")
            labels["__other_findings__"] = LabelSpec("__other_findings__", hidden=True, patterns=suppressors)

    cue_data = data.get("cues") or {}
    cues = []
    for ctype in CUE_TYPES:
        group, _, direction = ctype.partition("_")
        phrases = cue_data.get(group, {}).get(direction) if direction else cue_data.get(group)
        for pat in _phrases(phrases or [], macros, f"{where}: cues.{ctype}", plural=False):
            cues.append((ctype, pat))
    terminators = _compile(cue_data.get("terminators") or [], macros, f"{where}: cues.terminators", plural=False)
    verbs = _compile(cue_data.get("verbs") or [], macros, f"{where}: cues.verbs", plural=False)

    measurements = []
    for m in data.get("measurements") or []:
        here = f"{where}: measurement {m.get('name')!r}"
        for r in m.get("ranges", []):
            for lab in _as_list(r.get("positive")) + _as_list(r.get("negative")):
                if lab not in labels:
                    raise VocabError(f"{here}: unknown label {lab!r}")
        excl = m.get("exclude")
        measurements.append(Measurement(
            name=m.get("name", ""), subject=_compile(m["subject"], macros, here)[0],
            exclude=_compile(excl, macros, here)[0] if excl else None, ranges=m.get("ranges", []),
            window=int(m.get("window", 60))))

    hierarchy = data.get("hierarchy") or {}
    sections = {k: [s.lower() for s in (data.get("sections") or {}).get(k, [])] for k in ("diagnosis", "findings",
                                                                                         "ignore")}
    return Vocabulary(name=data.get("name", path.stem), labels=labels, cues=cues, terminators=terminators,
                      verbs=verbs[0] if verbs else None, sections=sections, measurements=measurements,
                      no_finding=nf, negate_children=bool(hierarchy.get("negate_children", True)),
                      roll_up_uncertain=bool(hierarchy.get("roll_up_uncertain", True)))


def _as_list(x) -> list:
    return [] if x is None else [x] if isinstance(x, str) else list(x)
