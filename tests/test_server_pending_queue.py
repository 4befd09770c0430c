"""server.pending_queue: bounded, HIGH before NORMAL before LOW, FIFO, aging, O(1) remove."""

from __future__ import annotations

import tracemalloc

import pytest

from server.pending_queue import PendingQueue, QueueFull
from worker.channel.types import Priority

HIGH, NORMAL, LOW = Priority.HIGH, Priority.NORMAL, Priority.LOW


def filled(entries: list[tuple[str, Priority, float]], aging_s: float = 10.0) -> PendingQueue[str]:
    queue: PendingQueue[str] = PendingQueue(max_queue_len=100, aging_s=aging_s)
    for key, priority, now in entries:
        queue.push(key, key, priority, now=now)
    return queue


def pop_all(queue: PendingQueue[str], now: float) -> list[str]:
    return [queue.pop(now=now) for _ in range(len(queue))]


def test_priority_then_fifo() -> None:
    queue = filled([("n1", NORMAL, 0), ("l1", LOW, 0), ("h1", HIGH, 0)])
    queue.push("n2", "n2", NORMAL, now=1)
    queue.push("h2", "h2", HIGH, now=1)
    queue.push("l2", "l2", LOW, now=1)
    assert len(queue) == 6 and queue.peek(now=1) == "h1"
    assert queue.lengths_by_priority() == {HIGH: 2, NORMAL: 2, LOW: 2}
    assert pop_all(queue, now=2) == ["h1", "h2", "n1", "n2", "l1", "l2"]
    assert queue.peek(now=2) is None and len(queue) == 0
    with pytest.raises(IndexError):
        queue.pop(now=2)


def test_aging_moves_a_request_up_one_class_per_aging_period() -> None:
    queue = filled([("low", LOW, 0.0), ("normal", NORMAL, 5.0)])
    assert queue.peek(now=9.9) == "normal"
    # At 10 s the LOW request ranks as NORMAL and arrived first.
    assert queue.peek(now=10.0) == "low"
    # At 15 s NORMAL has aged to HIGH; LOW is still a step behind.
    assert queue.peek(now=15.0) == "normal"

    queue = filled([("low", LOW, 0.0), ("high", HIGH, 12.0)])
    assert queue.peek(now=19.9) == "high"
    # At 20 s LOW ranks as HIGH and beats the later HIGH arrival.
    assert pop_all(queue, now=20.0) == ["low", "high"]


def test_low_is_not_starved_by_a_steady_stream_of_high() -> None:
    queue = filled([("low", LOW, 0.0)], aging_s=1.0)
    served: list[str] = []
    for step in range(50):
        now = step * 0.1
        queue.push(f"h{step}", f"h{step}", HIGH, now=now)
        served.append(queue.pop(now=now))
        if "low" in served:
            break
    assert served[-1] == "low" and len(served) <= 21


def test_bounded_queue() -> None:
    queue: PendingQueue[int] = PendingQueue(max_queue_len=2)
    queue.push("a", 1, NORMAL)
    queue.push("b", 2, LOW)
    with pytest.raises(QueueFull, match="max_queue_len 2"):
        queue.push("c", 3, HIGH)
    assert queue.pop() == 1
    queue.push("c", 3, HIGH)  # room again
    assert len(queue) == 2


def test_remove_contains_and_duplicates() -> None:
    queue = filled([("a", NORMAL, 0), ("b", NORMAL, 1), ("c", LOW, 2)])
    assert "b" in queue and "z" not in queue
    with pytest.raises(ValueError, match="already queued"):
        queue.push("b", "b", HIGH, now=3)
    assert queue.remove("a") == "a" and queue.remove("a") is None
    assert "a" not in queue and len(queue) == 2
    assert queue.lengths_by_priority() == {HIGH: 0, NORMAL: 1, LOW: 1}
    assert queue.peek(now=3) == "b"
    assert queue.remove("c") == "c"
    assert pop_all(queue, now=3) == ["b"]
    queue.push("a", "a", NORMAL, now=4)  # a removed key can come back
    assert queue.pop(now=4) == "a"


def test_removed_entries_do_not_accumulate() -> None:
    # Removed entries wait behind a live head; they must be swept, not kept: the memory the
    # queue holds stays flat however many requests come and go (kept, 20000 entries take MBs).
    queue = filled([("keep", LOW, 0)])

    def churn(start: int, count: int) -> None:
        for i in range(start, start + count):
            queue.push(f"x{i}", "x", LOW, now=1)
            queue.remove(f"x{i}")

    tracemalloc.start()
    try:
        churn(0, 1000)
        before, _ = tracemalloc.get_traced_memory()
        churn(1000, 20000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 200_000, f"{grown} bytes kept after 20000 removed requests"
    assert len(queue) == 1 and queue.lengths_by_priority()[LOW] == 1
    assert queue.pop(now=2) == "keep"


def test_removed_head_frees_a_slot() -> None:
    queue: PendingQueue[str] = PendingQueue(max_queue_len=1)
    queue.push("a", "a", NORMAL, now=0)
    queue.remove("a")
    queue.push("b", "b", NORMAL, now=1)
    assert queue.pop(now=1) == "b"


def test_drain_returns_everything_in_arrival_order() -> None:
    queue = filled([("l", LOW, 0), ("n", NORMAL, 1), ("h", HIGH, 2)])
    queue.remove("n")
    assert queue.drain() == ["l", "h"]
    assert len(queue) == 0 and queue.lengths_by_priority() == {HIGH: 0, NORMAL: 0, LOW: 0}
    assert queue.peek() is None


def test_default_clock_is_monotonic() -> None:
    queue: PendingQueue[str] = PendingQueue(max_queue_len=4)
    queue.push("n", "n", NORMAL)
    queue.push("h", "h", HIGH)
    assert queue.pop() == "h" and queue.pop() == "n"


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_queue_len"):
        PendingQueue(max_queue_len=0)
    with pytest.raises(ValueError, match="aging_s"):
        PendingQueue(max_queue_len=1, aging_s=0)
