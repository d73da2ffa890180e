"""``python -m emclip.train PARAMS.yaml [key=value ...]``: train (or resume) one run.

PARAMS is a parameter-set name (``demo`` -> ``params/demo.yaml``) or a YAML path; its ``train`` section fills the
configuration and ``key=value`` pairs override it (values are YAML: ``scale_embed=false``, ``lr=3e-4``). Run again
on the same ``run_dir`` and it resumes from the last checkpoint. Works the same under
``accelerate launch -m emclip.train ...`` on several GPUs or nodes.
"""
from __future__ import annotations

import argparse
import sys

from ..data import CohortError
from .checkpoint import CheckpointError
from .config import load_config
from .loop import TrainingDiverged, TrainingInterrupted, train
from .runinfo import IncompatibleResume, RunDirInUse

# Refusals with a message that says what to do: printed as one line, not as a traceback.
REFUSALS = (CohortError, CheckpointError, IncompatibleResume, RunDirInUse, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emclip.train", description=__doc__.split("\n\n")[1])
    parser.add_argument("params", help="parameter set name (params/NAME.yaml) or a YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the training configuration")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.params, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = train(cfg)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except TrainingInterrupted as err:
        print(err, file=sys.stderr)
        return 130   # the shell's code for Ctrl-C
    except REFUSALS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"done: {summary['steps']} steps, best validation loss {summary['best_val_loss']:.4f}, best "
          f"{summary['select_on']} {abs(summary['best_score']):.4f} (checkpoints/best), "
          f"outputs in {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
