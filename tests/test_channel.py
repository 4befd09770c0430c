"""The shared-memory channel with real processes: wrap-around, a full ring, big messages."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest

from worker.channel.messages import (
    Add,
    Cancel,
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
from worker.sequence import FinishReason, Priority, SamplingParams

CAPACITY = 4096


def echo_child(
    in_name: str, out_name: str, in_bell: Doorbell, out_bell: Doorbell, count: int
) -> None:
    """Read `count` messages and send each back reversed, through a real process boundary."""
    inbox, outbox = Ring.attach(in_name), Ring.attach(out_name)
    seen = 0
    while seen < count:
        for message in inbox.read_messages():
            seen += 1
            for payload, flags in outbox.frames_of(message[::-1]):
                while not outbox.try_write_frame(payload, flags):
                    out_bell.ring()
                    in_bell.wait(0.001)
            out_bell.ring()
        if seen < count:
            in_bell.wait(1.0)
    inbox.close()
    outbox.close()


@pytest.fixture
def rings():
    made = [
        Ring.create(segment_name(0, "in"), CAPACITY),
        Ring.create(segment_name(0, "out"), CAPACITY),
    ]
    yield made
    for ring in made:
        ring.close()
        ring.unlink()


def bell() -> Doorbell:
    return Doorbell.create()


def test_round_trip_across_processes_with_wraparound_full_ring_and_big_messages(rings) -> None:
    inbox, outbox = rings
    in_bell, out_bell = bell(), bell()
    # 300 messages of 1..9000 bytes through a 4 KiB ring: it wraps many times, fills up
    # (the writer must wait), and the largest messages span several frames.
    messages = [os.urandom(1 + (i * 7919) % 9000) for i in range(300)]
    ctx = mp.get_context("spawn")
    child = ctx.Process(
        target=echo_child, args=(inbox.shm.name, outbox.shm.name, in_bell, out_bell, len(messages))
    )
    child.start()
    received: list[bytes] = []
    pending = [f for m in messages for f in inbox.frames_of(m)]
    full_waits = 0
    while len(received) < len(messages):
        while pending and inbox.try_write_frame(*pending[0]):
            pending.pop(0)
        if pending:
            full_waits += 1
        in_bell.ring()
        received += list(outbox.read_messages())
        out_bell.wait(0.01)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert received == [m[::-1] for m in messages]
    assert full_waits > 0  # back-pressure really happened
    assert inbox._counters[8] > 50 * CAPACITY  # ... and the ring wrapped many times


def test_message_codec_round_trips() -> None:
    params = SamplingParams(
        max_new_tokens=7,
        temperature=0.5,
        top_k=3,
        top_p=0.25,
        seed=2**64 - 1,
        stop_token_ids=(4, 5),
        ignore_eos=True,
    )
    messages = [
        Add(9, list(range(70_000)), params, Priority.LOW, generated=[1, 2, 3]),
        Cancel(2**63),
        Shutdown(),
        Ready(123, 32, 4096, 16, 2048, 49152, (0, 2), "cpu (numpy)", "smol", "llama"),
        Tokens(
            [TokenRecord(1, 5, 0, FinishReason.NONE), TokenRecord(2, -1, 9, FinishReason.CANCELLED)]
        ),
        Status(3, 29, 1, 10, 4096, 12345, 2),
        Rejected(5, "prompt_token_ids: token id 9 is outside [0, 8) — ünïcode"),
    ]
    for message in messages:
        assert decode(encode(message)) == message


def test_big_message_crosses_a_small_ring_in_frames(rings) -> None:
    ring = rings[0]
    message = encode(Add(1, list(range(5000)), SamplingParams()))  # 20 KB through a 4 KiB ring
    frames = ring.frames_of(message)
    assert len(frames) > 4
    got: list[bytes] = []
    for frame in frames:
        assert ring.try_write_frame(*frame)
        got += ring.read_messages()
    assert [decode(m) for m in got] == [decode(message)]


def test_full_ring_refuses_without_corrupting(rings) -> None:
    ring = rings[0]
    written = 0
    while ring.try_write_frame(bytes([written % 256]) * 1000):
        written += 1
    assert written == CAPACITY // 1008
    assert [m[0] for m in ring.read_messages()] == [i % 256 for i in range(written)]
    assert ring.try_write_frame(b"again")


def test_sweep_removes_segments_of_dead_processes(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    dead = ctx.Process(target=os.getpid)
    dead.start()
    dead.join()
    stale = tmp_path / f"shoal-{dead.pid}-abcd1234-w0-in"
    live = tmp_path / f"shoal-{os.getpid()}-abcd1234-w0-in"
    stale.touch()
    live.touch()
    assert sweep_stale_segments(tmp_path) == [stale.name]
    assert live.exists() and not stale.exists()
