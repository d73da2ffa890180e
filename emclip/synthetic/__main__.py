"""``python -m emclip.synthetic --out DIR --patients N --seed S [--image-size PX]``: write the embedded cohort."""
from __future__ import annotations

import argparse
import sys
import time

from .cohort import DEMO_PATIENTS, generate_cohort


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emclip.synthetic", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("--out", required=True, help="output folder (created; existing files are overwritten)")
    parser.add_argument("--patients", type=int, default=DEMO_PATIENTS,
                        help=f"number of patients (default {DEMO_PATIENTS}, the embedded demo cohort)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed gives a byte-identical cohort")
    parser.add_argument("--image-size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--without-diagnosis", action="store_true",
                        help="leave the diagnosis column out of reports.csv (labels then come from the report "
                             "labeler); the truth goes to diagnosis_truth.csv")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = generate_cohort(args.out, args.patients, args.seed, args.image_size, workers=args.workers,
                              with_diagnosis=not args.without_diagnosis)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.patients} patients to {out} in {time.perf_counter() - start:.1f} s; "
          f"check it with: python -m emclip.data check {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
