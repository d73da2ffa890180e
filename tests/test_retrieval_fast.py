"""The count-based retrieval ranking (issue 15) returns exactly the ranks of the implementation it replaced.

The previous code is kept verbatim in benchmarks/retrieval_previous.py (the "previous" arm of bench_retrieval.py).
Adversarial inputs: integer-valued embeddings (every score an exact small integer, so ties are everywhere and no
rounding can hide a wrong tie rule), exact duplicate items, all-equal scores, queries without positives, positives
that are also excluded, galleries smaller than K.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from emclip import metrics
from emclip.evaluation.embeddings import Embeddings
from emclip.evaluation.retrieval import image_image_retrieval, report_image_retrieval, summarize_retrieval
from emclip.metrics import (
    recall_at_k_from_embeddings, recall_from_ranks, retrieval_ranks, retrieval_ranks_by_label,
    retrieval_ranks_from_embeddings)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'benchmarks'))
import retrieval_previous as previous  # noqa: E402

sys.path.pop(0)
TIES = ('pessimistic', 'optimistic')


def _tied_embeddings(rng, n_q, n_i, dim=6, values=(-1, 0, 1)):
    """Small-integer vectors: scores are exact integers in float32 whatever the summation order, so ties abound."""
    q = torch.from_numpy(rng.choice(values, size=(n_q, dim)).astype(np.float32))
    x = torch.from_numpy(rng.choice(values, size=(n_i, dim)).astype(np.float32))
    x[n_i // 2:n_i // 2 + 5] = x[0]  # exact duplicates of one item
    q[:3] = 0  # all-equal scores (0 against everything)
    return q, x


def _random_sets(rng, n_q, n_i, max_size):
    return [np.sort(rng.choice(n_i, size=rng.integers(0, max_size + 1), replace=False)) for _ in range(n_q)]


def _mask(sets, n_i):
    m = np.zeros((len(sets), n_i), dtype=bool)
    for i, s in enumerate(sets):
        m[i, s] = True
    return m


def _adversarial_case(seed):
    rng = np.random.default_rng(seed)
    q, x = _tied_embeddings(rng, 41, 90)
    pos = _random_sets(rng, 41, 90, 6)
    pos[5] = np.array([], dtype=np.int64)  # no positive
    pos[6] = np.array([0, n := 90 // 2], dtype=np.int64)  # a positive and its exact duplicate
    excl = _random_sets(rng, 41, 90, 4)
    excl[7] = pos[7].copy()  # every positive excluded: rank inf
    excl[8] = np.array([n + 1, n + 2])  # exact duplicates of item 0 excluded
    return q, x, pos, excl


def _check_equal_to_previous(ranks_fn, seeds=(0, 1, 2)):
    """``ranks_fn(q, x, positives, exclude, chunk_size, ties)`` against the previous code on adversarial inputs."""
    for seed in seeds:
        q, x, pos, excl = _adversarial_case(seed)
        for ties in TIES:
            for chunk in (1, 7, 1000):
                for exclude in (None, excl):
                    want = previous.retrieval_ranks_from_embeddings_previous(q, x, pos, exclude, chunk, ties)
                    got = ranks_fn(q, x, pos, exclude, chunk, ties)
                    np.testing.assert_array_equal(got, want, err_msg=f'seed {seed}, {ties}, chunk {chunk}')


def test_embedding_ranks_equal_previous_on_ties_duplicates_and_empty_sets():
    _check_equal_to_previous(retrieval_ranks_from_embeddings)
    q, x, pos, excl = _adversarial_case(0)
    ranks = retrieval_ranks_from_embeddings(q, x, pos, excl)
    assert np.isinf(ranks[5]) and np.isinf(ranks[7])
    assert (ranks[:3][np.isfinite(ranks[:3])] >= 1).all()


def test_a_wrong_tie_rule_is_caught(monkeypatch):
    """The equality check above fails for a count with '>' in place of '>=' (and for the reverse)."""
    monkeypatch.setitem(metrics._COMPARE, 'pessimistic', torch.gt)
    with pytest.raises(AssertionError):
        _check_equal_to_previous(retrieval_ranks_from_embeddings, seeds=(0,))
    monkeypatch.setitem(metrics._COMPARE, 'pessimistic', torch.ge)
    monkeypatch.setitem(metrics._COMPARE, 'optimistic', torch.ge)
    with pytest.raises(AssertionError):
        _check_equal_to_previous(retrieval_ranks_from_embeddings, seeds=(0,))


@pytest.mark.parametrize('ties', TIES)
def test_every_positive_format_equals_previous(ties):
    q, x, pos, excl = _adversarial_case(3)
    pm, em = _mask(pos, 90), _mask(excl, 90)
    want = previous.retrieval_ranks_from_embeddings_previous(q, x, pos, excl, 5, ties)
    for p, e in [(pm, em), (torch.from_numpy(pm), excl), (lambda a, b: pm[a:b], lambda a, b: em[a:b])]:
        np.testing.assert_array_equal(retrieval_ranks_from_embeddings(q, x, p, e, chunk_size=5, ties=ties), want)
    sim = (q @ x.T).numpy()
    for chunk in (None, 3):
        np.testing.assert_array_equal(retrieval_ranks(sim, pos, excl, ties, chunk),
                                      previous.retrieval_ranks_previous(sim, pos, excl, ties, chunk))
    single = np.arange(41) * 2  # one positive index per query
    np.testing.assert_array_equal(retrieval_ranks_from_embeddings(q, x, single, ties=ties, chunk_size=4),
                                  previous.retrieval_ranks_from_embeddings_previous(q, x, single, None, 4, ties))


def test_integer_and_constant_similarity():
    sim = np.zeros((4, 10), dtype=np.int64)
    np.testing.assert_array_equal(retrieval_ranks(sim, np.arange(4)), [10] * 4)  # every other item ties ahead
    np.testing.assert_array_equal(retrieval_ranks(sim, np.arange(4), ties='optimistic'), [1] * 4)
    np.testing.assert_array_equal(retrieval_ranks(sim, np.arange(4), exclude=[[5]] * 4), [9] * 4)


def test_k_larger_than_the_gallery():
    rng = np.random.default_rng(4)
    q, x = _tied_embeddings(rng, 9, 7)
    pos = _random_sets(rng, 9, 7, 3)
    ranks = retrieval_ranks_from_embeddings(q, x, pos)
    np.testing.assert_array_equal(ranks, previous.retrieval_ranks_from_embeddings_previous(q, x, pos))
    assert recall_at_k_from_embeddings(q, x, pos, ks=(50, 1000)) == recall_from_ranks(ranks, (50, 1000))
    assert recall_from_ranks(ranks, (1000,))[1000] == np.mean([len(p) > 0 for p in pos])


def test_repeated_indices_are_a_set():
    # the previous index path subtracted a repeated positive twice (rank 2 here); a set of positives gives rank 3
    sim = np.array([[0.5, 0.5, 0.9, 0.1]], dtype=np.float32)
    assert retrieval_ranks(sim, [[0, 0]])[0] == retrieval_ranks(sim, [[0]])[0] == 3
    assert previous.retrieval_ranks_previous(sim, [[0]])[0] == 3


def test_index_out_of_range_is_an_error():
    with pytest.raises(ValueError, match='item indices'):
        retrieval_ranks(np.zeros((2, 3)), [[0], [3]])
    with pytest.raises(ValueError, match='boolean item mask'):
        retrieval_ranks(np.zeros((2, 3)), np.zeros((2, 4), dtype=bool))


def _label_case(seed, n_q=37, n_i=120, n_groups=25, n_labels=4):
    rng = np.random.default_rng(seed)
    q, x = _tied_embeddings(rng, n_q, n_i)
    item_group = rng.integers(0, n_groups, size=n_i)
    group_label = rng.integers(-1, n_labels, size=n_groups)  # -1: an unlabelled group
    group_label[0] = n_labels  # a label held by one group only: its queries have no positive
    item_group[:4] = 0
    item_label = group_label[item_group]
    query_group = rng.integers(0, n_groups, size=n_q)
    query_group[:2] = 0
    query_label = group_label[query_group]
    return q, x, query_label, item_label, query_group, item_group


@pytest.mark.parametrize('ties', TIES)
@pytest.mark.parametrize('seed', [0, 1])
def test_ranks_by_label_equal_the_previous_masks(seed, ties):
    q, x, ql, il, qg, ig = _label_case(seed)
    pos_mask = (il[None, :] == ql[:, None]) & (ig[None, :] != qg[:, None]) & (ql[:, None] >= 0)
    excl_mask = ig[None, :] == qg[:, None]
    for chunk in (1, 6, 1000):
        want = previous.retrieval_ranks_from_embeddings_previous(q, x, lambda a, b: pos_mask[a:b],
                                                                 lambda a, b: excl_mask[a:b], chunk, ties)
        got = retrieval_ranks_by_label(q, x, ql, il, qg, ig, chunk_size=chunk, ties=ties)
        np.testing.assert_array_equal(got, want)
        # without groups: positives are every same-label item, nothing excluded
        want = previous.retrieval_ranks_from_embeddings_previous(
            q, x, (il[None, :] == ql[:, None]) & (ql[:, None] >= 0), None, chunk, ties)
        np.testing.assert_array_equal(retrieval_ranks_by_label(q, x, ql, il, chunk_size=chunk, ties=ties), want)
    assert np.isinf(got[:2]).all()  # group 0's label exists nowhere else


def test_ranks_by_label_in_small_column_blocks(monkeypatch):
    q, x, ql, il, qg, ig = _label_case(2)
    full = retrieval_ranks_by_label(q, x, ql, il, qg, ig, chunk_size=8)
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 20)  # block sizes of the generic paths must not matter
    np.testing.assert_array_equal(retrieval_ranks_by_label(q, x, ql, il, qg, ig, chunk_size=8), full)


def test_ranks_by_label_checks_lengths():
    q, x, ql, il, qg, ig = _label_case(0)
    with pytest.raises(ValueError, match='labels'):
        retrieval_ranks_by_label(q, x, ql[:-1], il)
    with pytest.raises(ValueError, match='both'):
        retrieval_ranks_by_label(q, x, ql, il, query_group=qg)


def _embeddings(seed, n_patients=30, dim=6):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 6, size=n_patients)
    owner = np.repeat(np.arange(n_patients), counts)
    image = rng.choice([-1, 0, 1], size=(len(owner), dim)).astype(np.float32)
    image[5:9] = image[0]  # duplicates across patients
    dx = rng.choice(['a', 'b', 'c', ''], size=n_patients).astype(object)
    dx[0] = 'only-one'
    report = rng.choice([-1, 0, 1], size=(n_patients, dim)).astype(np.float32)
    return Embeddings(patient_ids=[f'P{i}' for i in range(n_patients)], split=['test'] * n_patients, diagnosis=dx,
                      patient=report.copy(), report=report, image=image, image_patient=owner,
                      image_paths=[f'i{i}.tif' for i in range(len(owner))], image_scales=np.ones(len(owner)),
                      image_attention=np.full(len(owner), np.nan))


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_image_to_image_task_equals_previous(seed):
    emb = _embeddings(seed)
    for chunk, max_queries in [(None, None), (4, 20)]:
        got = image_image_retrieval(emb, chunk_size=chunk, max_queries=max_queries, seed=seed)
        want = previous.image_image_retrieval_previous(emb, chunk_size=chunk, max_queries=max_queries, seed=seed)
        np.testing.assert_array_equal(got.ranks, want.ranks)
        np.testing.assert_array_equal(got.query_index, want.query_index)
        assert summarize_retrieval(got, n_boot=20) == summarize_retrieval(want, n_boot=20)


def test_report_to_image_task_equals_previous():
    emb = _embeddings(3)
    got = report_image_retrieval(emb, chunk_size=7)
    order = np.argsort(emb.image_patient, kind='stable')
    positives = np.split(order, np.cumsum(np.bincount(emb.image_patient, minlength=emb.n_patients))[:-1])
    want = previous.retrieval_ranks_from_embeddings_previous(emb.report, emb.image, positives, chunk_size=7)
    np.testing.assert_array_equal(got.ranks, want)


def test_float32_random_embeddings_equal_previous():
    g = torch.Generator().manual_seed(5)
    q = torch.nn.functional.normalize(torch.randn(300, 32, generator=g), dim=1)
    x = torch.nn.functional.normalize(torch.randn(4000, 32, generator=g), dim=1)
    pos = [np.arange(i * 10, i * 10 + 10) for i in range(300)]
    for chunk in (None, 64, 257):
        for ties in TIES:
            np.testing.assert_array_equal(
                retrieval_ranks_from_embeddings(q, x, pos, chunk_size=chunk, ties=ties),
                previous.retrieval_ranks_from_embeddings_previous(q, x, pos, chunk_size=chunk, ties=ties))
