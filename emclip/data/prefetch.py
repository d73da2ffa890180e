"""Loading in threads of one process: a batch's items in parallel (:func:`thread_map`), or a whole loader a few
items ahead of its consumer (:class:`Prefetch`).

With ``DataLoader(num_workers=0)`` the trunk waits while each batch is read, and while it waits the cores it uses
are idle. The fused loader spends its time in numpy and tifffile calls that release the GIL (decoding, converting,
small matrix products), so threads load in parallel without worker processes (which on 2 cores took the trunk's
cores).
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def loader_threads() -> int:
    """Threads to load one batch with: torch's intra-op thread count, i.e. the cores the trunk computes on and
    leaves idle while the batch loads. It is 1 inside DataLoader worker processes (torch sets it so), where the
    batch is then loaded serially as before."""
    return max(1, torch.get_num_threads())


def thread_map(fn: Callable[[T], R], items: Iterable[T], threads: int | None = None) -> list[R]:
    """``[fn(x) for x in items]`` in ``threads`` threads (default :func:`loader_threads`), results in order. If calls
    fail, the exception of the first failing item (in order) is raised, as the loop would raise it; items not yet
    started are cancelled."""
    items = list(items)
    threads = loader_threads() if threads is None else threads
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    pool = ThreadPoolExecutor(min(threads, len(items)), thread_name_prefix="emclip-load")
    try:
        futures = [pool.submit(fn, x) for x in items]
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class Prefetch(Iterable[T]):
    """Iterate ``iterable`` (e.g. a ``DataLoader`` with ``num_workers=0``) in a daemon thread, at most ``depth``
    items ahead of the consumer. Items arrive in order; an exception raised while producing an item is raised to the
    consumer in its place; leaving the loop early stops the thread. ``len()`` is the iterable's."""

    def __init__(self, iterable: Iterable[T], depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.iterable, self.depth = iterable, depth

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[T]:
        items: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(entry) -> bool:
            while not stop.is_set():
                try:
                    items.put(entry, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for item in self.iterable:
                    if not put((True, item)):
                        return
            except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
                put((False, err))
                return
            put((False, None))

        thread = threading.Thread(target=produce, name="emclip-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                ok, value = items.get()
                if ok:
                    yield value
                elif value is None:
                    return
                else:
                    raise value
        finally:
            stop.set()
            thread.join()
