"""Frontend: the pending queue, the dispatcher and the request registry around the pool.

The seed's DynamicBatcher across processes: `submit` queues a request,
the dispatcher refills each worker's free capacity (slots, and a worker that
reports requests waiting for KV space gets no more) from the queue as
sequences finish, and tokens flow back into each request's state. Nothing
here knows about gRPC; the servicer converts at the edge.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from tokenizers import Tokenizer

from server.config import ServerConfig
from server.detokenizer import IncrementalText
from server.logs import REQUEST_LOGGER, request_fields
from server.metrics import Metrics
from server.pending_queue import PendingQueue
from server.requests import RequestError, RequestRegistry, RequestState
from server.validation import Limits, ValidatedRequest
from server.worker_pool import Callbacks, WorkerHandle, WorkerPool
from worker.channel.messages import Add, Cancel, Ready, Rejected, Status, TokenRecord
from worker.engine_config import EngineConfig
from worker.sequence import FinishReason

log = logging.getLogger(__name__)
request_log = logging.getLogger(REQUEST_LOGGER)


class Unavailable(Exception):
    """No worker can serve, or the server is draining."""


class UnknownRequest(KeyError):
    pass


@dataclass(frozen=True)
class WorkerView:
    index: int
    alive: bool
    status: Status | None
    max_batch_size: int


class Frontend:
    def __init__(self, config: ServerConfig, tokenizer: Tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.queue: PendingQueue[RequestState] = PendingQueue(config.max_queue_len, config.aging_s)
        self.registry = RequestRegistry(config.retention_s, config.retention_count)
        engine = EngineConfig(
            max_batch_size=config.max_batch_size,
            kv_cache_mb=config.kv_cache_mb,
            prefill_token_budget=config.prefill_token_budget,
            device=config.device,
        )
        callbacks = Callbacks(
            self._on_ready, self._on_tokens, self._on_status, self._on_rejected, self._on_died
        )
        self.pool = WorkerPool(config.model, engine, config.workers, config.ring_bytes, callbacks)
        self.metrics = Metrics()
        self.metrics.observe_on_scrape(self.queue.lengths_by_priority, lambda: self.pool.restarts)
        self.model: Ready | None = None
        self.draining = False
        self.on_health_change: Callable[[bool], None] = lambda serving: None
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._dispatcher: asyncio.Task | None = None

    # -- life cycle ------------------------------------------------------------------
    def start(self) -> None:
        self.pool.start()
        self._dispatcher = asyncio.create_task(self._dispatch_loop())

    @property
    def serving(self) -> bool:
        """Health: every worker came up once, at least one is up now, and not draining."""
        return self.model is not None and bool(self.pool.serving()) and not self.draining

    def limits(self) -> Limits:
        assert self.model is not None
        return Limits(
            vocab_size=self.model.vocab_size,
            max_context=self.model.max_seq_len,
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
            await self.cancel(state.request_id)
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        await self.pool.shutdown()

    # -- requests --------------------------------------------------------------------
    def submit(self, request: ValidatedRequest) -> RequestState:
        """Queue a validated request (QueueFull / DuplicateRequestId / Unavailable)."""
        if not self.serving:
            raise Unavailable("server is draining" if self.draining else "no worker is ready")
        state = self.registry.create(request, IncrementalText(self.tokenizer, request.stop))
        try:
            self.queue.push(state.request_id, state, request.priority)
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

    async def cancel(self, request_id: str) -> bool:
        """Abort a queued or running request; False if it had already finished."""
        state = self.get(request_id)
        if state.finished:
            return False
        if self.queue.remove(request_id) is None and state.worker is not None:
            await self.pool.send(state.worker, Cancel(state.handle))
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

    # -- worker events ---------------------------------------------------------------
    def _on_ready(self, index: int, ready: Ready) -> None:
        self.metrics.worker_ready(index, ready.max_batch_size, ready.kv_blocks_total)
        if self.model is None and not self.pool.all_ready():
            return  # health turns SERVING only once every worker has come up
        self.model = self.model or ready
        self.on_health_change(self.serving)
        self._wake.set()

    def _on_tokens(self, index: int, records: list[TokenRecord]) -> None:
        for record in records:
            state = self.registry.by_handle.get(record.handle)
            if state is None or state.finished:
                continue  # cancelled or stopped here already
            if record.token_id >= 0:
                previous = state.last_token_at
                stopped = state.add_tokens([record.token_id])
                self.metrics.token(state, previous)
                if stopped:
                    self._spawn(self.pool.send(index, Cancel(state.handle)))  # a stop string
            if record.finish_reason and not state.finished:
                state.finish(record.finish_reason)
            if state.finished:
                self._retire(state)
        self._wake.set()  # finished sequences free slots

    def _on_status(self, index: int, status: Status) -> None:
        self.metrics.worker_status(index, status)
        self._wake.set()

    def _on_rejected(self, index: int, rejected: Rejected) -> None:
        state = self.registry.by_handle.get(rejected.handle)
        if state is not None:
            self._end(
                state, FinishReason.CANCELLED, RequestError("INVALID_ARGUMENT", rejected.message)
            )

    def _on_died(self, index: int, reason: str) -> None:
        self.metrics.worker_gone(index)
        for state in [s for s in self.registry.live.values() if s.worker == index]:
            self._end(state, FinishReason.CANCELLED, RequestError("UNAVAILABLE", reason))
        self.on_health_change(self.serving)

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- dispatch --------------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._dispatch()

    def _target(self) -> WorkerHandle | None:
        """The serving worker with the most free slots, if it can take more now."""
        candidates = [w for w in self.pool.serving() if w.status is None or not w.status.waiting]
        best = max(candidates, key=lambda w: w.free_slots, default=None)
        return best if best is not None and best.free_slots > 0 else None

    async def _dispatch(self) -> None:
        waited = False
        while self.queue and (worker := self._target()) is not None:
            if not waited and not worker.assigned and len(self.queue) < worker.free_slots:
                # An idle worker waits a moment (once) so a burst starts as one batch.
                waited = True
                await asyncio.sleep(self.config.batch_timeout_ms / 1000)
                continue
            state = self.queue.pop()
            state.worker, state.dispatched_at = worker.index, time.monotonic()
            worker.assigned.add(state.handle)
            self.metrics.dispatched(state)
            request = state.request
            add = Add(state.handle, request.prompt_ids, request.params, request.priority)
            if not await self.pool.send(worker.index, add):
                gone = RequestError("UNAVAILABLE", f"worker {worker.index} went away")
                self._end(state, FinishReason.CANCELLED, gone)

    # -- introspection ---------------------------------------------------------------
    def workers(self) -> list[WorkerView]:
        return [
            WorkerView(i, w.serving, w.status, w.ready.max_batch_size if w.ready else 0)
            for i, w in sorted(self.pool.workers.items())
        ]
