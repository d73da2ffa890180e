"""The cohort contract: loading, validating and splitting ``images.csv`` + ``reports.csv`` (or Parquet).

Every rule violation becomes a :class:`Problem` naming the file, the data row (1-based, header excluded) and what
is wrong. Nothing is dropped silently: either loading fails with all problems listed, or, with
``drop_invalid=True``, offending rows are removed and counted in ``Cohort.dropped``.
"""
from __future__ import annotations

import csv
import hashlib
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ..progress import bars_disabled
from .diagnoses import LabelOptions, assign_diagnoses, read_labels_file, source_counts
from .images import check_file, collect_image_warnings, probe_image, read_image
from .splits import DEFAULT_FRACTIONS, SPLITS, assign_splits

IMAGE_COLUMNS = ("patient_id", "path", "nm_per_pixel")
REPORT_COLUMNS = ("patient_id", "report")
# none: no file access; exists: a non-empty regular file; header: also the size guards and the TIFF page/photometric
# decisions from the header (nothing decoded, see images.probe_image); decode: every image read as for training.
CHECK_LEVELS = ("none", "exists", "header", "decode")
# nm per pixel outside this range is almost surely another unit (µm: 0.002-0.1) or a typo; refused with the reason.
NM_PER_PIXEL_RANGE = (0.1, 50000.0)
_STRICT_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
UNLABELLED = "(no diagnosis)"  # how summaries and tables show a patient whose diagnosis_source is "none"


@dataclass(frozen=True)
class Problem:
    file: str
    row: int | None
    message: str
    patient_id: str | None = None

    def __str__(self) -> str:
        where = self.file if self.row is None else f"{self.file}, row {self.row}"
        who = f" (patient {self.patient_id})" if self.patient_id else ""
        return f"{where}{who}: {self.message}"


class CohortError(ValueError):
    """The cohort violates the contract; ``problems`` lists every violation found."""

    def __init__(self, root: Path, problems: list[Problem]):
        self.root, self.problems = root, problems
        head = "\n".join(f"  {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"cohort {root} has {len(problems)} problem(s):\n{head}{more}")


@dataclass
class Cohort:
    root: Path
    images: pd.DataFrame          # patient_id, path (absolute), nm_per_pixel (float), extra columns
    reports: pd.DataFrame         # patient_id, report, diagnosis (None = unknown), diagnosis_source, diagnosis_note,
    #                               split, extra columns
    split_source: str             # "column", "seeded", or "none" (a cohort to apply a model to, without splits)
    dropped: dict = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    labels: dict = field(default_factory=dict)  # where the diagnoses came from (emclip.data.diagnoses)
    content_warnings: list[str] = field(default_factory=list)  # images shared by two patients of one split
    image_warnings: list[str] = field(default_factory=list)    # files read with a warning (e.g. NaN pixels)

    def patient_ids(self, split: str | None = None) -> list[str]:
        rep = self.reports if split is None else self.reports[self.reports.split == split]
        return list(rep.patient_id)

    def bag(self, patient_id: str) -> pd.DataFrame:
        """The patient's image rows, in table order; the index is the image's row number in ``images``."""
        return self.images.iloc[self._groups[patient_id]]

    def report(self, patient_id: str) -> pd.Series:
        return self.reports.loc[self._report_row[patient_id]]

    @property
    def has_diagnosis(self) -> bool:
        return self.reports.diagnosis.notna().any()

    def __post_init__(self):
        self.images = self.images.reset_index(drop=True)
        self.reports = self.reports.reset_index(drop=True)
        if "diagnosis_source" not in self.reports.columns:  # a Cohort built by hand: its diagnoses are given
            given = self.reports.diagnosis.notna() if "diagnosis" in self.reports.columns else False
            self.reports["diagnosis_source"] = pd.Series(given, index=self.reports.index).map(
                {True: "given", False: "none"})
            self.reports["diagnosis_note"] = ""
        self._groups = self.images.groupby("patient_id", sort=False).indices
        self._report_row = dict(zip(self.reports.patient_id, self.reports.index))

    def summary(self) -> dict:
        per = self.images.groupby("patient_id").size()
        out = {"root": str(self.root), "patients": int(len(self.reports)), "images": int(len(self.images)),
               "images_per_patient": {"min": int(per.min()), "median": float(per.median()),
                                      "mean": round(float(per.mean()), 2), "max": int(per.max())},
               "nm_per_pixel": {"min": float(self.images.nm_per_pixel.min()),
                                "median": float(self.images.nm_per_pixel.median()),
                                "max": float(self.images.nm_per_pixel.max())},
               "splits": {s: int((self.reports.split == s).sum()) for s in SPLITS},
               "split_source": self.split_source}
        if self.has_diagnosis:
            dx = self.reports.diagnosis.fillna(UNLABELLED)
            out["diagnoses"] = {str(k): {s: int(((dx == k) & (self.reports.split == s)).sum()) for s in SPLITS}
                                for k in sorted(dx.unique(), key=lambda k: (k == UNLABELLED, str(k)))}
        out["labels"] = {**self.labels, "by_split": source_counts(self.reports, SPLITS)}
        if self.dropped:
            out["dropped"] = dict(self.dropped)
        if self.content_warnings:
            out["shared_images"] = len(self.content_warnings)
        if self.image_warnings:
            out["image_warnings"] = len(self.image_warnings)
        return out


def _read_table(root: Path, stem: str, problems: list[Problem]) -> tuple[pd.DataFrame | None, str]:
    found = [root / f"{stem}{ext}" for ext in (".csv", ".parquet", ".pq") if (root / f"{stem}{ext}").is_file()]
    name = f"{stem}.csv"
    if not found:
        problems.append(Problem(name, None, f"missing table: expected {root / name} (or {stem}.parquet)"))
        return None, name
    if len(found) > 1:
        problems.append(Problem(found[0].name, None, f"ambiguous: both {found[0].name} and {found[1].name} exist"))
        return None, found[0].name
    path = found[0]
    try:
        if path.suffix == ".csv":
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            df = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - an unreadable table is one problem, reported with its cause
        problems.append(Problem(path.name, None, f"cannot read table ({type(err).__name__}: {err})"))
        return None, path.name
    df.columns = [str(c).strip() for c in df.columns]
    if path.suffix == ".csv":   # pandas renames a repeated header "report" to "report.1": refuse, never pick one
        with open(path, encoding="utf-8", errors="replace") as fh:
            header = [h.strip().strip('"') for h in next(csv.reader([fh.readline()]), [])]
        dup = sorted({h for h in header if header.count(h) > 1})
    else:
        dup = sorted({c for c in df.columns if list(df.columns).count(c) > 1})
    if dup:
        problems.append(Problem(path.name, None, f"duplicate column(s) {', '.join(map(repr, dup))}: which one is "
                                                 f"meant is ambiguous; keep one"))
        return None, path.name
    if df.empty:
        problems.append(Problem(path.name, None, "the table has a header but no rows"))
        return None, path.name
    return df, path.name


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


# Cell values that mean "nothing here" in exported spreadsheets; zero-width and other invisible characters too.
NA_TOKENS = {"na", "n/a", "n.a.", "nan", "none", "null", "-", "--", "?", "unknown", "missing", "not available"}
_INVISIBLE = re.compile(r"[\s\u200b\u200c\u200d\u2060\ufeff]+")


def is_blank(value) -> bool:
    """True for empty cells, NA-like tokens ("N/A", "-", "none") and text of invisible characters only."""
    text = _INVISIBLE.sub(" ", _text(value)).strip()
    return not text or text.lower() in NA_TOKENS


def _resolved(path: Path, real_dirs: dict | None = None) -> str:
    """``path.resolve()``, with the folder part resolved once per folder (``real_dirs`` remembers them for one
    table): resolving every component of 600,000 paths took minutes; the file itself is resolved only when it is a
    symlink."""
    try:
        folder, name = os.path.split(str(path))
        if real_dirs is None or name in ("", ".", ".."):
            return str(path.resolve())
        if folder not in real_dirs:
            real_dirs[folder] = os.path.realpath(folder)
        full = os.path.join(real_dirs[folder], name)
        return os.path.realpath(full) if os.path.islink(full) else full
    except (OSError, RuntimeError):   # a symlink loop (RuntimeError before Python 3.13); the file check names it
        return os.path.abspath(path)


def _check_images_table(df: pd.DataFrame, name: str, root: Path, problems: list[Problem]) -> pd.DataFrame:
    bad = set()
    seen_path: dict[str, int] = {}
    paths, scales, real_dirs = [], [], {}
    for i, (pid, rel, raw_scale) in enumerate(zip(df.patient_id, df.path, df.nm_per_pixel)):
        row, pid, rel = i + 1, _text(pid), _text(rel)
        if not pid:
            problems.append(Problem(name, row, "patient_id is empty"))
            bad.add(i)
        if not rel:
            problems.append(Problem(name, row, "path is empty", pid or None))
            bad.add(i)
        full = _resolved(root / rel, real_dirs) if rel and not Path(rel).is_absolute() else rel
        if full and full in seen_path:
            problems.append(Problem(name, row, f"duplicate image path {rel!r} (also row {seen_path[full]})", pid))
            bad.add(i)
        seen_path.setdefault(full, row)
        paths.append(full)
        text = _text(raw_scale)
        try:  # strict: float() would read "4_2" as 42.0 and " inf" as infinity
            scale = float(text) if _STRICT_NUMBER.fullmatch(text) or text.lower() in ("inf", "-inf", "nan") else None
        except ValueError:
            scale = None
        if text == "":
            problems.append(Problem(name, row, "nm_per_pixel is missing", pid or None))
        elif scale is None:
            problems.append(Problem(name, row, f"nm_per_pixel {text!r} is not a number", pid or None))
        elif not math.isfinite(scale):
            problems.append(Problem(name, row, f"nm_per_pixel {text!r} is not finite", pid or None))
        elif scale <= 0:
            problems.append(Problem(name, row, f"nm_per_pixel {text!r} must be > 0", pid or None))
        elif not NM_PER_PIXEL_RANGE[0] <= scale <= NM_PER_PIXEL_RANGE[1]:
            hint = " (a value in µm? multiply by 1000)" if scale < NM_PER_PIXEL_RANGE[0] else ""
            problems.append(Problem(name, row, f"nm_per_pixel {text!r} is outside the plausible "
                                               f"{NM_PER_PIXEL_RANGE[0]:g}-{NM_PER_PIXEL_RANGE[1]:g} nm/px{hint}",
                                    pid or None))
            scale = -1.0
        if scale is None or not math.isfinite(scale) or scale <= 0:
            bad.add(i)
            scale = float("nan")
        scales.append(scale)
    out = df.copy()
    out["patient_id"] = [_text(p) for p in df.patient_id]
    out["path"] = paths
    out["nm_per_pixel"] = scales
    out["_row"] = range(1, len(df) + 1)
    out["_bad"] = [i in bad for i in range(len(df))]
    return out


def _check_image_files(images: pd.DataFrame, name: str, level: str, workers: int, progress: bool,
                       problems: list[Problem]) -> list[str]:
    """Check every file at ``level`` and return the readers' warnings (one line each, with the row); also record what identifies its content, for the leakage check: the file
    (device, inode: a hard link or a second path to one file) and, when decoding, a digest of the decoded pixels
    (a copy under another name or format)."""
    todo = images[~images._bad]

    def probe(path: str) -> tuple[str | None, str, str, list[str]]:
        if not os.path.lexists(path):
            return f"image file not found: {path}", "", "", []
        with collect_image_warnings() as notes:
            try:   # exists: a non-empty regular file; header: no pixel decoded; decode: read as for training
                st = check_file(path)
                pixels = read_image(path) if level == "decode" else None
                if level == "header":
                    probe_image(path)
            except Exception as err:  # noqa: BLE001 - report, do not crash on one bad file
                return str(err), "", "", []
        digest = "" if pixels is None else hashlib.blake2b(pixels.tobytes(), digest_size=16,
                                                            person=str(pixels.shape).encode()[:16]).hexdigest()
        return None, f"{st.st_dev}:{st.st_ino}", digest, list(notes)

    file_ids, digests, warned = {}, {}, []
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        results = pool.map(probe, todo.path)
        for (idx, row), (message, file_id, digest, notes) in zip(
                todo.iterrows(), tqdm(results, total=len(todo), desc=f"checking images ({level})", unit="img",
                                      disable=not progress or bars_disabled())):
            if message:
                problems.append(Problem(name, int(row._row), message, row.patient_id))
                images.loc[idx, "_bad"] = True
            file_ids[idx], digests[idx] = file_id, digest
            warned += [f"{name}, row {int(row._row)} (patient {row.patient_id}): {note}" for note in notes]
    images["_file_id"] = pd.Series(file_ids, dtype=object).reindex(images.index).fillna("")
    images["_pixels"] = pd.Series(digests, dtype=object).reindex(images.index).fillna("")
    return warned


def _shared_content(images: pd.DataFrame, split_of: dict[str, str], name: str) -> tuple[list[Problem], list[str]]:
    """Images whose content is also another patient's: the same file (hard link, second path) or the same decoded
    pixels. Across splits that is leakage (a problem on the row in the later split); within one split it is a
    warning (a duplicated image weighs twice)."""
    order = {s: i for i, s in enumerate(SPLITS)}
    problems, warnings = [], []
    for column, what in (("_file_id", "the same file"), ("_pixels", "identical pixels")):
        if column not in images.columns:
            continue
        keyed = images[images[column] != ""]
        for _, grp in keyed[keyed.duplicated(column, keep=False)].groupby(column, sort=False):
            grp = grp.assign(_split=grp.patient_id.map(split_of)).sort_values(
                "_split", key=lambda s: s.map(order), kind="stable")
            first = grp.iloc[0]
            for _, row in grp.iloc[1:].iterrows():
                if row.patient_id == first.patient_id and column == "_pixels":
                    continue   # one patient's repeated image is not leakage; a second path to one file is refused
                same = (f"{what} as row {int(first._row)} (patient {first.patient_id}, {first._split} split)")
                if row._split != first._split:
                    problems.append(Problem(name, int(row._row), f"{same}: leakage across splits ({row._split} "
                                                                 f"here); remove the copy or fix the patient", row.patient_id))
                elif row.patient_id != first.patient_id:
                    warnings.append(f"{name}, row {int(row._row)} (patient {row.patient_id}): {same}")
    return problems, warnings


def _too_small(reports: pd.DataFrame, name: str, split_source: str) -> list[Problem]:
    """Training selects its checkpoint on val and every evaluation scores test: each split needs patients."""
    counts = {s: int((reports.split == s).sum()) for s in SPLITS}
    empty = [s for s, n in counts.items() if n == 0]
    if not empty:
        return []
    shown = ", ".join(f"{n} {s}" for s, n in counts.items())
    how = ("the split column leaves it empty: give every split patients" if split_source == "column"
           else f"{len(reports)} patient(s) are too few for seeded 70/15/15 splits: add patients or a split column")
    return [Problem(name, None, f"the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty "
                                f"({shown}): training needs train and val, evaluation needs test; {how}")]


def _reports_from_images(images: pd.DataFrame) -> pd.DataFrame:
    """The reports table of an images-only cohort: one row per patient of ``images.csv`` (first-seen order), no
    report text, no diagnosis and no split (a new patient to embed or predict needs none of them)."""
    pids = list(dict.fromkeys(_text(p) for p in images.patient_id if _text(p)))
    return pd.DataFrame({"patient_id": pids, "report": [""] * len(pids)})


def _check_reports_table(df: pd.DataFrame, name: str, problems: list[Problem],
                         reports_required: bool = True) -> pd.DataFrame:
    out = df.copy()
    out["patient_id"] = [_text(p) for p in df.patient_id]
    out["_row"] = range(1, len(df) + 1)
    bad = [False] * len(df)
    first_row: dict[str, int] = {}
    has_split = "split" in df.columns
    splits = [_text(s).lower() for s in df.split] if has_split else [""] * len(df)
    for i, (pid, text) in enumerate(zip(out.patient_id, df.report)):
        row = i + 1
        if not pid:
            problems.append(Problem(name, row, "patient_id is empty"))
            bad[i] = True
            continue
        if pid in first_row:
            j = first_row[pid]
            if has_split and splits[j - 1] != splits[i]:
                problems.append(Problem(name, row, f"patient is in two splits ({splits[j - 1]!r} in row {j}, "
                                                   f"{splits[i]!r} here)", pid))
            else:
                problems.append(Problem(name, row, f"duplicate patient_id (also row {j})", pid))
            bad[i] = bad[j - 1] = True
        first_row.setdefault(pid, row)
        if is_blank(text) and reports_required:
            shown = _text(text)
            problems.append(Problem(name, row, "report is empty" + (f" ({shown!r} is not a report)" if shown else ""),
                                    pid))
            bad[i] = True
        if has_split and splits[i] not in SPLITS and (reports_required or splits[i]):
            shown = splits[i] or "(empty)"
            problems.append(Problem(name, row, f"split {shown!r} is not one of {', '.join(SPLITS)}", pid))
            bad[i] = True
    if has_split:
        out["split"] = splits
    out["report"] = ["" if is_blank(t) else _text(t) for t in df.report] if not reports_required else \
        [_text(t) for t in df.report]
    out["_bad"] = bad
    return out


def validate_cohort(root: str | Path, check_images: str = "decode", workers: int = 4, progress: bool = False,
                    split_fractions=DEFAULT_FRACTIONS, seed: int = 0, drop_invalid: bool = False,
                    labels: LabelOptions | None = None, require_splits: bool = True,
                    reports_required: bool = True) -> tuple[Cohort | None, list[Problem]]:
    """Load and validate a cohort folder; returns (cohort or None, problems). ``require_splits=False`` accepts a
    split left empty (a benchmark or a feature export needs no val or test; training and evaluation do).

    ``reports_required=False`` is the contract of a cohort to *apply* a model to (``emclip.api``, ``predict``,
    ``embed``): ``images.csv`` alone is enough; a ``reports.csv`` beside it may leave reports, diagnoses and splits
    empty, and no split is drawn (patients without a split column have split ``""``). Everything about the images
    (``nm_per_pixel``, paths, files) is checked exactly as for training.

    Patients without a ``diagnosis`` get one from their report as ``labels`` says (default: the ``renal`` report
    labeler; see :mod:`emclip.data.diagnoses`), before the splits are stratified by it."""
    labels = labels if labels is not None else LabelOptions()
    if check_images not in CHECK_LEVELS:
        raise ValueError(f"check_images must be one of {CHECK_LEVELS}, got {check_images!r}")
    try:
        root = Path(root).expanduser().resolve()
    except (OSError, RuntimeError):   # RuntimeError: a symlink loop (Python < 3.13)
        return None, [Problem(str(root), None, "cohort folder is a symlink loop")]
    problems: list[Problem] = []
    if not root.is_dir():
        return None, [Problem(str(root), None, "cohort folder does not exist")]
    images, img_name = _read_table(root, "images", problems)
    reports, rep_name = _read_table(root, "reports", problems)
    if reports is None and not reports_required and not any(p.file == rep_name and "missing table" not in p.message
                                                            for p in problems):
        problems[:] = [p for p in problems if p.file != rep_name]   # no reports.csv: an images-only cohort
        if images is not None and "patient_id" in images.columns:
            reports = _reports_from_images(images)
    for df, name, required in ((images, img_name, IMAGE_COLUMNS), (reports, rep_name, REPORT_COLUMNS)):
        if df is not None:
            missing = [c for c in required if c not in df.columns]
            if missing:
                problems.append(Problem(name, None, f"missing column(s): {', '.join(missing)}; "
                                                    f"found: {', '.join(df.columns) or '(none)'}"))
    if problems:   # table-level problems: row checks would only repeat them
        return None, problems
    images = _check_images_table(images, img_name, root, problems)
    reports = _check_reports_table(reports, rep_name, problems, reports_required)
    labels_table = read_labels_file(labels.labels_file, problems) if labels.labels_file is not None else None
    known = set(reports.patient_id[reports.patient_id != ""])
    for idx, row in images[~images.patient_id.isin(known) & (images.patient_id != "")].iterrows():
        problems.append(Problem(img_name, int(row._row), f"unknown patient_id (not in {rep_name})", row.patient_id))
        images.loc[idx, "_bad"] = True
    if "split" in images.columns and "split" not in reports.columns:
        problems.append(Problem(img_name, None, f"has a split column but {rep_name} does not: splits are per patient "
                                                f"and read from {rep_name} only; move the column there (or delete "
                                                f"it for seeded splits)"))
    elif "split" in images.columns:   # a split column in images.csv must agree per patient and with reports.csv
        img_split = images.assign(split=[_text(s).lower() for s in images.split])
        rep_split = dict(zip(reports.patient_id, reports.split)) if "split" in reports.columns else {}
        for pid, grp in img_split.groupby("patient_id"):
            values = sorted(set(grp.split) | ({rep_split[pid]} if pid in rep_split else set()))
            if len(values) > 1:
                problems.append(Problem(img_name, int(grp._row.iloc[0]), f"patient is in two splits: {values}", pid))
                images.loc[grp.index, "_bad"] = True
    if check_images != "none":
        image_warnings = _check_image_files(images, img_name, check_images, workers, progress, problems)
    else:
        image_warnings = []
    with_images = set(images.patient_id[~images._bad])
    all_listed = set(images.patient_id)
    for idx, row in reports.iterrows():
        if row.patient_id and row.patient_id not in all_listed:
            problems.append(Problem(rep_name, int(row._row), f"patient has no images in {img_name}", row.patient_id))
            reports.loc[idx, "_bad"] = True
        elif row.patient_id and row.patient_id not in with_images:
            reports.loc[idx, "_bad"] = True    # every image of this patient is invalid; already reported
    if problems and not drop_invalid:
        return None, problems
    keep_reports = reports[~reports._bad]
    keep_images = images[~images._bad & images.patient_id.isin(set(keep_reports.patient_id))]
    if keep_reports.empty:
        return None, problems + [Problem(rep_name, None, "no valid patient left after dropping invalid rows")]
    unsplit = not reports_required and "split" not in keep_reports.columns
    if unsplit:
        keep_reports = keep_reports.assign(split="")   # nothing to train or select on: no split is drawn
    cohort = _build(root, keep_images, keep_reports, split_fractions, seed, labels, labels_table, progress)
    if unsplit:
        cohort.split_source = "none"
    cohort, leaks, small = _check_built(cohort, img_name, rep_name, drop_invalid)
    cohort.image_warnings = image_warnings
    small = small if require_splits and reports_required else []
    problems += leaks + small
    if small or (leaks and not drop_invalid):
        return None, problems
    if problems:
        cohort.dropped = {"images": len(images) - len(cohort.images), "patients": len(reports) - len(cohort.reports)}
        cohort.problems = problems
    return cohort, problems


def _check_built(cohort: Cohort, img_name: str, rep_name: str,
                 drop_invalid: bool) -> tuple[Cohort, list[Problem], list[Problem]]:
    """Checks that need the splits: content shared across splits (leakage) and splits left empty. With
    ``drop_invalid`` the leaking copies are dropped (and patients left without images); empty splits always fail."""
    images = cohort.images
    split_of = dict(zip(cohort.reports.patient_id, cohort.reports.split))
    leaks, cohort.content_warnings = _shared_content(images.rename(columns={"source_row": "_row"}), split_of, img_name)
    if leaks and drop_invalid:
        rows = {p.row for p in leaks}
        images = images[~images.source_row.isin(rows)]
        reports = cohort.reports[cohort.reports.patient_id.isin(set(images.patient_id))]
        cohort = Cohort(cohort.root, images, reports, cohort.split_source, labels=cohort.labels,
                        content_warnings=cohort.content_warnings)
    cohort.images = cohort.images.drop(columns=["_file_id", "_pixels"], errors="ignore")
    return cohort, leaks, _too_small(cohort.reports, rep_name, cohort.split_source)


def _build(root: Path, images: pd.DataFrame, reports: pd.DataFrame, fractions, seed: int, labels: LabelOptions,
           labels_table: pd.DataFrame | None, progress: bool) -> Cohort:
    reports, label_info = assign_diagnoses(reports, labels, labels_table, progress)
    if "split" in reports.columns:
        source = "column"
    else:
        mapping = assign_splits(list(reports.patient_id), list(reports.diagnosis), fractions, seed)
        reports["split"] = reports.patient_id.map(mapping)
        source = "seeded"
    images = images.drop(columns=["_bad"]).rename(columns={"_row": "source_row"})
    reports = reports.drop(columns=["_bad"]).rename(columns={"_row": "source_row"})
    return Cohort(root, images, reports, source, labels=label_info)


def load_cohort(root: str | Path, check_images: str = "exists", workers: int = 4, progress: bool = False,
                split_fractions=DEFAULT_FRACTIONS, seed: int = 0, drop_invalid: bool = False,
                labels: LabelOptions | None = None, require_splits: bool = True,
                reports_required: bool = True) -> Cohort:
    """Load a cohort, raising :class:`CohortError` listing every problem (unless ``drop_invalid``).
    ``reports_required=False``: images alone are enough (see :func:`validate_cohort`)."""
    cohort, problems = validate_cohort(root, check_images, workers, progress, split_fractions, seed, drop_invalid,
                                       labels, require_splits, reports_required)
    if cohort is None:
        raise CohortError(Path(root), problems)
    return cohort
