"""The in-process transport: one EngineCore on the caller's event loop, no processes.

`python -m worker.batch` drives the same front pipeline as the server
(server/frontend.py) through this instead of worker processes over shared
memory. Messages go straight to the EngineCore; each engine step runs on the
event loop (blocking it for the step, which is fine with no network to serve),
and the loop yields between steps so requests and results keep flowing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from worker.channel.client import EngineEvents
from worker.channel.messages import Message
from worker.engine_core import EngineCore


class InProcessEngine:
    """An EngineClient with one worker (index 0) living in this process."""

    num_workers = 1
    restarts = 0

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._inbox: deque[Message] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.error = ""  # why the engine stopped, if it failed

    def start(self, events: EngineEvents) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(events))
        self._task.add_done_callback(lambda task: self._ended(task, events))

    def _ended(self, task: asyncio.Task, events: EngineEvents) -> None:
        """An engine that raised is a dead worker: its requests fail, nothing hangs."""
        if not task.cancelled() and task.exception() is not None:
            self.error = f"the engine failed: {task.exception()!r}"
            events.died(0, self.error)

    def send(self, worker: int, message: Message) -> bool:
        self._inbox.append(message)
        self._wake.set()
        return True

    async def _run(self, events: EngineEvents) -> None:
        for message in (self.core.ready(), self.core.status()):
            events.deliver(0, message)
        while not self.core.stopped:
            if not self._inbox and not self.core.has_work():
                await self._wake.wait()
            self._wake.clear()
            out: list[Message] = []
            while self._inbox:
                out += self.core.receive(self._inbox.popleft())
            out += self.core.step()
            for message in out:
                events.deliver(0, message)
            await asyncio.sleep(0)  # let the front dispatch and relay between steps

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
