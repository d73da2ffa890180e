"""The label-free validation signal that picks checkpoints/best."""
import pytest
import torch

from emclip.train.loop import mean_recall


def test_mean_recall_exact_values_and_pessimistic_ties():
    assert mean_recall(torch.eye(20)) == 1.0
    # every report matches its own patient worst: rank 20 of 20, so no hit at k <= 10
    assert mean_recall(-torch.eye(20)) == 0.0
    # all scores tied: the match counts as ranked last, never as a hit
    assert mean_recall(torch.zeros(20, 20)) == 0.0
    # a known case: patient i's true report at rank i + 1 in both directions
    n = 20
    sim = torch.zeros(n, n)
    for i in range(n):
        sim[i, i] = n - i
        sim[i, :i] = torch.arange(n - i + 1, n + 1).float()   # i scores above the match
    ranks = torch.arange(1, n + 1)
    expect_rows = sum(float((ranks <= k).float().mean()) for k in (1, 5, 10)) / 3
    rows_only = sum(float(((sim >= sim.diagonal()[:, None]).sum(1) <= k).float().mean()) for k in (1, 5, 10)) / 3
    assert rows_only == expect_rows
    expected = (rows_only + sum(float(((sim.T >= sim.diagonal()[:, None]).sum(1) <= k).float().mean())
                                for k in (1, 5, 10)) / 3) / 2
    assert mean_recall(sim) == pytest.approx(expected, abs=1e-6)   # float32 means above, exact fractions inside
