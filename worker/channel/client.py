"""The engine-client interface: how a front drives engines, whatever the transport.

Two transports implement `EngineClient` (vLLM v1's engine-core client split):

- `server/worker_pool.py`: worker processes over shared-memory rings (the server);
- `worker/inprocess.py`: one engine in the calling process (`python -m worker.batch`).

The front sends Add, Cancel and Shutdown with `send`, in order and without
blocking, and learns everything else through `EngineEvents`, called on the
event loop: each worker's Ready, its Status after every step, token records,
rejections, and its death.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from worker.channel.messages import Message, Ready, Rejected, Status, Tokens
from worker.channel.types import TokenRecord


@dataclass(frozen=True)
class EngineEvents:
    ready: Callable[[int, Ready], None]
    status: Callable[[int, Status], None]
    tokens: Callable[[int, list[TokenRecord]], None]
    rejected: Callable[[int, Rejected], None]
    died: Callable[[int, str], None]

    def deliver(self, worker: int, message: Message) -> None:
        """Route one message a worker sent to its callback."""
        match message:
            case Tokens(records):
                self.tokens(worker, records)
            case Status():
                self.status(worker, message)
            case Ready():
                self.ready(worker, message)
            case Rejected():
                self.rejected(worker, message)
            case _:
                raise TypeError(f"a worker does not send {type(message).__name__}")


class EngineClient(Protocol):
    num_workers: int
    restarts: int  # workers started again after dying

    def start(self, events: EngineEvents) -> None:
        """Start the engines (needs a running event loop); events arrive from then on."""

    def send(self, worker: int, message: Message) -> bool:
        """Queue a message for a worker, delivered in order; False if that worker is gone."""

    async def shutdown(self) -> None:
        """Stop every engine and release what the transport holds."""
