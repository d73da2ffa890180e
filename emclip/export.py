"""A trained run as a self-contained model folder: what a colleague needs to apply it, without the run or its data.

    python -m emclip.export RUN --out MODEL_DIR

MODEL_DIR holds ``model.safetensors`` (every weight), ``config.json`` (architecture, preprocessing, the effective
nm/px range of the training images, the training configuration), ``prompts.yaml`` (the zero-shot classes),
the text tokenizer's files, ``README.md`` (a model card: training cohort, headline metrics with 95% CIs, intended
use, limits) and ``checksums.json`` (SHA-256 of every file, checked when the folder is loaded). The layout is the
Hugging Face one (config + weights + README), so it can be uploaded as it is; emclip itself never needs a network.
Load it with ``emclip.load(MODEL_DIR)`` or name it as the MODEL of ``predict`` / ``embed`` / ``search``.
"""
from __future__ import annotations

import sys

from .serving.cli import command_parser, check_output, run


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("export", __doc__)
    parser.add_argument("run", help="a run folder (runs/<set>/<arm>)")
    parser.add_argument("--out", required=True, help="the model folder to write (refused if it exists, unless "
                                                     "--force replaces a model folder exported before)")
    parser.add_argument("--checkpoint", default="best", help="best (default), latest, or a step folder's name")
    parser.add_argument("--force", action="store_true", help="replace a model folder already at --out")
    args = parser.parse_args(argv)

    from .api import load
    out = check_output(args.out, args.force, {"run": args.run}, kind="folder")
    trained = load(args.run, checkpoint=args.checkpoint, device="cpu")
    folder = trained.export(out, force=args.force)
    print(f"exported {trained.source.name} ({args.checkpoint} checkpoint) -> {folder}")
    print(f"use it: python -m emclip.predict {folder} COHORT --out predictions.csv")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
