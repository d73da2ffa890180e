"""Antialiased bilinear resizing of one image plane, equal to ``torch.nn.functional.interpolate(..., mode="bilinear",
antialias=True, align_corners=False)`` to float rounding, but reading integer samples directly.

Why not torch: its antialiased kernel needs a float input (a full-resolution float copy of a 2048 x 2048 frame is
16 MB) and spends ~1 ns per tap. Here the filter is separable and banded: each output row is a weighted sum of
~2 x zoom input rows, so the rows are converted to float a few at a time (in cache) and reduced with small matrix
products; the columns of the small result likewise. Only the output rows and columns that survive the centre crop
are computed. The weights are torch's own, computed with its float32 arithmetic (``_compute_index_ranges_weights``
in ATen's UpSampleKernel.cpp), so both paths weigh the same pixels identically.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import NamedTuple

import numpy as np

BLOCK = 4   # output rows per matrix product: more wastes multiply-adds on the zero part of each row's band


class Band(NamedTuple):
    out0: int            # first output index of the block, relative to the first requested output
    out1: int
    in0: int             # input window [in0, in1) that the block's outputs read
    in1: int
    weights: np.ndarray  # (out1 - out0, in1 - in0) float32


def _torch_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, list]:
    """(first input index, window length, weights) per output, as torch computes them for float32 tensors."""
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    support = scale if scale >= 1.0 else f32(1.0)          # interp_size / 2 * scale (bilinear: interp_size = 2)
    invscale = f32(1.0 / np.float64(scale)) if scale >= 1.0 else f32(1.0)
    centre = (np.float64(scale) * (np.arange(n_out) + 0.5)).astype(f32)
    start = np.maximum(((centre - support).astype(np.float64) + 0.5).astype(np.int64), 0)
    stop = np.minimum(((centre + support).astype(np.float64) + 0.5).astype(np.int64), n_in)
    weights = []
    for c, a, b in zip(centre, start, stop):
        x = ((np.arange(a, b).astype(f32) - c).astype(np.float64) + 0.5) * np.float64(invscale)
        w = np.where(np.abs(x.astype(f32)) < 1.0, f32(1.0) - np.abs(x.astype(f32)), f32(0.0)).astype(f32)
        total = np.cumsum(w, dtype=f32)[-1] if len(w) else f32(0.0)   # torch sums sequentially
        weights.append(w / total if total != 0 else w)
    return start, stop - start, weights


@functools.lru_cache(maxsize=64)
def bands(n_in: int, n_out: int, first: int, count: int) -> tuple[Band, ...]:
    """Outputs ``first .. first + count`` of resizing ``n_in`` samples to ``n_out``, in blocks of ``BLOCK``.

    Cached: a cohort's frames mostly share a few sizes, so the weights are computed once per size."""
    start, length, weights = _torch_weights(n_in, n_out)
    blocks = []
    for o0 in range(first, first + count, BLOCK):
        o1 = min(o0 + BLOCK, first + count)
        i0, i1 = int(start[o0:o1].min()), int((start[o0:o1] + length[o0:o1]).max())
        w = np.zeros((o1 - o0, i1 - i0), np.float32)
        for o in range(o0, o1):
            a = int(start[o]) - i0
            w[o - o0, a:a + int(length[o])] = weights[o]
        w.setflags(write=False)
        blocks.append(Band(o0 - first, o1 - first, i0, i1, w))
    return tuple(blocks)


_BLAS = threading.Lock()
_BLAS_CONTROL: list = []
_PIN = {"users": 0, "limiter": None}   # threads inside single_threaded_blas, and the limiter that restores BLAS


def _blas_controller():
    with _BLAS:
        if not _BLAS_CONTROL:
            try:
                from threadpoolctl import ThreadpoolController
                _BLAS_CONTROL.append(ThreadpoolController().select(user_api="blas"))
            except Exception:  # noqa: BLE001 - without threadpoolctl the products still run, only slower
                _BLAS_CONTROL.append(None)
    return _BLAS_CONTROL[0]


@contextlib.contextmanager
def single_threaded_blas():
    """numpy's OpenBLAS splits even these small products over threads, which on a shared 2-core machine made them
    up to 50x slower (the trunk holds the cores); one thread per product is also what a loading thread wants.

    The BLAS thread count is process-wide, so the limit is counted: the first thread to enter sets it, the last to
    leave restores it (a plain limit per thread would let one thread restore it under another, or leave it at 1)."""
    control = _blas_controller()
    if control is None:
        yield
        return
    with _BLAS:
        if _PIN["users"] == 0:
            _PIN["limiter"] = control.limit(limits=1)
        _PIN["users"] += 1
    try:
        yield
    finally:
        with _BLAS:
            _PIN["users"] -= 1
            if _PIN["users"] == 0:
                _PIN["limiter"].restore_original_limits()
                _PIN["limiter"] = None


def resize_plane(plane: np.ndarray, rows: tuple[Band, ...], cols: tuple[Band, ...], offset: float = 0.0,
                 clip: tuple[float, float] | None = None) -> np.ndarray:
    """Resize ``plane - offset`` (a 2-D array of any real dtype and strides), clipped to ``clip`` = (lo, hi) first,
    with the given row and column :func:`bands`. Returns float32 (rows' outputs x cols' outputs).

    Subtracting the offset before resizing keeps the rounding error relative to the samples' spread, not to their
    magnitude (an image of values 1000 and 1001 scaled by its own range would otherwise gain errors of 1e-4)."""
    c0, c1 = cols[0].in0, cols[-1].in1          # the vertical pass only computes the columns the crop keeps
    tall = np.empty((rows[-1].out1, c1 - c0), np.float32)
    out = np.empty((rows[-1].out1, cols[-1].out1), np.float32)
    with single_threaded_blas():
        for band in rows:
            block = plane[band.in0:band.in1, c0:c1].astype(np.float32)
            if offset:
                block -= offset
            if clip is not None:
                np.clip(block, clip[0], clip[1], out=block)
            np.matmul(band.weights, block, out=tall[band.out0:band.out1])
        for band in cols:
            np.matmul(tall[:, band.in0 - c0:band.in1 - c0], band.weights.T, out=out[:, band.out0:band.out1])
    return out
