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
    Tokens,
    decode,
    encode,
)
from worker.channel.ring import Doorbell, Ring, segment_name, sweep_stale_segments
from worker.channel.types import FinishReason, Priority, SamplingParams, TokenLogprob, TokenRecord

CAPACITY = 16384


def echo_child(in_name: str, out_name: str, in_fd: int, out_fd: int, count: int) -> None:
    """Read `count` messages and send each back reversed, through a real process boundary."""
    inbox, outbox = Ring.attach(in_name), Ring.attach(out_name)
    in_bell, out_bell = Doorbell(read_fd=in_fd), Doorbell(write_fd=out_fd)
    seen = 0
    while seen < count:
        for message in inbox.read_messages():
            seen += 1
            while not outbox.try_write(message[::-1]):
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


def test_round_trip_across_processes_with_wraparound_full_ring_and_big_messages(rings) -> None:
    inbox, outbox = rings
    in_bell, out_bell = Doorbell.create(), Doorbell.create()
    # 300 messages of 1..9000 bytes through a 16 KiB ring: it wraps many times (payloads
    # split across its end), fills up (the writer must wait), and nothing is lost.
    messages = [os.urandom(1 + (i * 7919) % 9000) for i in range(300)]
    ctx = mp.get_context("fork")  # the child inherits the doorbell pipes
    args = (inbox.shm.name, outbox.shm.name, in_bell.read_fd, out_bell.write_fd, len(messages))
    child = ctx.Process(target=echo_child, args=args)
    child.start()
    received: list[bytes] = []
    pending = list(messages)
    full_waits = 0
    while len(received) < len(messages):
        while pending and inbox.try_write(pending[0]):
            pending.pop(0)
        if pending:
            full_waits += 1
        in_bell.ring()
        received += list(outbox.read_messages())
        out_bell.wait(0.01)
    child.join(timeout=30)
    in_bell.close()
    out_bell.close()
    assert child.exitcode == 0
    assert received == [m[::-1] for m in messages]
    assert full_waits > 0  # back-pressure really happened
    # ... and the ring wrapped many times: every message went through it as a record of an
    # 8-byte length and the payload padded to 8 bytes (the layout in worker/channel/ring.py).
    assert sum(8 + -(-len(m) // 8) * 8 for m in messages) > 50 * CAPACITY


def test_message_codec_round_trips() -> None:
    params = SamplingParams(
        max_new_tokens=7,
        temperature=0.5,
        top_k=3,
        top_p=0.25,
        min_p=0.125,
        seed=2**64 - 1,
        stop_token_ids=(4, 5),
        ignore_eos=True,
        repetition_penalty=1.3,
        frequency_penalty=-0.5,
        presence_penalty=2.0,
        logprobs=True,
        top_logprobs=20,
    )
    logprob = TokenLogprob(5, -0.25, tuple((i, -1.5 - i) for i in range(20)))
    messages = [
        Add(9, list(range(70_000)), params, Priority.LOW, generated=[1, 2, 3]),
        Cancel(2**63),
        Shutdown(),
        Ready(
            123,
            32,
            4096,
            16,
            2048,
            49152,
            (0, 2),
            "cpu (numpy)",
            "smol",
            "llama",
            bytes(range(256)) * 3,
            "{{ bos_token }}{% for m in messages %}…{% endfor %}",
            "<s>",
            "</s>",
        ),
        Tokens(
            [
                TokenRecord(1, 5, 0, FinishReason.NONE, cached_prompt_tokens=48),
                TokenRecord(2, -1, 9, FinishReason.CANCELLED),
            ]
        ),
        Tokens(  # logprobs on some records only, with and without alternatives
            [
                TokenRecord(1, 5, 3, FinishReason.NONE, logprob),
                TokenRecord(2, 7, 0, FinishReason.NONE),
                TokenRecord(3, 9, 1, FinishReason.EOS, TokenLogprob(9, -3.0), 32),
                TokenRecord(4, -1, 9, FinishReason.CANCELLED),
            ]
        ),
        Status(3, 29, 32, 10, 4096, 12345, 2**40, 2, 77, 9999, 17, 2**33, 2**32 + 5),
        Rejected(5, "prompt_token_ids: token id 9 is outside [0, 8) — ünïcode"),
    ]
    for message in messages:
        assert decode(encode(message)) == message
    # A record of a request that did not ask pays one byte; one with 20 alternatives 164 more.
    plain = len(encode(Tokens([TokenRecord(1, 5, 0)])))
    assert plain == 1 + 4 + 26  # kind, count, one record
    assert len(encode(Tokens([TokenRecord(1, 5, 3, FinishReason.NONE, logprob)]))) == plain + 164


def test_a_message_is_published_whole_or_not_at_all(rings) -> None:
    ring = rings[0]
    message = encode(Add(1, list(range(3000)), SamplingParams()))  # 12 KB of a 16 KiB ring
    filler = b"x" * 8000
    assert ring.try_write(filler)
    assert not ring.try_write(message)  # does not fit now: nothing of it is visible
    assert list(ring.read_messages()) == [filler]
    assert ring.try_write(message)  # now it wraps around the end of the ring
    assert [decode(m) for m in ring.read_messages()] == [decode(message)]
    with pytest.raises(ValueError, match="exceeds the ring"):
        ring.try_write(bytes(CAPACITY))


def test_full_ring_refuses_without_corrupting(rings) -> None:
    ring = rings[0]
    written = 0
    while ring.try_write(bytes([written % 256]) * 1000):
        written += 1
    assert written == CAPACITY // 1008
    assert [m[0] for m in ring.read_messages()] == [i % 256 for i in range(written)]
    assert ring.try_write(b"again")


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
