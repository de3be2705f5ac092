"""One bounded store for the work that questions about the same video can share.

Two kinds of entries live in it, under one byte budget (``--cache-mb``), least recently used
first out:

* ``"visual"``: a video or image after the vision tower, projector and the reduction's merging
  (:mod:`aim_llava.visual_cache` says what its key holds);
* ``"prefix"``: the keys and values of the prompt's prefix (system text and visual tokens) in the
  decoder layers that do not depend on the question (:mod:`aim_llava.prefix_cache`).

Entries hold tensors on the model's device, so the budget is device memory. Every method takes a
lock: the server's reading threads look up while its model thread stores.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

KINDS = ("visual", "prefix")
DEFAULT_CACHE_MB = 2048.0  # the default bound of a VideoLLM's cache (``--cache-mb``)


@dataclass
class CacheCounts:
    """Lookups that found an entry (hits) and that did not (misses), per kind."""

    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    misses: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    def since(self, earlier: CacheCounts) -> CacheCounts:
        """The lookups made after ``earlier`` was taken."""
        return CacheCounts({k: self.hits[k] - earlier.hits[k] for k in KINDS},
                           {k: self.misses[k] - earlier.misses[k] for k in KINDS})

    def as_dict(self) -> dict[str, int]:
        return {f"{kind}_{what}": counts[kind] for kind in KINDS
                for what, counts in (("hits", self.hits), ("misses", self.misses))}

    def summary(self) -> str:
        return "; ".join(f"{kind} {self.hits[kind]} hit / {self.misses[kind]} miss" for kind in KINDS)


class ReuseCache:
    """A thread-safe LRU bounded in bytes; keys are tuples whose first element is the kind.

    An entry larger than the whole budget is not stored (the caller keeps its value for the
    call at hand); storing evicts the least recently used entries until the new one fits.
    """

    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"a cache capacity is at least 0 bytes, got {capacity_bytes}")
        self.capacity = capacity_bytes
        self.used = 0
        self.entries: OrderedDict[tuple, tuple[object, int]] = OrderedDict()
        self.counts = CacheCounts()
        self.lock = threading.Lock()

    def get(self, key: tuple[Hashable, ...], count_miss: bool = True) -> object | None:
        """The entry stored under ``key`` (now the most recently used), or None. A hit is counted;
        a miss unless ``count_miss`` is false (a look-up that will be made again before the work)."""
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                self.counts.misses[key[0]] += count_miss
                return None
            self.entries.move_to_end(key)
            self.counts.hits[key[0]] += 1
            return entry[0]

    def count_hit(self, kind: str) -> None:
        """Count a hit found outside the store (an item whose work another item of its batch does)."""
        with self.lock:
            self.counts.hits[kind] += 1

    def put(self, key: tuple[Hashable, ...], value: object, nbytes: int) -> bool:
        """Store ``value`` (taking ``nbytes``) under ``key``; False when it exceeds the budget."""
        if key[0] not in KINDS:
            raise ValueError(f"unknown cache entry kind {key[0]!r}")
        if nbytes > self.capacity:
            return False
        with self.lock:
            if key in self.entries:
                self.used -= self.entries.pop(key)[1]
            while self.used + nbytes > self.capacity:
                self.used -= self.entries.popitem(last=False)[1][1]
            self.entries[key] = (value, nbytes)
            self.used += nbytes
            return True

    def clear(self) -> None:
        """Drop every entry (the counts stay)."""
        with self.lock:
            self.entries.clear()
            self.used = 0

    def snapshot(self) -> CacheCounts:
        """A copy of the counts so far."""
        with self.lock:
            return CacheCounts(dict(self.counts.hits), dict(self.counts.misses))

    def summary(self) -> str:
        """One line for a log: the counts so far and the memory in use."""
        with self.lock:
            return (f"{self.counts.summary()}; {self.used / 2**20:.0f} of {self.capacity / 2**20:.0f} MiB "
                    f"in {len(self.entries)} entries")

    def stats(self) -> dict[str, int]:
        """Counts, entries and bytes in use, for reports."""
        with self.lock:
            return {**self.counts.as_dict(), "entries": len(self.entries), "bytes": self.used,
                    "capacity_bytes": self.capacity}
