"""What the serving commands (``predict``, ``embed``, ``search``, ``export``) share: the model argument, the output
rules, and one line per failure emclip understands instead of a traceback."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Callable

MODEL_HELP = "a run folder (runs/<set>/<arm>) or a model folder written by `python -m emclip.export`"
COHORT_HELP = ("a cohort folder: images.csv (patient_id, path, nm_per_pixel) is enough; reports.csv with reports, "
               "diagnoses or splits is used when present; nothing is written into it")


class CommandError(ValueError):
    """A command-line request that cannot be carried out (the message says why and what to do)."""


def command_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """``python -m emclip.NAME``'s parser: its module docstring's first paragraph as the description, the rest
    (usage examples, what it writes) after the options."""
    return argparse.ArgumentParser(prog=f"python -m emclip.{name}", description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=doc.split("\n\n", 1)[1])


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: an accelerator when "
                                                       "present, else the CPU)")
    parser.add_argument("--batch-size", type=int, default=32, help="patients per forward pass (default 32)")


def check_output(out: Path, force: bool, inputs: dict[str, Path], kind: str = "file") -> Path:
    """``out`` resolved, refused when it lies inside an input folder (a cohort is never written into) or already
    exists without ``force``."""
    out = Path(out).expanduser().resolve()
    for what, folder in inputs.items():
        folder = Path(folder).expanduser().resolve()
        if folder.is_dir() and (out == folder or folder in out.parents):
            raise CommandError(f"--out {out} lies inside the {what} folder {folder}: emclip never writes into a "
                               f"folder it reads; choose a path outside it")
    if out.exists() and not force:
        raise CommandError(f"--out {out} already exists: choose another path, or pass --force to replace it")
    if kind == "file" and out.is_dir():
        raise CommandError(f"--out {out} is a folder; name a file")
    return out


def _warning_line(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a command's ``main``: a failure emclip understands (a bad cohort, model, index, image, path) is one
    line on stderr and exit status 2; warnings are one line each."""
    from ..data import CohortError
    from ..data.images import ImageReadError
    from ..train.checkpoint import CheckpointError

    warnings.showwarning = _warning_line
    try:
        return main(argv)
    except CohortError as err:
        print(f"error: {err}", file=sys.stderr)
    except (CommandError, CheckpointError, ImageReadError, FileNotFoundError, NotADirectoryError, PermissionError,
            ValueError, KeyError) as err:
        text = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {text}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    return 2
