"""The front's side of the worker processes: spawn, talk over shared memory, supervise.

Each worker gets a pair of shared-memory rings and doorbells (worker/channel).
The event loop watches every outbox doorbell and every process sentinel with
`add_reader`, so it wakes when a worker writes or dies, and never polls.
A dead worker is reported to `Callbacks.died` (its requests fail) and
restarted, unless the pool is shutting down.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess

from worker.channel.messages import (
    Message,
    Ready,
    Rejected,
    Shutdown,
    Status,
    TokenRecord,
    Tokens,
    decode,
    encode,
)
from worker.channel.ring import Doorbell, Ring, segment_name, sweep_stale_segments
from worker.engine_config import EngineConfig
from worker.process import WorkerArgs, run_worker, worker_environment

log = logging.getLogger(__name__)
_SPAWN = multiprocessing.get_context("spawn")


@dataclass
class Callbacks:
    ready: Callable[[int, Ready], None]
    tokens: Callable[[int, list[TokenRecord]], None]
    status: Callable[[int, Status], None]
    rejected: Callable[[int, Rejected], None]
    died: Callable[[int, str], None]


@dataclass
class WorkerHandle:
    index: int
    process: BaseProcess
    inbox: Ring
    outbox: Ring
    inbox_bell: Doorbell
    outbox_bell: Doorbell
    ready: Ready | None = None
    status: Status | None = None
    assigned: set[int] = field(default_factory=set)  # handles sent and not yet finished
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def serving(self) -> bool:
        return self.ready is not None and self.process.is_alive()

    @property
    def free_slots(self) -> int:
        if self.ready is None:
            return 0
        return self.ready.max_batch_size - len(self.assigned)


class WorkerPool:
    def __init__(
        self,
        model_dir: str,
        engine: EngineConfig,
        workers: int,
        ring_bytes: int,
        callbacks: Callbacks,
    ) -> None:
        self.model_dir = model_dir
        self.engine = engine
        self.num_workers = workers
        self.ring_bytes = ring_bytes
        self.callbacks = callbacks
        self.workers: dict[int, WorkerHandle] = {}
        self.restarts = 0
        self.stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        swept = sweep_stale_segments()
        if swept:
            log.warning("removed %d stale shared-memory segments: %s", len(swept), swept)
        for index in range(self.num_workers):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        assert self._loop is not None
        inbox = Ring.create(segment_name(index, "in"), self.ring_bytes)
        outbox = Ring.create(segment_name(index, "out"), self.ring_bytes)
        inbox_bell, outbox_bell = Doorbell.create(), Doorbell.create()
        args = WorkerArgs(
            index=index,
            model_dir=self.model_dir,
            engine=self.engine,
            inbox=inbox.shm.name,
            outbox=outbox.shm.name,
            inbox_bell=inbox_bell,
            outbox_bell=outbox_bell,
            env=worker_environment(
                index, self.num_workers, self.engine.device, os.cpu_count() or 1
            ),
        )
        process = _SPAWN.Process(
            target=run_worker, args=(args,), name=f"shoal-worker-{index}", daemon=True
        )
        process.start()
        handle = WorkerHandle(index, process, inbox, outbox, inbox_bell, outbox_bell)
        self.workers[index] = handle
        self._loop.add_reader(outbox_bell.fileno(), self._drain, handle)
        self._loop.add_reader(process.sentinel, self._died, handle)
        log.info("worker %d started (pid %d)", index, process.pid)

    # -- receiving ---------------------------------------------------------------------
    def _drain(self, handle: WorkerHandle) -> None:
        handle.outbox_bell.drain()
        for raw in handle.outbox.read_messages():
            self._deliver(handle, decode(raw))

    def _deliver(self, handle: WorkerHandle, message: Message) -> None:
        cb, index = self.callbacks, handle.index
        match message:
            case Tokens(records):
                for record in records:
                    if record.finish_reason:
                        handle.assigned.discard(record.handle)
                cb.tokens(index, records)
            case Status():
                handle.status = message
                cb.status(index, message)
            case Ready():
                handle.ready = message
                log.info("worker %d ready on %s", index, message.device)
                cb.ready(index, message)
            case Rejected():
                handle.assigned.discard(message.handle)
                cb.rejected(index, message)

    def _died(self, handle: WorkerHandle) -> None:
        self._drain(handle)  # whatever it wrote before dying still counts
        self._forget(handle)
        reason = f"worker {handle.index} died (exit code {handle.process.exitcode})"
        if not self.stopping:
            log.error("%s; restarting it", reason)
        self.callbacks.died(handle.index, reason)
        if not self.stopping:
            self.restarts += 1
            self._spawn(handle.index)

    def _forget(self, handle: WorkerHandle) -> None:
        assert self._loop is not None
        self._loop.remove_reader(handle.outbox_bell.fileno())
        self._loop.remove_reader(handle.process.sentinel)
        handle.process.join(timeout=0)
        for ring in (handle.inbox, handle.outbox):
            ring.close()
            ring.unlink()
        for bell in (handle.inbox_bell, handle.outbox_bell):
            bell.reader.close()
            bell.writer.close()
        if self.workers.get(handle.index) is handle:
            del self.workers[handle.index]

    # -- sending -----------------------------------------------------------------------
    async def send(self, index: int, message: Message) -> bool:
        """Write a message to worker `index`, waiting while its inbox is full. False if gone."""
        handle = self.workers.get(index)
        if handle is None:
            return False
        async with handle.send_lock:  # one message at a time: frames never interleave
            for payload, flags in handle.inbox.frames_of(encode(message)):
                while not handle.inbox.try_write_frame(payload, flags):
                    if self.workers.get(index) is not handle:
                        return False
                    handle.inbox_bell.ring()
                    await asyncio.sleep(0.0005)
            handle.inbox_bell.ring()
        return True

    # -- queries -----------------------------------------------------------------------
    def serving(self) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.serving]

    def all_ready(self) -> bool:
        return len(self.serving()) == self.num_workers

    # -- shutdown ----------------------------------------------------------------------
    async def shutdown(self, timeout: float = 10.0) -> None:
        """Ask every worker to stop, wait for it (kill after `timeout`), unlink the rings."""
        self.stopping = True
        handles = list(self.workers.values())
        for handle in handles:
            await self.send(handle.index, Shutdown())
        loop = asyncio.get_running_loop()
        for handle in handles:
            await loop.run_in_executor(None, handle.process.join, timeout)
            if handle.process.is_alive():
                handle.process.kill()
                await loop.run_in_executor(None, handle.process.join, 5)
            if self.workers.get(handle.index) is handle:
                self._forget(handle)
