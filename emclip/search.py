"""The patients or images of an embedding index most similar to a text, a patient or an image.

    python -m emclip.search DIR "fibrils of 10 nm, randomly arranged" -k 10
    python -m emclip.search DIR --patient P00017 -k 5
    python -m emclip.search DIR --image images/P00017/img_003.tif --level image
    python -m emclip.search DIR --image new.tif --nm-per-pixel 4.2 --level image

DIR is a folder ``python -m emclip.embed`` wrote. A text (or a new image file) is embedded by the model that wrote
the index (``--model`` to name it when it has moved); an indexed patient or image is looked up, no model needed.
"""
from __future__ import annotations

import sys

from .serving.cli import MODEL_HELP, command_parser, run


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("search", __doc__)
    parser.add_argument("index", help="an index folder written by `python -m emclip.embed`")
    parser.add_argument("text", nargs="?", help="a text query (a report, a finding)")
    parser.add_argument("--patient", help="an indexed patient id: its most similar other patients")
    parser.add_argument("--image", help="an image: an indexed path, or a new file with --nm-per-pixel")
    parser.add_argument("--nm-per-pixel", type=float, help="the physical pixel size of a new --image")
    parser.add_argument("-k", type=int, default=10, help="how many hits (default 10)")
    parser.add_argument("--level", choices=("patient", "image"),
                        help="rank patients or images (default: images for --image, else patients)")
    parser.add_argument("--split", help="only patients of this split (train, val, test)")
    parser.add_argument("--model", help=MODEL_HELP + " (default: the one that wrote the index)")
    parser.add_argument("--out", help="also write the hits to this CSV")
    parser.add_argument("--device", default=None, help="where a text query is embedded (default: accelerator/CPU)")
    args = parser.parse_args(argv)
    if sum(q is not None for q in (args.text, args.patient, args.image)) != 1:
        parser.error("give exactly one query: a text, --patient ID or --image PATH")
    if args.k < 1:
        parser.error(f"-k must be >= 1, got {args.k}")

    import pandas as pd

    from .api import load, search_index
    from .paths import write_text_atomic
    from .serving.cli import check_output
    from .serving.index import EmbeddingIndex
    index = EmbeddingIndex.load(args.index)
    needs_model = args.text is not None or args.nm_per_pixel is not None
    model = load(args.model or index.meta["model"], device=args.device) if needs_model else None
    hits = search_index(index, text=args.text, patient=args.patient, image=args.image, nm_per_pixel=args.nm_per_pixel,
                  k=args.k, level=args.level, split=args.split, model=model)
    with pd.option_context("display.max_colwidth", 60, "display.width", 160):
        print(hits.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.out:
        out = check_output(args.out, True, {"index": args.index})
        write_text_atomic(out, hits.to_csv(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
