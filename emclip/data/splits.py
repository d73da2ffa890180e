"""Deterministic patient-level splits, stratified by diagnosis when it is known."""
from __future__ import annotations

import numpy as np

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


def assign_splits(patient_ids: list[str], diagnoses: list[str | None] | None = None,
                  fractions: tuple[float, float, float] = DEFAULT_FRACTIONS, seed: int = 0) -> dict[str, str]:
    """Map each patient to train/val/test.

    Stratification: within each diagnosis (all patients form one group when diagnoses are unknown) patients are
    shuffled by the seed and given evenly spaced positions ``(j + u) / n`` in [0, 1) with a random offset ``u`` per
    group. All patients are then sorted by position and cut by the cumulative fractions (largest-remainder counts
    over the whole cohort). Each diagnosis is thus spread proportionally over the splits, even when it has only
    a few patients, and the split sizes match the fractions as closely as integers allow. The result depends only
    on the ids, diagnoses, fractions and seed, never on input order.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    if diagnoses is None:
        diagnoses = [None] * len(patient_ids)
    groups: dict[str, list[str]] = {}
    for pid, dx in zip(patient_ids, diagnoses):
        key = "" if dx is None or (isinstance(dx, float) and np.isnan(dx)) else str(dx)
        groups.setdefault(key, []).append(str(pid))
    positions: list[tuple[float, str]] = []
    for g_index, key in enumerate(sorted(groups)):
        ids = sorted(groups[key])
        rng = np.random.default_rng([seed, g_index, len(ids)])
        order, offset = rng.permutation(len(ids)), rng.random()
        positions += [((j + offset) / len(ids), ids[i]) for j, i in enumerate(order)]
    positions.sort()
    exact = np.array(fractions) * len(positions)
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: len(positions) - counts.sum()]:
        counts[i] += 1
    bounds = np.cumsum(counts)
    return {pid: SPLITS[int(np.searchsorted(bounds, k, side="right"))] for k, (_, pid) in enumerate(positions)}
