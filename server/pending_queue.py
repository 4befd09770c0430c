"""The front's pending queue: bounded, by priority, FIFO within a class, with aging.

A request's effective class improves by one per `aging_s` seconds waited, so a
steady stream of HIGH requests cannot starve LOW ones for ever. One deque per
class keeps FIFO order within a class; since everyone in a class ages at the
same rate, each class's head is its best entry, and pop compares only the heads.
`requeue` puts back a dispatched request whose worker died, at its original rank.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

from worker.channel.types import Priority

T = TypeVar("T")


class QueueFull(Exception):
    """The queue holds max_queue_len requests (sent as RESOURCE_EXHAUSTED)."""


@dataclass(eq=False)
class _Entry(Generic[T]):
    key: str
    item: T
    priority: Priority
    arrival: float  # seconds (time.monotonic or the caller's clock)
    order: int  # tie-break among equal arrivals
    removed: bool = False  # left in its deque until it reaches the head (O(1) remove)


class PendingQueue(Generic[T]):
    def __init__(self, max_queue_len: int, aging_s: float = 10.0) -> None:
        if max_queue_len < 1:
            raise ValueError(f"max_queue_len must be >= 1 (got {max_queue_len})")
        if not aging_s > 0:
            raise ValueError(f"aging_s must be > 0 (got {aging_s})")
        self.max_queue_len = max_queue_len
        self.aging_s = aging_s
        self._classes: dict[Priority, deque[_Entry[T]]] = {p: deque() for p in Priority}
        self._counts: dict[Priority, int] = dict.fromkeys(Priority, 0)
        self._index: dict[str, _Entry[T]] = {}
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def lengths_by_priority(self) -> dict[Priority, int]:
        """Queued requests per submitted class (not aged)."""
        return dict(self._counts)

    def push(self, key: str, item: T, priority: Priority, now: float | None = None) -> None:
        """Enqueue a new request; QueueFull when the queue is at its limit."""
        if len(self._index) >= self.max_queue_len:
            raise QueueFull(f"pending queue is full (max_queue_len {self.max_queue_len})")
        self._add(key, item, priority, _now(now))

    def requeue(self, key: str, item: T, priority: Priority, arrival: float) -> None:
        """Put back a request that was dispatched already (its worker died), at its old rank.

        It keeps its class and arrival (so its aging too), and goes ahead of every
        later arrival of its class; never QueueFull: it was admitted once.
        """
        self._add(key, item, priority, arrival, resumed=True)

    def peek(self, now: float | None = None) -> T | None:
        """The entry pop would return, or None when empty."""
        best = self._best(_now(now))
        return None if best is None else best.item

    def pop(self, now: float | None = None) -> T:
        """Remove and return the best entry; IndexError when empty."""
        best = self._best(_now(now))
        if best is None:
            raise IndexError("pop from an empty PendingQueue")
        self._classes[best.priority].popleft()
        self._forget(best)
        return best.item

    def remove(self, key: str) -> T | None:
        """Drop a queued request at once (cancel, deadline); None when not queued."""
        entry = self._index.get(key)
        if entry is None:
            return None
        self._forget(entry)
        entry.removed = True
        queue = self._classes[entry.priority]
        if len(queue) > 2 * self._counts[entry.priority] + 16:
            # Many removed entries are waiting to reach the head: sweep them now.
            self._classes[entry.priority] = deque(e for e in queue if not e.removed)
        return entry.item

    def drain(self) -> list[T]:
        """Remove everything (shutdown), in arrival order."""
        entries = sorted(self._index.values(), key=lambda e: (e.arrival, e.order))
        for queue in self._classes.values():
            queue.clear()
        self._index.clear()
        self._counts = dict.fromkeys(Priority, 0)
        return [e.item for e in entries]

    def _add(
        self, key: str, item: T, priority: Priority, arrival: float, resumed: bool = False
    ) -> None:
        if key in self._index:
            raise ValueError(f"request {key!r} is already queued")
        priority = Priority(priority)
        entry = _Entry(key, item, priority, arrival, next(self._order))
        queue = self._classes[priority]
        if resumed:  # in arrival order: usually at the head, so the scan is short
            at = next((i for i, e in enumerate(queue) if e.arrival > arrival), len(queue))
            queue.insert(at, entry)
        else:
            queue.append(entry)
        self._index[key] = entry
        self._counts[priority] += 1

    def _forget(self, entry: _Entry[T]) -> None:
        del self._index[entry.key]
        self._counts[entry.priority] -= 1

    def _best(self, now: float) -> _Entry[T] | None:
        best: _Entry[T] | None = None
        best_rank: tuple[int, float, int] | None = None
        for queue in self._classes.values():
            while queue and queue[0].removed:
                queue.popleft()
            if not queue:
                continue
            head = queue[0]
            rank = (self._effective_class(head, now), head.arrival, head.order)
            if best_rank is None or rank < best_rank:
                best, best_rank = head, rank
        return best

    def _effective_class(self, entry: _Entry[T], now: float) -> int:
        waited = max(0.0, now - entry.arrival)
        return max(0, int(entry.priority) - int(waited // self.aging_s))


def _now(now: float | None) -> float:
    return time.monotonic() if now is None else now
