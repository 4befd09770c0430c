"""Worker processes over shared memory: the server's EngineClient transport.

Each worker is `python -m worker.process` with a pair of shared-memory rings
and doorbells (worker/channel). The event loop watches every outbox doorbell
and every process's pidfd with `add_reader`, so it wakes when a worker writes
or dies, and never polls. A dead worker is reported to `EngineEvents.died`
and restarted, unless the pool is shutting down.

Sending never blocks the event loop: a message that does not fit the inbox
ring waits in the worker's backlog, behind which later messages queue, and
the backlog is retried shortly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import worker.channel
from worker.channel.client import EngineEvents
from worker.channel.messages import Message, Ready, Shutdown, decode, encode
from worker.channel.ring import Doorbell, Ring, segment_name, sweep_stale_segments
from worker.channel.types import EngineConfig, WorkerArgs

log = logging.getLogger(__name__)
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
RETRY_S = 0.0005  # backlog retry while a worker's inbox ring is full
# The directory holding the `worker` package, so a worker starts from any cwd.
_CODE_ROOT = str(Path(worker.channel.__file__).resolve().parents[2])


def worker_environment(index: int, workers: int, device: str, cores: int) -> dict[str, str]:
    """Per-worker environment: CPU replicas split the cores; GPU workers get one device each."""
    env = {name: str(max(1, cores // workers)) for name in BLAS_THREAD_VARIABLES}
    if device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = str(index)
    return env


@dataclass
class WorkerHandle:
    index: int
    process: subprocess.Popen
    pidfd: int  # readable once the process has exited
    inbox: Ring
    outbox: Ring
    inbox_bell: Doorbell
    outbox_bell: Doorbell
    backlog: deque[bytes] = field(default_factory=deque)  # encoded, waiting for inbox room
    became_ready: bool = False


class WorkerPool:
    """An EngineClient over `num_workers` worker processes."""

    def __init__(
        self,
        model_dir: str,
        engine: EngineConfig,
        num_workers: int,
        ring_bytes: int,
        on_fatal: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.model_dir = model_dir
        self.engine = engine
        self.num_workers = num_workers
        self.ring_bytes = ring_bytes
        self.workers: dict[int, WorkerHandle] = {}
        self.on_fatal = on_fatal  # called once no worker can ever serve (none could start)
        self.restarts = 0
        self.stopping = False
        self._events: EngineEvents | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, events: EngineEvents) -> None:
        self._events, self._loop = events, asyncio.get_running_loop()
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
            inbox_bell_fd=inbox_bell.read_fd,
            outbox_bell_fd=outbox_bell.write_fd,
        )
        cores = os.cpu_count() or 1
        env = {
            **os.environ,
            **worker_environment(index, self.num_workers, self.engine.device, cores),
            "PYTHONPATH": os.pathsep.join(filter(None, [_CODE_ROOT, os.environ.get("PYTHONPATH")])),
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.process", args.to_json()],
            pass_fds=(inbox_bell.read_fd, outbox_bell.write_fd),
            env=env,
        )
        # The worker's ends live on in the worker; the front keeps only its own.
        os.close(inbox_bell.read_fd)
        os.close(outbox_bell.write_fd)
        inbox_bell.read_fd = outbox_bell.write_fd = -1
        handle = WorkerHandle(
            index, process, os.pidfd_open(process.pid), inbox, outbox, inbox_bell, outbox_bell
        )
        self.workers[index] = handle
        self._loop.add_reader(outbox_bell.fileno(), self._drain, handle)
        self._loop.add_reader(handle.pidfd, self._died, handle)
        log.info("worker %d started (pid %d)", index, process.pid)

    # -- receiving ---------------------------------------------------------------------
    def _drain(self, handle: WorkerHandle) -> None:
        assert self._events is not None
        handle.outbox_bell.drain()
        for raw in handle.outbox.read_messages():
            message = decode(raw)
            handle.became_ready |= isinstance(message, Ready)
            self._events.deliver(handle.index, message)

    def _died(self, handle: WorkerHandle) -> None:
        assert self._events is not None
        self._drain(handle)  # whatever it wrote before dying still counts
        self._forget(handle)
        reason = f"worker {handle.index} died (exit code {handle.process.returncode})"
        self._events.died(handle.index, reason)
        if self.stopping:
            return
        if not handle.became_ready:  # it would only fail the same way again
            log.error(
                "worker %d could not start (exit code %s); not restarting it",
                handle.index,
                handle.process.returncode,
            )
            if not self.workers:
                self.on_fatal(f"no worker could load {self.model_dir} (see the log above)")
            return
        log.error("%s; restarting it", reason)
        self.restarts += 1
        self._spawn(handle.index)

    def _forget(self, handle: WorkerHandle) -> None:
        assert self._loop is not None
        self._loop.remove_reader(handle.outbox_bell.fileno())
        self._loop.remove_reader(handle.pidfd)
        os.close(handle.pidfd)
        handle.process.poll()  # reap it
        for ring in (handle.inbox, handle.outbox):
            ring.close()
            ring.unlink()
        handle.inbox_bell.close()
        handle.outbox_bell.close()
        if self.workers.get(handle.index) is handle:
            del self.workers[handle.index]

    # -- sending -----------------------------------------------------------------------
    def send(self, worker: int, message: Message) -> bool:
        """Queue a message for a worker, in order, without blocking; False if it is gone."""
        handle = self.workers.get(worker)
        if handle is None:
            return False
        handle.backlog.append(encode(message))
        if len(handle.backlog) == 1:
            self._flush(handle)
        return True

    def _flush(self, handle: WorkerHandle) -> None:
        if self.workers.get(handle.index) is not handle:
            return  # it died; its requests were failed by `died`
        while handle.backlog and handle.inbox.try_write(handle.backlog[0]):
            handle.backlog.popleft()
        handle.inbox_bell.ring()
        if handle.backlog:
            assert self._loop is not None
            self._loop.call_later(RETRY_S, self._flush, handle)

    # -- shutdown ----------------------------------------------------------------------
    async def shutdown(self, timeout: float = 10.0) -> None:
        """Ask every worker to stop, wait for it (kill after `timeout`), unlink the rings."""
        self.stopping = True
        handles = list(self.workers.values())
        for handle in handles:
            self.send(handle.index, Shutdown())
        loop = asyncio.get_running_loop()
        for handle in handles:
            try:
                await loop.run_in_executor(None, handle.process.wait, timeout)
            except subprocess.TimeoutExpired:
                handle.process.kill()
                await loop.run_in_executor(None, handle.process.wait, 5)
            if self.workers.get(handle.index) is handle:
                self._forget(handle)
