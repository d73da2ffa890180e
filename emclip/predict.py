"""Zero-shot diagnosis of every patient of a cohort with a trained model: one row per patient.

    python -m emclip.predict MODEL COHORT --out predictions.csv [--classes my_classes.yaml]

The columns are those of the evaluation's ``predictions.csv``: ``patient_id``, ``diagnosis`` (when the cohort has
one), ``patient_pred`` and ``patient_p[<class>]`` (softmax over the classes), the label-free prior-corrected
``prior_corrected_pred`` / ``prior_corrected_p[<class>]``, then ``n_images``, ``nm_per_pixel_min`` / ``_max`` (as
given), ``most_attended_image`` and its ``attention``.
"""
from __future__ import annotations

import sys

from .serving.cli import COHORT_HELP, MODEL_HELP, add_device, check_output, command_parser, run


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("predict", __doc__)
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("cohort", help=COHORT_HELP)
    parser.add_argument("--out", required=True, help="the CSV to write (refused if it exists, unless --force)")
    parser.add_argument("--classes", help="a prompt YAML (`classes:` with names, synonyms; `templates:`) to score "
                                          "instead of the model's own classes")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_device(parser)
    args = parser.parse_args(argv)

    from .api import load
    from .paths import write_text_atomic
    out = check_output(args.out, args.force, {"cohort": args.cohort, "model": args.model})
    trained = load(args.model, device=args.device)
    table = trained.predict(args.cohort, classes=args.classes, batch_size=args.batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, table.to_csv(index=False))
    counts = table.patient_pred.value_counts()
    print(f"{len(table)} patients, {int(table.n_images.sum())} images -> {out}")
    print("predicted: " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
