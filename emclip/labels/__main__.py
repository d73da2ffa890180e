"""``python -m emclip.labels REPORTS.csv --vocab renal|chexpert|PATH --out labels.csv [--uncertain keep]``

Writes a labels table: the id column (``patient_id`` by default), ``primary_diagnosis``, then one column per label
with 1 (positive), 0 (negative), -1 (uncertain) or empty (not mentioned), as in CheXpert's CSV files. If the input
has a ``diagnosis`` column, prints the agreement of ``primary_diagnosis`` with it. Bad input stops with an error that
names the file, the row and the problem.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from .agreement import agreement
from .labeler import Labeler
from .vocab import VocabError


class LabelInputError(ValueError):
    """A reports table the labeler cannot use; the message names the file and the rows."""


def read_reports(path: Path, text_column: str = "report", id_column: str = "patient_id") -> pd.DataFrame:
    """Read a reports table (CSV or Parquet) and check it: required columns present, no empty report."""
    if not path.exists():
        raise LabelInputError(f"{path}: file not found")
    try:
        table = pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pd.read_csv(
            path, dtype={id_column: str}, keep_default_na=False, na_values=[])
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise LabelInputError(f"{path}: cannot be read as a table: {err}") from err
    missing = [c for c in (id_column, text_column) if c not in table.columns]
    if missing:
        raise LabelInputError(f"{path}: missing required column(s) {', '.join(map(repr, missing))} "
                              f"(found: {', '.join(map(str, table.columns))})")
    if table.empty:
        raise LabelInputError(f"{path}: no rows")
    text = table[text_column]
    empty = [i for i, v in enumerate(text) if v is None or (isinstance(v, float) and v != v) or not str(v).strip()]
    if empty:
        shown = ", ".join(f"row {i + 1} ({id_column} {table[id_column].iloc[i]!s})" for i in empty[:10])
        more = f" and {len(empty) - 10} more" if len(empty) > 10 else ""
        raise LabelInputError(f"{path}: empty {text_column!r} in {shown}{more} (rows count from 1, header excluded)")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emclip.labels", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", type=Path, help="reports table (CSV or Parquet) with id and report columns")
    parser.add_argument("--vocab", default="renal", help="'renal', 'chexpert' or a path to a vocabulary YAML file")
    parser.add_argument("--out", type=Path, required=True,
                        help="output CSV (required: nothing is written beside your reports unless you ask)")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it already exists")
    parser.add_argument("--text-column", default="report", help="column holding the report text (default: report)")
    parser.add_argument("--id-column", default="patient_id",
                        help="id column copied to the output (default: patient_id)")
    parser.add_argument("--uncertain", choices=["keep", "positive", "negative"], default="keep",
                        help="code uncertain mentions in the label columns as -1 (keep, default), 1 or 0; "
                             "primary_value always keeps -1 for a hedged diagnosis")
    parser.add_argument("--truth-column", default="diagnosis",
                        help="reference diagnosis column; agreement is printed when present (default: diagnosis)")
    args = parser.parse_args(argv)
    try:
        labeler = Labeler(args.vocab)
        reports = read_reports(args.reports, args.text_column, args.id_column)
    except (VocabError, LabelInputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = labeler.label_frame(reports, args.text_column, keep=(args.id_column,), uncertain=args.uncertain,
                                progress=sys.stderr.isatty())
    out = args.out
    if out.resolve() == args.reports.resolve():
        print(f"error: refusing to overwrite the input {args.reports}; pass another --out", file=sys.stderr)
        return 2
    if out.exists() and not args.force:
        print(f"error: {out} exists; pass --force to overwrite it, or another --out", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    n_primary = int(table["primary_diagnosis"].notna().sum())
    n_hedged = int((table["primary_value"] == -1).sum())
    print(f"wrote {out}: {len(table)} reports x {len(labeler.labels)} labels ({labeler.vocab.name}); "
          f"primary diagnosis found for {n_primary}/{len(table)} ({n_hedged} only hedged: primary_value -1)")
    print(f"use it for a cohort with: labels_file: {out}  (params train: section, or -p labels_file {out})")
    if args.truth_column in reports.columns:
        print(f"\nagreement of primary_diagnosis with {args.truth_column!r}:")
        print(agreement(table, reports[args.truth_column]).summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
