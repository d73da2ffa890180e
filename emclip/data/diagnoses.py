"""Where each patient's diagnosis comes from, recorded per patient in ``diagnosis_source``:

* ``given``: the ``diagnosis`` column of ``reports.csv`` (a non-empty cell);
* ``labeler``: the primary diagnosis the report labeler (``emclip.labels``) reads from the report, either on the fly
  with a vocabulary (default ``renal``) or from a labels table written once by ``python -m emclip.labels``;
* ``none``: no usable diagnosis (no labeler, none found, or only hedged and ``uncertain='exclude'``). These patients
  still train (training needs only images and reports) but are counted and excluded from every labelled metric.

``diagnosis_note`` says why, in words, for every patient that is not ``given``. Labels derived on the fly are
cached under ``cache_dir`` keyed by the report texts, the vocabulary and the labeler's code, because labelling
15,000 reports takes minutes and the cohort is loaded by every step of a run.
"""
from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..paths import write_text_atomic
from ..progress import bars_disabled

SOURCES = ("given", "labeler", "none")
UNCERTAIN_POLICIES = ("exclude", "positive")
LABELS_FILE_COLUMNS = ("patient_id", "primary_diagnosis")


@dataclass(frozen=True)
class LabelOptions:
    """How missing diagnoses are derived from reports (see the module docstring)."""

    vocab: str | None = "renal"        # labeler vocabulary (bundled name or YAML path); None: never label
    labels_file: str | Path | None = None  # labels table from ``python -m emclip.labels`` (replaces on-the-fly)
    uncertain: str = "exclude"         # a diagnosis the report only hedges: "exclude" it or count it ("positive")
    cache_dir: str | Path | None = None  # cache of on-the-fly labels; None: label on every load

    def __post_init__(self):
        if self.uncertain not in UNCERTAIN_POLICIES:
            raise ValueError(f"label_uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}, "
                             f"got {self.uncertain!r}")

    def describe(self) -> str:
        if self.labels_file is not None:
            return f"labels file {self.labels_file}"
        return f"report labeler ({self.vocab})" if self.vocab else "no labeler"


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()


def read_labels_file(path: str | Path, problems: list) -> pd.DataFrame | None:
    """A labels table (CSV or Parquet): ``patient_id``, ``primary_diagnosis`` and optionally ``primary_value``
    (1 stated, -1 hedged; a table without it is taken as stated). Problems are appended, naming file and row."""
    from .cohort import Problem  # cohort imports this module

    path = Path(path)
    name = str(path)
    if not path.is_file():
        problems.append(Problem(name, None, "labels file not found"))
        return None
    try:
        table = (pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq")
                 else pd.read_csv(path, dtype=str, keep_default_na=False))
    except Exception as err:  # noqa: BLE001 - an unreadable table is one problem, reported with its cause
        problems.append(Problem(name, None, f"cannot read labels file ({type(err).__name__}: {err})"))
        return None
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in LABELS_FILE_COLUMNS if c not in table.columns]
    if missing:
        problems.append(Problem(name, None, f"missing column(s): {', '.join(missing)}; found: "
                                            f"{', '.join(table.columns) or '(none)'} (write it with "
                                            f"python -m emclip.labels REPORTS --out FILE)"))
        return None
    out = pd.DataFrame({"patient_id": [str(p).strip() for p in table.patient_id],
                        "primary": [None if _blank(d) else str(d).strip() for d in table.primary_diagnosis]})
    values = []
    for i, v in enumerate(table["primary_value"] if "primary_value" in table.columns else [1] * len(table)):
        text = "" if _blank(v) else str(v).strip()
        try:
            value = int(float(text)) if text else None
        except ValueError:
            value = 0
        if value not in (1, -1, None) or (value is None and out.primary[i] is not None):
            problems.append(Problem(name, i + 1, f"primary_value {text!r} must be 1 (stated) or -1 (hedged)",
                                    out.patient_id[i]))
        values.append(value)
    out["value"] = values
    dup = out.patient_id[out.patient_id.duplicated()]
    for i in dup.index:
        problems.append(Problem(name, int(i) + 1, "duplicate patient_id", out.patient_id[i]))
    return out


def _labeler_fingerprint(vocab: str) -> bytes:
    """Bytes that change when the vocabulary (with its includes) or the labeler's rules change."""
    from ..labels import labeler, text, vocab as vocab_mod

    parts = [Path(m.__file__).read_bytes() for m in (labeler, text, vocab_mod)]
    path = vocab_mod.resolve_vocab_path(vocab)
    parts += [p.read_bytes() for p in sorted({path, *path.parent.glob("*.yaml")})]
    return b"\0".join(parts)


def label_texts(texts: list[str], vocab: str, cache_dir: str | Path | None = None,
                progress: bool = False) -> pd.DataFrame:
    """Primary diagnosis (``primary``), its value (1 / -1 / None) and where the labeler found it, one row per text.

    Cached in ``cache_dir/labels/`` (if given) under a key of the texts, the vocabulary and the labeler's code."""
    from ..labels import Labeler

    key = hashlib.sha256(_labeler_fingerprint(vocab))
    for t in texts:
        key.update(t.encode("utf-8") + b"\0")
    cache = Path(cache_dir) / "labels" / f"{Path(str(vocab)).stem}-{key.hexdigest()[:20]}.csv" if cache_dir else None
    if cache is not None and cache.is_file():
        table = pd.read_csv(cache, dtype={"primary": str, "where": str}, keep_default_na=False)
        if len(table) == len(texts):
            table["primary"] = [p or None for p in table.primary]
            table["value"] = [None if pd.isna(v) else int(v) for v in table.value]
            return table
    labeler = Labeler(vocab)
    from tqdm.auto import tqdm

    results = [labeler.label(t) for t in tqdm(texts, desc=f"labelling reports ({labeler.vocab.name})",
                                               unit="report", disable=not progress or bars_disabled())]
    table = pd.DataFrame({"primary": [r.primary for r in results], "value": [r.primary_value for r in results],
                          "where": [r.primary_source for r in results]})
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        table.assign(value=pd.array(table.value, dtype="Int64")).to_csv(buf, index=False)
        write_text_atomic(cache, buf.getvalue())
    return table


def assign_diagnoses(reports: pd.DataFrame, options: LabelOptions, labels_table: pd.DataFrame | None = None,
                     progress: bool = False) -> tuple[pd.DataFrame, dict]:
    """``reports`` with ``diagnosis``, ``diagnosis_source`` and ``diagnosis_note`` filled, and a summary dict.

    ``labels_table`` is the checked labels file (``read_labels_file``) when ``options.labels_file`` is set."""
    from .cohort import is_blank
    reports = reports.copy()
    raw = list(reports.diagnosis) if "diagnosis" in reports.columns else [None] * len(reports)
    given = [None if is_blank(d) else str(d).strip() for d in raw]
    na_note = [f"given value {str(d).strip()!r} read as missing" if d is not None and not _blank(d) and g is None
               else "" for d, g in zip(raw, given)]
    note = [""] * len(reports)
    given, spelled = _canonical(given, options.vocab)
    for i, old in spelled.items():
        note[i] = f"given as {old!r}, read as {given[i]!r} (the {options.vocab} vocabulary's spelling)"
    diagnosis, source = list(given), ["given" if d else "none" for d in given]
    todo = [i for i, d in enumerate(given) if d is None]
    hedged = 0
    derived: dict[int, tuple[str | None, int | None, str]] = {}
    if todo and options.labels_file is not None:
        lookup = {} if labels_table is None else {
            p: (d, v) for p, d, v in zip(labels_table.patient_id, labels_table.primary, labels_table.value)}
        for i in todo:
            pid = reports.patient_id.iloc[i]
            if pid in lookup:
                d, v = lookup[pid]
                derived[i] = (d, v, f"labels file {Path(options.labels_file).name}")
            else:
                note[i] = f"not in labels file {Path(options.labels_file).name}"
    elif todo and options.vocab:
        without = [i for i in todo if is_blank(reports.report.iloc[i])]   # a cohort to apply a model to may lack them
        for i in without:
            note[i] = "no diagnosis given and no report to label"
        texts = [i for i in todo if not is_blank(reports.report.iloc[i])]
        table = label_texts([str(reports.report.iloc[i]) for i in texts], options.vocab, options.cache_dir,
                            progress) if texts else pd.DataFrame({"primary": [], "value": [], "where": []})
        for i, (d, v, where) in zip(texts, zip(table.primary, table.value, table["where"])):
            derived[i] = (d, v, f"{options.vocab} labeler, {where}" if where else f"{options.vocab} labeler")
    elif todo:
        for i in todo:
            note[i] = "no diagnosis given and no labeler (label_vocab is none)"
    for i, (d, v, where) in derived.items():
        if d is None:
            note[i] = f"{where.split(',')[0]}: no diagnosis found in the report"
        elif v == -1 and options.uncertain == "exclude":
            hedged += 1
            note[i] = f"only hedged: {d} ({where}); excluded (label_uncertain=exclude)"
        else:
            hedged += v == -1
            diagnosis[i], source[i] = d, "labeler"
            note[i] = where + ("; hedged, counted as positive (label_uncertain=positive)" if v == -1 else "")
    note = [f"{a}; {b}" if a and b else a or b for a, b in zip(na_note, note)]
    # object columns: pandas 3 would infer a string dtype and turn the None of "no diagnosis" into NaN (truthy)
    for column, values in (("diagnosis", diagnosis), ("diagnosis_source", source), ("diagnosis_note", note)):
        reports[column] = pd.Series(values, index=reports.index, dtype=object)
    info = {"sources": {s: int(sum(x == s for x in source)) for s in SOURCES},
            "labeler": options.describe() if todo else "not needed (every diagnosis given)",
            "uncertain": options.uncertain, "hedged": int(hedged)}
    if options.labels_file is not None and labels_table is not None:
        info["labels_file_rows_unmatched"] = int((~labels_table.patient_id.isin(set(reports.patient_id))).sum())
    return reports, info


def _canonical(given: list[str | None], vocab: str | None) -> tuple[list[str | None], dict[int, str]]:
    """Given diagnoses spelled like a vocabulary diagnosis up to case and spaces ("Normal", "IgA  nephropathy") take
    the vocabulary's spelling, so that they match the bundled prompts; returns the values and {row: old spelling}."""
    if not vocab or not any(given):
        return given, {}
    from ..labels import load_vocab
    names = {" ".join(n.split()).casefold(): n for n, spec in load_vocab(vocab).labels.items()
             if spec.kind == "diagnosis"}
    out, changed = list(given), {}
    for i, d in enumerate(given):
        if d is not None:
            canon = names.get(" ".join(d.split()).casefold())
            if canon is not None and canon != d:
                out[i], changed[i] = canon, d
    return out, changed


def source_counts(reports: pd.DataFrame, splits) -> dict:
    """``{split: {source: n}}`` over the given split names."""
    return {s: {src: int(((reports.split == s) & (reports.diagnosis_source == src)).sum()) for src in SOURCES}
            for s in splits}
