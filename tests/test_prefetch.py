"""Prefetch: the items of the iterable in order, its errors in their place, and an early exit stops the thread."""
from __future__ import annotations

import threading
import time

import pytest

from emclip.data.prefetch import Prefetch


def test_items_arrive_in_order_and_len_is_the_iterables():
    assert list(Prefetch(range(50), depth=3)) == list(range(50))
    assert len(Prefetch([1, 2, 3])) == 3
    assert list(Prefetch([])) == []


def test_the_producer_runs_ahead_of_the_consumer():
    made = []

    def slow():
        for i in range(4):
            made.append(i)
            yield i
    it = iter(Prefetch(slow(), depth=2))
    assert next(it) == 0
    deadline = time.time() + 5
    while len(made) < 3 and time.time() < deadline:   # item 0 taken, items 1 and 2 queued ahead
        time.sleep(0.01)
    assert made == [0, 1, 2]
    assert list(it) == [1, 2, 3]


def test_an_error_is_raised_in_its_place():
    def broken():
        yield 1
        yield 2
        raise OSError("disk gone")
    seen = []
    with pytest.raises(OSError, match="disk gone"):
        for x in Prefetch(broken()):
            seen.append(x)
    assert seen == [1, 2]


def test_leaving_early_stops_the_thread():
    def endless():
        i = 0
        while True:
            yield i
            i += 1
    before = threading.active_count()
    for x in Prefetch(endless(), depth=2):
        if x == 5:
            break
    assert threading.active_count() == before
    with pytest.raises(ValueError, match="depth"):
        Prefetch([1], depth=0)
