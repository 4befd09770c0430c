"""An in-process pending queue: HIGH before NORMAL before LOW, FIFO within a class."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from worker.sequence import Priority

T = TypeVar("T")


@dataclass(order=True)
class _Entry(Generic[T]):
    priority: int
    order: int
    item: T = field(compare=False)


class PendingQueue(Generic[T]):
    def __init__(self) -> None:
        self._heap: list[_Entry[T]] = []
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, item: T, priority: Priority = Priority.NORMAL) -> None:
        heapq.heappush(self._heap, _Entry(int(priority), next(self._counter), item))

    def peek(self) -> T:
        return self._heap[0].item

    def pop(self) -> T:
        return heapq.heappop(self._heap).item
