"""server/memory.py: freed memory goes back to the OS after big requests.

glibc keeps what a thread frees in that thread's arena; `trim` must give it back, and
the gRPC edge must ask for it after each request message of TRIM_AFTER_BYTES or more
(their receive buffers are gRPC's threads' allocations). The end-to-end figures are in
docs/reliability.md; test_grpc_fuzz.py bounds the front's RSS over the whole fuzz.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from server import memory, servicer
from server.servicer import MalformedRequest
from shoal.v1 import inference_pb2 as pb


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(memory._MALLOC_TRIM is None, reason="no malloc_trim (not glibc)")
def test_trim_gives_back_what_another_thread_freed() -> None:
    kept: list[bytearray] = []

    def churn() -> None:  # ~96 MB of blocks under the mmap threshold: this thread's arena
        blocks = [bytearray(48_000) for _ in range(2000)]
        kept.append(blocks[-1])  # the heap's top stays in use, so nothing is given back alone
        del blocks

    before = rss_kb()
    worker = threading.Thread(target=churn)
    worker.start()
    worker.join()
    freed_but_held = rss_kb()
    memory.trim()
    trimmed = rss_kb()
    assert freed_but_held - before > 48_000, (before, freed_but_held)  # the premise
    assert freed_but_held - trimmed > 48_000, (freed_but_held, trimmed)


def test_big_request_messages_are_followed_by_a_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []
    monkeypatch.setattr(servicer, "trim_soon", lambda: asked.append(1))
    deserialize = servicer.request_deserializer(pb.GenerateRequest)

    small = pb.GenerateRequest(prompt="x" * 1000, max_new_tokens=1).SerializeToString()
    assert isinstance(deserialize(small), pb.GenerateRequest) and asked == []
    big = pb.GenerateRequest(prompt="x" * memory.TRIM_AFTER_BYTES).SerializeToString()
    assert isinstance(deserialize(big), pb.GenerateRequest) and asked == [1]
    too_big = pb.GenerateRequest(prompt="x" * (servicer.MAX_REQUEST_BYTES + 1))
    assert isinstance(deserialize(too_big.SerializeToString()), MalformedRequest)
    assert asked == [1, 1]  # refused for its size, and its buffers given back all the same


def test_trim_soon_runs_on_the_next_turn_and_again_later(monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[str] = []
    monkeypatch.setattr(memory, "trim", lambda: trims.append("trim"))

    memory.trim_soon()  # no event loop: at once
    assert trims == ["trim"]

    async def on_a_loop() -> None:
        memory.trim_soon()
        trims.append("caller went on")
        await asyncio.sleep(0)
        trims.append("next turn")
        await asyncio.sleep(memory.TRIM_AGAIN_S + 0.2)

    asyncio.run(on_a_loop())
    assert trims == ["trim", "caller went on", "trim", "next turn", "trim"]
