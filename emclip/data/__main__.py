"""``python -m emclip.data check DIR``: validate a cohort folder and print its summary (exit 0) or its problems,
one line each (exit 2)."""
from __future__ import annotations

import argparse
import json
import sys

from .cohort import validate_cohort
from .diagnoses import UNCERTAIN_POLICIES, LabelOptions


def _print_summary(s: dict) -> None:
    ipp, nm = s["images_per_patient"], s["nm_per_pixel"]
    print(f"cohort {s['root']}: OK")
    print(f"  patients            {s['patients']}")
    print(f"  images              {s['images']}")
    print(f"  images per patient  min {ipp['min']}, median {ipp['median']:g}, mean {ipp['mean']:g}, max {ipp['max']}")
    print(f"  scale (nm/px)       min {nm['min']:g}, median {nm['median']:g}, max {nm['max']:g}")
    print(f"  splits ({s['split_source']:>6})     " + ", ".join(f"{k} {v}" for k, v in s["splits"].items()))
    lab = s["labels"]
    src = lab["sources"]
    how = lab["labeler"]
    parts = [f"{src['given']} given"]
    if how.startswith(("report labeler", "labels file")):
        parts.append(f"{src['labeler']} from the {how}")
    parts.append(f"{src['none']} none" + (" (no labeler: label_vocab is none)" if how == "no labeler" else ""))
    print("  diagnosis source    " + ", ".join(parts))
    if src["labeler"] or lab["hedged"]:
        policy = "counted as positive" if lab["uncertain"] == "positive" else "excluded"
        print(f"  hedged diagnoses    {lab['hedged']} ({policy}; label_uncertain={lab['uncertain']})")
    if lab.get("labels_file_rows_unmatched"):
        print(f"  labels file         {lab['labels_file_rows_unmatched']} row(s) name patients not in this cohort")
    if src["none"]:
        print(f"  unlabelled          {src['none']} patient(s) train but are excluded from zero-shot, probe and "
              f"labelled metrics")
    if "diagnoses" in s:
        width = max(len(k) for k in s["diagnoses"])
        print("  diagnoses" + " " * (width - 7) + "train   val  test")
        for name, counts in s["diagnoses"].items():
            print(f"    {name:<{width}} {counts['train']:>5} {counts['val']:>5} {counts['test']:>5}")
    else:
        print("  diagnoses           none (zero-shot evaluation, the probe and the diagnosis audit will be skipped)")
    if s.get("shared_images"):
        print(f"  shared images       {s['shared_images']} image(s) are also another patient's in the same split "
              f"(weigh twice; listed above)")
    if s.get("image_warnings"):
        print(f"  read with a warning {s['image_warnings']} image(s) (listed above)")
    if "dropped" in s:
        print(f"  dropped             {s['dropped']['images']} image(s), {s['dropped']['patients']} patient(s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emclip.data")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a cohort folder (images.csv + reports.csv)")
    check.add_argument("dir", help="cohort folder")
    check.add_argument("--images", choices=["decode", "header", "exists", "none"], default="decode",
                       help="how far to check image files: decode every file (default); header: size guards and "
                            "TIFF layout from the headers, nothing decoded; exists: non-empty files; none")
    check.add_argument("--workers", type=int, default=4, help="threads for image checks")
    check.add_argument("--json", action="store_true", help="print the summary as JSON")
    check.add_argument("--drop-invalid", action="store_true",
                       help="drop invalid rows instead of failing; the problems and drop counts are still printed")
    check.add_argument("--label-vocab", default="renal",
                       help="labeler vocabulary for patients without a diagnosis: renal (default), chexpert, a YAML "
                            "path, or none")
    check.add_argument("--labels-file", default=None,
                       help="labels table from `python -m emclip.labels` to use instead of labelling on the fly")
    check.add_argument("--label-uncertain", choices=UNCERTAIN_POLICIES, default="exclude",
                       help="a diagnosis the report only hedges: exclude it (default) or count it as positive")
    args = parser.parse_args(argv)
    vocab = None if args.label_vocab.strip().lower() in ("none", "null", "") else args.label_vocab
    labels = LabelOptions(vocab, args.labels_file, args.label_uncertain)
    cohort, problems = validate_cohort(args.dir, args.images, args.workers, progress=sys.stderr.isatty(),
                                       drop_invalid=args.drop_invalid, labels=labels)
    for p in problems:
        print(p, file=sys.stderr if cohort is not None else sys.stdout)
    if cohort is None:
        print(f"{len(problems)} problem(s) found in {args.dir}", file=sys.stderr)
        return 2
    for line in cohort.image_warnings + cohort.content_warnings:
        print(f"warning: {line}", file=sys.stderr)
    if args.json:
        print(json.dumps(cohort.summary(), indent=2))
    else:
        _print_summary(cohort.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
