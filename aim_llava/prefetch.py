"""Reading ahead: the work that needs no GPU (decoding video frames) runs in worker threads while
the GPU handles earlier items.

:func:`read_ahead` keeps at most ``depth`` items in flight, yields results in input order, and
turns a failure into that item's result instead of an exception. When the consumer stops (it is
done, an exception, Ctrl-C), work not yet started is cancelled and nothing waits for the rest.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")
Loaded = TypeVar("Loaded")


def read_ahead(items: Iterable[Item], load: Callable[[Item], Loaded], workers: int = 2,
               depth: int | None = None) -> Iterator[tuple[Item, Loaded | BaseException]]:
    """(item, load(item) or the exception it raised) for every item, in order, computed by
    ``workers`` threads with at most ``depth`` (default 2 x workers) items in flight. With
    ``workers=0`` everything runs in the caller's thread."""
    if workers <= 0:
        for item in items:
            yield item, _attempt(load, item)
        return
    depth = max(1, depth or 2 * workers)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aim-llava-read")
    pending: deque[tuple[Item, Future]] = deque()
    source = iter(items)
    try:
        for item in source:
            pending.append((item, pool.submit(_attempt, load, item)))
            if len(pending) >= depth:
                item, future = pending.popleft()
                yield item, future.result()
        while pending:
            item, future = pending.popleft()
            yield item, future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _attempt(load: Callable, item) -> object:
    try:
        return load(item)
    except Exception as err:  # the item's own failure, reported with it
        return err


def batches(iterable: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` elements (the last may be shorter)."""
    batch = []
    for element in iterable:
        batch.append(element)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
