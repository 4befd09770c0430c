"""The worker channel's message decoder on random and mutated bytes (hypothesis).

`worker.channel.messages.decode` reads frames from shared memory that the other process
wrote. On any bytes it must either return a message or raise one of DECODE_ERRORS, at once:
no other exception kind, no hang, and no allocation sized by a count read from the bytes
(a u32 count of 2**32-1 must not ask for 16 GiB). Valid messages round-trip exactly.

Acceptable: ValueError (a bad enum value, bad UTF-8 in a str, a list whose byte length is
not a multiple of its item size), struct.error (a field past the end), IndexError (an
empty frame, an unknown kind byte, an enum byte past the end).
"""

from __future__ import annotations

import resource
import struct
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.channel.messages import (
    MESSAGES,
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
from worker.channel.types import FinishReason, Priority, SamplingParams, TokenLogprob, TokenRecord

DECODE_ERRORS = (ValueError, struct.error, IndexError)
SETTINGS = settings(
    derandomize=True,  # the suite replays fixed examples (CI never flakes); scripts explore
    max_examples=3000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)
I64 = st.integers(-(2**63), 2**63 - 1)
FLOAT = st.floats(allow_nan=False)  # NaN != NaN: round trips compared with == below
TEXT = st.text(max_size=20)
PARAMS = st.builds(
    SamplingParams,
    max_new_tokens=U64,
    temperature=FLOAT,
    top_k=U64,
    top_p=FLOAT,
    min_p=FLOAT,
    seed=U64,
    stop_token_ids=st.lists(U32, max_size=5).map(tuple),
    ignore_eos=st.booleans(),
    repetition_penalty=FLOAT,
    frequency_penalty=FLOAT,
    presence_penalty=FLOAT,
    logprobs=st.booleans(),
    top_logprobs=U64,
)
F32 = st.floats(allow_nan=False, width=32)  # logprobs travel as float32
TOP = st.lists(st.tuples(U32, F32), max_size=21).map(tuple)


@st.composite
def records(draw: st.DrawFn) -> TokenRecord:
    """A record, with a logprob (for its own token id) or not."""
    record = TokenRecord(draw(U64), draw(I64), draw(U32), draw(st.sampled_from(FinishReason)))
    if draw(st.booleans()):
        record = replace(record, logprob=TokenLogprob(record.token_id, draw(F32), draw(TOP)))
    return record


RECORD = records()
MESSAGE_VALUES = st.one_of(
    st.builds(
        Add,
        handle=U64,
        prompt_ids=st.lists(U32, max_size=10),
        params=PARAMS,
        priority=st.sampled_from(Priority),
        generated=st.lists(U32, max_size=5),
    ),
    st.builds(Cancel, handle=U64),
    st.just(Shutdown()),
    st.builds(
        Ready,
        pid=U64,
        max_batch_size=U64,
        kv_blocks_total=U64,
        block_size=U64,
        max_seq_len=U64,
        vocab_size=U64,
        eos_token_ids=st.lists(U32, max_size=3).map(tuple),
        device=TEXT,
        model_name=TEXT,
        architecture=TEXT,
        tokenizer_zlib=st.binary(max_size=40),
        chat_template=TEXT,
        bos_token=TEXT,
        eos_token=TEXT,
    ),
    st.builds(Status, *[U64] * 10),
    st.builds(Tokens, records=st.lists(RECORD, max_size=6)),
    st.builds(Rejected, handle=U64, message=TEXT),
)


def decode_or_clean_error(data: bytes) -> object | None:
    """The message, or None for an acceptable error; any other exception propagates."""
    try:
        return decode(data)
    except DECODE_ERRORS:
        return None


@pytest.fixture(autouse=True, scope="module")
def bounded_memory():
    """A decode that allocates by a count read from the bytes fails fast (MemoryError)
    instead of swapping: 2 GiB more address space than the test process has now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as status:
        vm = next(int(line.split()[1]) for line in status if line.startswith("VmSize:")) * 1024
    limit = vm + (2 << 30)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@SETTINGS
@given(message=MESSAGE_VALUES)
def test_valid_messages_round_trip(message) -> None:
    assert decode(encode(message)) == message
    assert decode(memoryview(encode(message))) == message


@SETTINGS
@given(data=st.binary(max_size=200))
def test_random_bytes(data: bytes) -> None:
    decode_or_clean_error(data)


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    data = bytearray(encode(draw(MESSAGE_VALUES)))
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "insert", "delete", "cut", "count"]))
        at = draw(st.integers(0, len(data)))
        if how == "flip" and data:
            data[min(at, len(data) - 1)] ^= draw(st.integers(1, 255))
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif how == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif how == "cut":
            del data[at:]
        else:  # a huge or odd u32 written anywhere (where a count may be)
            value = draw(st.sampled_from([2**32 - 1, 2**31, 2**30, 2**20, 1, 0]))
            data[at : at + 4] = struct.pack("<I", value)
    return bytes(data)


@SETTINGS
@given(data=mutated_frames())
def test_mutated_frames(data: bytes) -> None:
    decode_or_clean_error(data)


@pytest.mark.parametrize("kind", range(len(MESSAGES)))
@pytest.mark.parametrize("count", [2**32 - 1, 2**31, 2**28])
def test_huge_counts_in_short_frames(kind: int, count: int) -> None:
    """A count (or string length) of up to 4G in a frame of a few bytes: no big allocation."""
    for prefix in range(0, 120, 1):
        data = bytes([kind]) + b"\x01" * prefix + struct.pack("<I", count) + b"\x02" * 16
        decode_or_clean_error(data)


def test_a_count_past_the_end_of_the_frame_is_an_error() -> None:
    frame = encode(Cancel(handle=1))[:1] + struct.pack("<Q", 1)  # Cancel, handle 1: fine
    assert decode(frame) == Cancel(1)
    # Tokens with a count of 2 but one record: must not decode as one record.
    one = TokenRecord(1, 5, 0, FinishReason.NONE)
    whole = encode(Tokens(records=[one]))
    short = whole[:1] + struct.pack("<I", 2) + whole[5:]
    with pytest.raises(DECODE_ERRORS):
        decode(short)
