"""Patient and image embeddings of a cohort, written as an index that ``python -m emclip.search`` reads.

    python -m emclip.embed MODEL COHORT --out DIR

DIR gets ``patients.parquet`` (one row per patient: id, split, diagnosis, images, nm/px range, most attended image,
embedding), ``images.parquet`` (one row per image: patient, path, nm/px as given and as the model saw it, attention
weight, embedding) and ``index.json`` (the model, the cohort, counts); schema: docs/embeddings_schema.md. The cohort
is embedded a chunk of patients at a time, so 600,000 images never sit in memory twice; a run's frozen-trunk
feature cache is reused when it matches the cohort.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .serving.cli import COHORT_HELP, MODEL_HELP, add_device, check_output, command_parser, run


def write_index(trained, cohort, out: Path, force: bool = False, batch_size: int = 32, progress: bool = True,
                embeddings=None) -> Path:
    """Embed every patient of ``cohort`` with ``trained`` (a :class:`~emclip.api.TrainedModel`) into an index
    folder at ``out``, a chunk of patients at a time; each image row keeps its nm/px as the cohort gives it.
    ``embeddings``: the cohort's ``trained.embed`` output when the caller has it already (written as it is)."""
    from .serving.index import IndexWriter
    cohort = trained.load_cohort(cohort)
    given = dict(zip(cohort.images.path, cohort.images.nm_per_pixel))
    meta = {"model": str(trained.source), "model_identity": trained.identity, "cohort": str(cohort.root),
            "scale_range_nm": trained.scale_range_nm}
    with IndexWriter(out, meta, force=force) as writer:
        chunks = [embeddings] if embeddings is not None else trained.iter_embeddings(cohort, batch_size,
                                                                                     progress=progress)
        for emb in chunks:
            writer.add(emb, {"nm_per_pixel": np.array([given[p] for p in emb.image_paths], dtype=np.float64)})
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("embed", __doc__)
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("cohort", help=COHORT_HELP)
    parser.add_argument("--out", required=True, help="the index folder to write (refused if it exists, unless "
                                                     "--force replaces an index written before)")
    parser.add_argument("--force", action="store_true", help="replace an index already at --out")
    add_device(parser)
    args = parser.parse_args(argv)

    from .api import load
    out = check_output(args.out, args.force, {"cohort": args.cohort, "model": args.model}, kind="folder")
    trained = load(args.model, device=args.device)
    cohort = trained.load_cohort(args.cohort)
    write_index(trained, cohort, out, force=args.force, batch_size=args.batch_size)
    print(f"{len(cohort.reports)} patients, {len(cohort.images)} images -> {out}")
    print(f'search it: python -m emclip.search {out} "a text query" -k 10')
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
