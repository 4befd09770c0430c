"""Frontend: the pending queue, the dispatcher and the request registry around the engines.

The seed's DynamicBatcher, over any EngineClient (worker processes for the
server, one in-process engine for `python -m worker.batch`): `submit` queues a
validated request, the dispatcher sends queued requests to workers as their
credits allow, and token records flow back into each request's state, its
detokenizer and stop strings. Nothing here knows about gRPC or JSON: the
edges convert.

Credits: a worker's Status says how many requests it could start now
(`free_slots`) and how many KV tokens are free after its own queue
(`kv_free_tokens`). The front keeps no count of its own beyond what it has
sent and the worker has not yet read (`adds_sent - status.adds_received`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.config import ServerConfig
from server.detokenizer import IncrementalText
from server.logs import REQUEST_LOGGER, request_fields
from server.metrics import Metrics
from server.pending_queue import PendingQueue
from server.prompts import PromptEncoder
from server.requests import RequestError, RequestRegistry, RequestState
from server.validation import Limits, ValidatedRequest
from worker.channel.client import EngineClient, EngineEvents
from worker.channel.messages import Add, Cancel, Ready, Rejected, Status
from worker.channel.types import FinishReason, TokenRecord

log = logging.getLogger(__name__)
request_log = logging.getLogger(REQUEST_LOGGER)


class Unavailable(Exception):
    """No worker can serve, or the server is draining."""


class UnknownRequest(KeyError):
    pass


@dataclass
class WorkerState:
    """The front's view of one worker: what it said, and what was sent since."""

    index: int
    ready: Ready
    status: Status | None = None
    alive: bool = True
    adds_sent: int = 0
    add_tokens_sent: int = 0

    def credits(self) -> tuple[int, int]:
        """(requests, KV tokens) this worker can take now without queueing them."""
        s = self.status
        if s is None:
            return 0, 0
        return (
            s.free_slots - (self.adds_sent - s.adds_received),
            s.kv_free_tokens - (self.add_tokens_sent - s.add_tokens_received),
        )

    @property
    def idle(self) -> bool:
        s = self.status
        return s is not None and not s.running and not s.waiting and self.in_flight == 0

    @property
    def in_flight(self) -> int:
        return self.adds_sent - (self.status.adds_received if self.status else 0)


class Frontend:
    def __init__(self, config: ServerConfig, engine: EngineClient) -> None:
        self.config = config
        self.engine = engine
        self.queue: PendingQueue[RequestState] = PendingQueue(config.max_queue_len, config.aging_s)
        self.registry = RequestRegistry(
            config.retention_s, config.retention_count, config.retention_bytes
        )
        self.workers: dict[int, WorkerState] = {}
        self.metrics = Metrics()
        self.metrics.observe_on_scrape(self.queue.lengths_by_priority, lambda: engine.restarts)
        self.model: Ready | None = None  # the first worker's Ready: what the model accepts
        self.prompts: PromptEncoder | None = None  # its tokenizer and chat template
        self.draining = False
        self.on_health_change: Callable[[bool], None] = lambda serving: None
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task | None = None

    # -- life cycle ------------------------------------------------------------------
    def start(self) -> None:
        events = EngineEvents(
            self._on_ready, self._on_status, self._on_tokens, self._on_rejected, self._on_died
        )
        self.engine.start(events)
        self._dispatcher = asyncio.create_task(self._dispatch_loop())

    def serving_workers(self) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.alive]

    @property
    def serving(self) -> bool:
        """Health: every worker came up once, at least one is up now, and not draining."""
        return self.model is not None and bool(self.serving_workers()) and not self.draining

    def limits(self) -> Limits:
        assert self.model is not None
        # An Add carries 4 bytes per token and must fit one ring (4 MiB: ~1M tokens).
        ring_tokens = (self.config.ring_bytes - 1024) // 4
        return Limits(
            vocab_size=self.model.vocab_size,
            max_context=min(self.model.max_context, ring_tokens),
            max_new_tokens_limit=self.config.max_new_tokens_limit,
        )

    async def drain(self) -> None:
        """Stop taking requests, let running ones finish within the grace period, stop workers."""
        self.draining = True
        self.on_health_change(False)
        draining = RequestError("UNAVAILABLE", "server is draining")
        for state in self.queue.drain():
            self._end(state, FinishReason.CANCELLED, draining)
        deadline = time.monotonic() + self.config.drain_grace_s
        while self.registry.live and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for state in list(self.registry.live.values()):
            self.cancel(state.request_id)
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        await self.engine.shutdown()

    # -- requests --------------------------------------------------------------------
    def submit(self, request: ValidatedRequest) -> RequestState:
        """Queue a validated request (QueueFull / DuplicateRequestId / Unavailable)."""
        if not self.serving:
            raise Unavailable("server is draining" if self.draining else "no worker is ready")
        assert self.prompts is not None  # serving implies a Ready arrived
        text = IncrementalText(self.prompts.tokenizer, request.stop)
        state = self.registry.create(request, text)
        try:
            self.queue.push(state.request_id, state, request.priority, state.arrival)
        except Exception:
            self.registry.discard(state)
            raise
        self._wake.set()
        return state

    def get(self, request_id: str) -> RequestState:
        state = self.registry.get(request_id)
        if state is None:
            raise UnknownRequest(f"request_id {request_id!r} is not known (or has expired)")
        return state

    def cancel(self, request_id: str) -> bool:
        """Abort a queued or running request; False if it had already finished."""
        state = self.get(request_id)
        if state.finished:
            return False
        if self.queue.remove(request_id) is None and state.worker is not None:
            self.engine.send(state.worker, Cancel(state.handle))
        self._end(state, FinishReason.CANCELLED)
        return True

    def _end(
        self, state: RequestState, reason: FinishReason, error: RequestError | None = None
    ) -> None:
        state.finish(reason, error)
        self._retire(state)

    def _retire(self, state: RequestState) -> None:
        """Every admitted request ends here exactly once: metrics, the request log line."""
        if self.registry.live.get(state.request_id) is not state:
            return
        self.registry.retire(state)
        self.metrics.request_finished(state)
        request_log.info("request finished", extra={"fields": request_fields(state)})

    # -- engine events ---------------------------------------------------------------
    def _on_ready(self, index: int, ready: Ready) -> None:
        self.workers[index] = WorkerState(index, ready)
        self.metrics.worker_ready(index, ready.kv_blocks_total)
        log.info("worker %d ready on %s", index, ready.device)
        if self.model is None and len(self.serving_workers()) < self.engine.num_workers:
            return  # health turns SERVING only once every worker has come up
        if self.model is None:
            self.model, self.prompts = ready, PromptEncoder.from_ready(ready)
        self.on_health_change(self.serving)
        self._wake.set()

    def _on_status(self, index: int, status: Status) -> None:
        worker = self.workers.get(index)
        if worker is not None:
            worker.status = status
        self.metrics.worker_status(index, status)
        self._wake.set()

    def _on_tokens(self, index: int, records: list[TokenRecord]) -> None:
        for record in records:
            state = self.registry.by_handle.get(record.handle)
            if state is None or state.finished:
                continue  # cancelled or stopped here already
            if state.cached_prompt_tokens is None:
                state.cached_prompt_tokens = record.cached_prompt_tokens
            if record.token_id >= 0:
                previous = state.last_token_at
                stopped = state.add_tokens([record.token_id], [record.logprob])
                self.metrics.token(state, previous)
                if stopped:  # a stop string: the worker need not go on
                    self.engine.send(index, Cancel(state.handle))
            if record.finish_reason and not state.finished:
                state.finish(record.finish_reason)
            if state.finished:
                self._retire(state)

    def _on_rejected(self, index: int, rejected: Rejected) -> None:
        state = self.registry.by_handle.get(rejected.handle)
        if state is not None:
            error = RequestError("INVALID_ARGUMENT", rejected.message)
            self._end(state, FinishReason.CANCELLED, error)

    def _on_died(self, index: int, reason: str) -> None:
        worker = self.workers.get(index)
        if worker is not None:  # its replacement sends a new Ready
            worker.alive, worker.status = False, None
        self.metrics.worker_gone(index)
        for state in [s for s in self.registry.live.values() if s.worker == index]:
            self._resume(state, reason)
        self.on_health_change(self.serving)
        self._wake.set()

    def _resume(self, state: RequestState, reason: str) -> None:
        """Put a request whose worker died back at its rank, to go on from its tokens.

        One that was on a worker at `max_resumptions` deaths (a likely poison request)
        fails instead; a finished or cancelled one is no longer live, so never comes here.
        """
        deaths = state.resumptions + 1
        if deaths >= self.config.max_resumptions:
            message = (
                f"{reason}; worker died {deaths} times while running this request; "
                "it may be a poison request"
            )
            self._end(state, FinishReason.CANCELLED, RequestError("UNAVAILABLE", message))
            return
        state.resumptions, state.worker = deaths, None
        self.queue.requeue(state.request_id, state, state.request.priority, state.arrival)
        self.metrics.resumed_request()
        log.warning(
            "request %s resumed after %s (%d tokens so far, resumption %d)",
            state.request_id,
            reason,
            len(state.token_ids),
            deaths,
        )

    # -- dispatch --------------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._dispatch()

    def _target(self, prompt_tokens: int) -> WorkerState | None:
        """The serving worker with the most free slots, if it can start the request now."""
        best, best_credits = None, (0, 0)
        for worker in self.serving_workers():
            credits = worker.credits()
            if credits[0] > best_credits[0] and credits[1] >= prompt_tokens:
                best, best_credits = worker, credits
        return best

    async def _dispatch(self) -> None:
        waited = False
        while (head := self.queue.peek()) is not None:
            worker = self._target(len(head.request.prompt_ids) + len(head.token_ids))
            if worker is None:
                return  # the next Status wakes us
            if not waited and worker.idle and len(self.queue) < worker.credits()[0]:
                # An idle worker waits a moment (once) so a burst starts as one batch.
                waited = True
                await asyncio.sleep(self.config.batch_timeout_ms / 1000)
                continue
            state = self.queue.pop()
            request = state.request
            # A resumed request carries the tokens it has: the worker goes on after them.
            generated = list(state.token_ids)
            add = Add(state.handle, request.prompt_ids, request.params, request.priority, generated)
            state.worker = worker.index
            worker.adds_sent += 1
            worker.add_tokens_sent += add.num_tokens
            if state.dispatched_at is None:  # queue time: to the first dispatch
                state.dispatched_at = time.monotonic()
                self.metrics.dispatched(state)
            if not self.engine.send(worker.index, add):
                gone = RequestError("UNAVAILABLE", f"worker {worker.index} went away")
                self._end(state, FinishReason.CANCELLED, gone)
