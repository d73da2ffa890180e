"""A batch of the cache build loads in threads: the same items in order, the same errors, BLAS pinned correctly."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import tifffile
import torch
from torch.utils.data import DataLoader

from emclip.data import ImageReadError, ImageTransform, read_image
from emclip.data import resample
from emclip.data.images import load_transformed
from emclip.data import prefetch
from emclip.data.prefetch import loader_threads, thread_map
from emclip.train import cache
from emclip.train.cache import _ImageRows


def test_thread_map_keeps_order_and_uses_threads():
    seen = set()

    def slow(x):
        seen.add(threading.current_thread().name)
        time.sleep(0.01 * (x % 3))
        return x * x
    assert thread_map(slow, range(12), threads=3) == [x * x for x in range(12)]
    assert any(name.startswith("emclip-load") for name in seen)
    assert thread_map(slow, [], threads=2) == [] and thread_map(slow, [5], threads=2) == [25]
    seen.clear()
    assert thread_map(slow, range(4), threads=1) == [0, 1, 4, 9] and seen == {threading.current_thread().name}
    assert loader_threads() == max(1, torch.get_num_threads())


def test_thread_map_raises_the_first_failing_items_error():
    def fn(x):
        if x in (2, 5):
            time.sleep(0.05 if x == 2 else 0.0)   # item 5 fails first in time, item 2 first in order
            raise ValueError(f"item {x}")
        return x
    with pytest.raises(ValueError, match="item 2"):
        thread_map(fn, range(8), threads=4)


def _tiffs(tmp_path, n=5):
    rng = np.random.default_rng(3)
    paths = []
    for i in range(n):
        p = tmp_path / f"im{i}.tif"
        tifffile.imwrite(p, rng.integers(0, 65536, (300 + 40 * i, 260)).astype(np.uint16))
        paths.append(str(p))
    return paths


def test_the_cache_builders_batches_equal_the_serial_rows(tmp_path, monkeypatch):
    paths = _tiffs(tmp_path)
    transform = ImageTransform(64)
    rows = _ImageRows(paths, [4, 0, 3, 1, 2, 0], transform, "dtype", "gray")
    calls = []
    real = rows.__getitems__
    monkeypatch.setattr(rows, "__getitems__", lambda idx: calls.append(list(idx)) or real(idx))
    loaded_in = []
    real_load = cache.load_transformed

    def load_spy(*args, **kwargs):
        loaded_in.append(threading.current_thread().name)
        return real_load(*args, **kwargs)
    monkeypatch.setattr(cache, "load_transformed", load_spy)
    monkeypatch.setattr(prefetch, "loader_threads", lambda: 2)    # as on a 2-core machine, whatever this one has
    batches = list(DataLoader(rows, batch_size=4, num_workers=0))
    assert calls == [[0, 1, 2, 3], [4, 5]]                   # the DataLoader fetches batches through __getitems__
    assert len(loaded_in) == 6 and all(name.startswith("emclip-load") for name in loaded_in)
    images = torch.cat([b[0] for b in batches])
    assert torch.cat([b[2] for b in batches]).tolist() == [4, 0, 3, 1, 2, 0]
    for k, row in enumerate([4, 0, 3, 1, 2, 0]):
        want, zoom = transform(read_image(paths[row]))
        torch.testing.assert_close(images[k], want, atol=2e-6, rtol=0)
        assert float(torch.cat([b[1] for b in batches])[k]) == pytest.approx(zoom)
    got = rows.__getitems__(list(range(6)))
    serial = [rows[i] for i in range(6)]
    for a, b in zip(got, serial):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_broken_image_in_a_batch_fails_naming_its_file(tmp_path):
    paths = _tiffs(tmp_path)
    with open(paths[2], "r+b") as fh:      # truncate the pixel data
        fh.truncate(4000)
    rows = _ImageRows(paths, list(range(5)), ImageTransform(64), "dtype", "gray")
    with pytest.raises(ImageReadError) as threaded:
        next(iter(DataLoader(rows, batch_size=5, num_workers=0)))
    with pytest.raises(ImageReadError) as serial:
        load_transformed(paths[2], ImageTransform(64))
    assert paths[2] in str(threaded.value) and str(threaded.value) == str(serial.value)


def test_the_blas_limit_is_counted_across_threads(monkeypatch):
    """Threads entering and leaving in any order keep BLAS at 1 thread while any is inside and restore it after."""
    state = {"limit": 4, "sets": 0}

    class Limiter:
        def __init__(self):
            self.saved = state["limit"]
            state["limit"], state["sets"] = 1, state["sets"] + 1

        def restore_original_limits(self):
            state["limit"] = self.saved

    class Control:
        def limit(self, limits):
            assert limits == 1
            return Limiter()
    monkeypatch.setattr(resample, "_BLAS_CONTROL", [Control()])
    a, b = resample.single_threaded_blas(), resample.single_threaded_blas()
    a.__enter__()
    b.__enter__()
    assert state["limit"] == 1
    a.__exit__(None, None, None)             # the first to enter leaves first: the other is still inside
    assert state["limit"] == 1
    b.__exit__(None, None, None)
    assert state["limit"] == 4 and state["sets"] == 1
    with resample.single_threaded_blas():
        assert state["limit"] == 1
    assert state["limit"] == 4
