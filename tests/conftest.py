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
