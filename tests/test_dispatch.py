"""The front's dispatcher (server/frontend.py) in-process, over a recording fake engine.

The fake implements the EngineClient protocol (worker/channel/client.py): it records
every message the front sends, and the test plays the workers' side by delivering
Ready and Status events through the EngineEvents it got in `start`. Nothing runs a
model; each test is one `asyncio.run`.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from server.config import ServerConfig
from server.frontend import Frontend
from server.requests import RequestState
from server.validation import ValidatedRequest
from worker.channel.client import EngineEvents
from worker.channel.messages import Add, Cancel, Message, Ready, Status
from worker.channel.types import FinishReason, Priority, SamplingParams, TokenRecord

HIGH, NORMAL, LOW = Priority.HIGH, Priority.NORMAL, Priority.LOW
BLOCK = 16


@dataclass
class FakeEngine:
    """An EngineClient that sends nowhere: it records what the front sends."""

    tokenizer: Tokenizer | None = None  # sent in Ready, as a worker does
    num_workers: int = 1
    restarts: int = 0
    events: EngineEvents | None = None
    sent: list[tuple[int, Message]] = field(default_factory=list)
    gone: set[int] = field(default_factory=set)  # send() to these answers False
    shut_down: bool = False

    def start(self, events: EngineEvents) -> None:
        self.events = events

    def send(self, worker: int, message: Message) -> bool:
        if worker in self.gone:
            return False
        self.sent.append((worker, message))
        return True

    async def shutdown(self) -> None:
        self.shut_down = True

    # -- the workers' side, played by the test -------------------------------------------
    def ready(self, worker: int, max_batch_size: int = 8, kv_blocks: int = 64) -> None:
        assert self.events is not None
        assert self.tokenizer is not None
        tokenizer = zlib.compress(self.tokenizer.to_str().encode())
        ready = Ready(
            1000 + worker,
            max_batch_size,
            kv_blocks,
            BLOCK,
            2048,
            512,
            (0,),
            "cpu",
            "m",
            "llama",
            tokenizer,
            "",
            "",
            "",
        )
        self.events.ready(worker, ready)

    def status(
        self,
        worker: int,
        *,
        running: int = 0,
        waiting: int = 0,
        max_batch_size: int = 8,
        kv_free_tokens: int = 1024,
        adds_received: int = 0,
        add_tokens_received: int = 0,
    ) -> None:
        assert self.events is not None
        status = Status(
            running=running,
            waiting=waiting,
            max_batch_size=max_batch_size,
            kv_blocks_used=0,
            kv_blocks_total=64,
            kv_free_tokens=kv_free_tokens,
            total_tokens=0,
            preemptions=0,
            adds_received=adds_received,
            add_tokens_received=add_tokens_received,
        )
        self.events.status(worker, status)

    def adds(self, worker: int | None = None) -> list[Add]:
        return [m for w, m in self.sent if isinstance(m, Add) and worker in (None, w)]

    def cancels(self) -> list[tuple[int, Cancel]]:
        return [(w, m) for w, m in self.sent if isinstance(m, Cancel)]


def run(
    tokenizer: Tokenizer,
    test: Callable[[Frontend, FakeEngine], Awaitable[None]],
    workers: int = 1,
) -> None:
    """Start a Frontend over a FakeEngine whose `workers` are ready, run `test`, then drain."""

    async def main() -> None:
        engine = FakeEngine(tokenizer, num_workers=workers)
        config = ServerConfig(model="unused", batch_timeout_ms=0, drain_grace_s=0)
        front = Frontend(config, engine)
        front.start()
        for worker in range(workers):
            assert not front.serving  # SERVING only once every worker is ready
            engine.ready(worker)
        assert front.serving
        try:
            await test(front, engine)
        finally:
            await front.drain()
        assert engine.shut_down

    asyncio.run(asyncio.wait_for(main(), 30))


async def settle() -> None:
    """Let the dispatcher run until it has nothing more to do (no I/O here: a few turns)."""
    for _ in range(20):
        await asyncio.sleep(0)


def submit(
    front: Frontend, request_id: str, prompt_len: int = 10, priority: Priority = NORMAL
) -> RequestState:
    request = ValidatedRequest(request_id, [5] * prompt_len, SamplingParams(), priority)
    return front.submit(request)


def sent_ids(front: Frontend, adds: list[Add]) -> list[str]:
    """The request ids of the Adds, in the order they were sent."""
    return [front.registry.by_handle[a.handle].request_id for a in adds]


# -- credits --------------------------------------------------------------------------------
def test_credits_are_the_status_less_what_is_in_flight(toy_tokenizer: Tokenizer) -> None:
    async def test(front: Frontend, engine: FakeEngine) -> None:
        states = [submit(front, f"r{i}") for i in range(5)]
        await settle()
        assert engine.sent == []  # no Status yet: no credit

        engine.status(0, running=1, max_batch_size=4, kv_free_tokens=100)  # 3 free slots
        await settle()
        assert sent_ids(front, engine.adds(0)) == ["r0", "r1", "r2"]
        first = engine.adds(0)[0]
        assert first.prompt_ids == [5] * 10 and first.params == states[0].request.params
        assert first.priority == NORMAL and first.handle == states[0].handle
        assert front.workers[0].credits() == (0, 70)  # 3 requests and 30 tokens in flight
        assert len(front.queue) == 2

        # A Status that has not seen those Adds yet gives no new credit.
        engine.status(0, running=1, max_batch_size=4, kv_free_tokens=100)
        await settle()
        assert len(engine.adds()) == 3
        # One that has, with the worker full, neither.
        full = dict(max_batch_size=4, adds_received=3, add_tokens_received=30)
        engine.status(0, running=4, kv_free_tokens=70, **full)
        await settle()
        assert len(engine.adds()) == 3 and front.workers[0].credits() == (0, 70)
        # A request finished: one slot.
        engine.status(0, running=3, kv_free_tokens=80, **full)
        await settle()
        assert sent_ids(front, engine.adds(0)) == ["r0", "r1", "r2", "r3"]
        assert front.workers[0].credits() == (0, 70)
        assert [s.request_id for s in states if s.worker is None] == ["r4"]

    run(toy_tokenizer, test)


def test_a_prompt_over_the_kv_credit_waits_and_holds_the_line(toy_tokenizer: Tokenizer) -> None:
    async def test(front: Frontend, engine: FakeEngine) -> None:
        for name, length in (("a", 10), ("b", 10), ("c", 10), ("d", 4)):
            submit(front, name, prompt_len=length)
        engine.status(0, kv_free_tokens=25)  # 8 free slots, but KV for 25 tokens
        await settle()
        # c needs 10 tokens, 5 are left; d would fit, but does not pass the head.
        assert sent_ids(front, engine.adds()) == ["a", "b"]
        assert len(front.queue) == 2
        engine.status(0, running=2, kv_free_tokens=14, adds_received=2, add_tokens_received=20)
        await settle()
        assert sent_ids(front, engine.adds()) == ["a", "b", "c", "d"]

    run(toy_tokenizer, test)


def test_a_high_priority_request_submitted_later_goes_first(toy_tokenizer: Tokenizer) -> None:
    async def test(front: Frontend, engine: FakeEngine) -> None:
        submit(front, "n1")
        submit(front, "low", priority=LOW)
        submit(front, "n2")
        submit(front, "high", priority=HIGH)
        engine.status(0, max_batch_size=1)  # one slot
        await settle()
        assert sent_ids(front, engine.adds()) == ["high"]
        engine.status(0, max_batch_size=8, adds_received=1, add_tokens_received=10)
        await settle()
        assert sent_ids(front, engine.adds()) == ["high", "n1", "n2", "low"]

    run(toy_tokenizer, test)


def test_the_worker_with_the_most_free_slots_is_chosen(toy_tokenizer: Tokenizer) -> None:
    async def test(front: Frontend, engine: FakeEngine) -> None:
        engine.status(0, running=6)  # 2 free slots
        engine.status(1, running=5)  # 3 free slots
        submit(front, "first")
        await settle()
        assert [w for w, _ in engine.sent] == [1]
        for i in range(5):
            submit(front, f"more{i}")
        await settle()
        assert (len(engine.adds(0)), len(engine.adds(1))) == (2, 3)  # spread, up to the credit
        assert len(front.queue) == 1

    run(toy_tokenizer, test, workers=2)


def test_a_worker_without_the_kv_credit_is_passed_over(toy_tokenizer: Tokenizer) -> None:
    async def test(front: Frontend, engine: FakeEngine) -> None:
        engine.status(0, running=7, kv_free_tokens=100)  # 1 free slot, room for the prompt
        engine.status(1, running=0, kv_free_tokens=5)  # 8 free slots, no room
        submit(front, "r", prompt_len=10)
        await settle()
        assert [w for w, _ in engine.sent] == [0]

    run(toy_tokenizer, test, workers=2)


# -- failures and cancellation ---------------------------------------------------------------
def test_a_dead_workers_requests_go_back_first_and_resume_from_their_tokens(
    toy_tokenizer: Tokenizer,
) -> None:
    async def test(front: Frontend, engine: FakeEngine) -> None:
        engine.status(0, max_batch_size=2)
        engine.status(1, max_batch_size=2)
        states = {name: submit(front, name) for name in ("a", "b", "c", "d", "e", "f")}
        await settle()
        on_0 = [s for s in states.values() if s.worker == 0]
        on_1 = [s for s in states.values() if s.worker == 1]
        queued = [s for s in states.values() if s.worker is None]
        assert len(on_0) == len(on_1) == 2 and len(front.queue) == 2
        assert engine.events is not None
        for n, state in enumerate(on_0):  # 1 and 2 tokens so far
            records = [TokenRecord(state.handle, 7 + i, i, FinishReason.NONE) for i in range(n + 1)]
            engine.events.tokens(0, records)

        # Worker 0 reports room for two more, and dies before the dispatcher runs again.
        engine.status(0, running=2, max_batch_size=4, adds_received=2, add_tokens_received=20)
        engine.events.died(0, "worker 0 died (exit code -9)")
        await settle()
        assert len(engine.adds(0)) == 2  # nothing more went to it
        assert not any(s.finished for s in states.values()) and front.serving  # worker 1 is up
        assert [s.resumptions for s in on_0] == [1, 1] and len(front.queue) == 4
        assert [s.worker for s in on_0] == [None, None]

        # Worker 1 finishes one: the first resumed request goes there, with its tokens.
        engine.status(1, running=1, max_batch_size=2, adds_received=2, add_tokens_received=20)
        await settle()
        assert [s.worker for s in on_0] == [1, None] and len(engine.adds(1)) == 3
        assert engine.adds(1)[-1].generated == [7] and engine.adds(1)[-1].num_tokens == 11
        # Its replacement comes up and takes the next ones, resumed first, in arrival order.
        engine.ready(0)
        engine.status(0, max_batch_size=2)
        await settle()
        assert [s.worker for s in on_0] == [1, 0] and [s.worker for s in queued] == [0, None]
        assert engine.adds(0)[-2].generated == [7, 8] and engine.adds(0)[-1].generated == []

    run(toy_tokenizer, test, workers=2)


def test_an_add_the_transport_refuses_fails_its_request(toy_tokenizer: Tokenizer) -> None:
    async def test(front: Frontend, engine: FakeEngine) -> None:
        engine.gone.add(0)  # the worker is gone; its death has not been reported yet
        engine.status(0)
        state = submit(front, "r")
        await settle()
        assert state.finished and state.finish_reason == FinishReason.CANCELLED
        assert state.error is not None and state.error.code == "UNAVAILABLE"
        assert "worker 0" in str(state.error) and len(front.queue) == 0

    run(toy_tokenizer, test)


def test_cancel_of_a_queued_request_never_reaches_the_engine(toy_tokenizer: Tokenizer) -> None:
    async def test(front: Frontend, engine: FakeEngine) -> None:
        engine.status(0, max_batch_size=1)
        running, queued = submit(front, "running"), submit(front, "queued")
        await settle()
        assert sent_ids(front, engine.adds()) == ["running"]

        assert front.cancel("queued") is True
        assert queued.finished and queued.finish_reason == FinishReason.CANCELLED
        assert queued.error is None and len(front.queue) == 0
        engine.status(0, max_batch_size=2, adds_received=1, add_tokens_received=10)  # room now
        await settle()
        assert [m for _, m in engine.sent if getattr(m, "handle", None) == queued.handle] == []

        assert front.cancel("running") is True
        assert engine.cancels() == [(0, Cancel(running.handle))]
        assert running.finished and running.finish_reason == FinishReason.CANCELLED
        assert front.cancel("running") is False  # already finished: nothing more is sent
        assert len(engine.cancels()) == 1
        assert not front.registry.live  # both retired at once

    run(toy_tokenizer, test)
