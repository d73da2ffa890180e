"""Deterministic patient-level splits, stratified by diagnosis when it is known."""
from __future__ import annotations

import numpy as np

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


def assign_splits(patient_ids: list[str], diagnoses: list[str | None] | None = None,
                  fractions: tuple[float, float, float] = DEFAULT_FRACTIONS, seed: int = 0) -> dict[str, str]:
    """Map each patient to train/val/test.

    Within each diagnosis (or over all patients when diagnoses are unknown) patients are ordered by a seeded
    permutation of their sorted ids and cut by the cumulative fractions, with largest-remainder rounding so the
    totals match the fractions as closely as integers allow. The result depends only on the ids, diagnoses,
    fractions and seed, never on input order.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    if diagnoses is None:
        diagnoses = [None] * len(patient_ids)
    groups: dict[str, list[str]] = {}
    for pid, dx in zip(patient_ids, diagnoses):
        key = "" if dx is None or (isinstance(dx, float) and np.isnan(dx)) else str(dx)
        groups.setdefault(key, []).append(str(pid))
    out: dict[str, str] = {}
    for g_index, key in enumerate(sorted(groups)):
        ids = sorted(groups[key])
        rng = np.random.default_rng([seed, g_index, len(ids)])
        ids = [ids[i] for i in rng.permutation(len(ids))]
        exact = np.array(fractions) * len(ids)
        counts = np.floor(exact).astype(int)
        for i in np.argsort(-(exact - counts), kind="stable")[: len(ids) - counts.sum()]:
            counts[i] += 1
        start = 0
        for name, n in zip(SPLITS, counts):
            for pid in ids[start:start + n]:
                out[pid] = name
            start += n
    return out
