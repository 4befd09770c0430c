"""PendingQueue: HIGH before NORMAL before LOW, FIFO within a class; and its use offline."""

from __future__ import annotations

from worker.offline import Request, run_to_completion
from worker.pending_queue import PendingQueue
from worker.sequence import Priority, SamplingParams


def test_priority_then_fifo() -> None:
    queue: PendingQueue[str] = PendingQueue()
    for name, priority in [
        ("n1", Priority.NORMAL),
        ("l1", Priority.LOW),
        ("h1", Priority.HIGH),
        ("n2", Priority.NORMAL),
        ("h2", Priority.HIGH),
        ("l2", Priority.LOW),
    ]:
        queue.push(name, priority)
    assert len(queue) == 6 and queue.peek() == "h1"
    assert [queue.pop() for _ in range(6)] == ["h1", "h2", "n1", "n2", "l1", "l2"]


def test_high_priority_requests_start_first_offline(make_processor) -> None:
    processor = make_processor(max_batch_size=1)
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    requests = [
        Request("low", [1, 2], params, Priority.LOW),
        Request("normal", [1, 2], params, Priority.NORMAL),
        Request("high", [1, 2], params, Priority.HIGH),
    ]
    order: list[str] = []
    run_to_completion(
        processor, requests, lambda events: order.extend(e.request_id for e in events)
    )
    assert order == ["high", "high", "normal", "normal", "low", "low"]
