"""Drive a BatchProcessor from a PendingQueue until every request has finished.

The in-process form of the front's dispatcher: refill free slots from the queue
after every step, so a finished sequence's slot is reused on the next step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from worker.batch_processor import BatchProcessor
from worker.pending_queue import PendingQueue
from worker.sequence import FinishReason, Priority, SamplingParams, TokenEvent


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: Priority = Priority.NORMAL


@dataclass
class Completion:
    request_id: str
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason = FinishReason.NONE


def run_to_completion(
    processor: BatchProcessor,
    requests: Iterable[Request],
    on_events: Callable[[list[TokenEvent]], None] | None = None,
) -> dict[str, Completion]:
    """Run all requests with continuous batching; results keyed by request_id."""
    queue: PendingQueue[Request] = PendingQueue()
    results: dict[str, Completion] = {}
    for request in requests:
        queue.push(request, request.priority)
        results[request.request_id] = Completion(request.request_id, len(request.prompt_ids))

    while queue or processor.has_work():
        while queue:
            head = queue.peek()
            if not processor.add_request(
                head.request_id, head.prompt_ids, head.params, head.priority
            ):
                break
            queue.pop()
        events = processor.process_step()
        if not events and not processor.has_work() and queue:
            raise RuntimeError(f"request {queue.peek().request_id!r} can never be admitted")
        for event in events:
            result = results[event.request_id]
            result.token_ids.append(event.token_id)
            result.finish_reason = event.finish_reason
        if on_events is not None:
            on_events(events)
    return results
