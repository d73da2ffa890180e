"""Overlap loading with compute in one process: iterate a loader in a background thread, a few items ahead.

With ``DataLoader(num_workers=0)`` the trunk waits while each batch is read. The fused loader spends its time in
numpy and tifffile calls that release the GIL (decoding, converting, small matrix products), so one thread can
prepare the next batch while the trunk runs, without worker processes (which on 2 cores took the trunk's cores).
"""
from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


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
