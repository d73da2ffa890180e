"""Shared fixtures: one tiny synthetic cohort per test session, copied when a test needs to break it."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from emclip.synthetic import generate_cohort


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """20 patients, 48-pixel images: every diagnosis, every split, fast."""
    return generate_cohort(tmp_path_factory.mktemp("tiny_cohort"), n_patients=20, seed=3, image_size=48,
                           workers=1, progress=False)


@pytest.fixture
def cohort_copy(tiny_cohort, tmp_path) -> Path:
    """A private copy of the tiny cohort that a test may damage."""
    return Path(shutil.copytree(tiny_cohort, tmp_path / "cohort"))


@pytest.fixture(scope="session")
def renal():
    """The renal report labeler (its vocabulary compiled once per session)."""
    from emclip.labels import Labeler
    return Labeler("renal")


@pytest.fixture(scope="session")
def chexpert():
    """The CheXpert-style chest X-ray report labeler."""
    from emclip.labels import Labeler
    return Labeler("chexpert")


@pytest.fixture(scope="session")
def trained_run(tiny_cohort, tmp_path_factory) -> Path:
    """One tiny trained run (the ci model: film + gated attention, cache mode) on the tiny cohort, evaluated once;
    shared by every test that applies a trained model. Tests that damage it work on a copy."""
    from emclip.evaluation.cached import evaluate_run
    from emclip.train import load_config, train
    root = tmp_path_factory.mktemp("trained_run")
    run = root / "run"
    train(load_config("ci", dict(data_dir=str(tiny_cohort), run_dir=str(run), cache_dir=str(root / "cache"),
                                 epochs=1, batch_size=4, max_instances=3)), log=lambda *_: None)
    evaluate_run(run, n_boot=20, figures=False, log=lambda *_: None)
    return run
