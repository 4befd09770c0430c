"""Messages on the worker channel and their fixed binary layout (struct, never pickle).

Requests are named on the channel by a `handle` (u64) that the front assigns,
so every record has a fixed size; the front maps handles to request ids.

front -> worker: Add, Cancel, Shutdown
worker -> front: Ready, Tokens, Status, Rejected
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

from worker.sequence import FinishReason, Priority, SamplingParams


class Kind(IntEnum):
    ADD = 1
    CANCEL = 2
    SHUTDOWN = 3
    READY = 10
    TOKENS = 11
    STATUS = 12
    REJECTED = 13


@dataclass(frozen=True)
class Add:
    handle: int
    prompt_ids: list[int]
    params: SamplingParams
    priority: Priority = Priority.NORMAL
    generated: list[int] = field(default_factory=list)  # tokens produced elsewhere already


@dataclass(frozen=True)
class Cancel:
    handle: int


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class Ready:
    """The worker loaded its model; also tells the front what the model accepts."""

    pid: int
    max_batch_size: int
    kv_blocks_total: int
    block_size: int
    max_seq_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    device: str
    model_name: str
    architecture: str


@dataclass(frozen=True)
class TokenRecord:
    handle: int
    token_id: int  # -1 on a cancellation record
    index: int  # position in the completion
    finish_reason: FinishReason


@dataclass(frozen=True)
class Tokens:
    records: list[TokenRecord]


@dataclass(frozen=True)
class Status:
    active_sequences: int
    free_slots: int
    waiting: int  # requests in the worker not yet running (KV space) or preempted
    kv_blocks_used: int
    kv_blocks_total: int
    total_tokens: int
    preemptions: int


@dataclass(frozen=True)
class Rejected:
    handle: int
    message: str


Message = Add | Cancel | Shutdown | Ready | Tokens | Status | Rejected

_KIND = struct.Struct("<B")
# handle, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos, priority,
# n_stop_ids, n_prompt, n_generated
_ADD = struct.Struct("<QIfIfQBBIII")
_HANDLE = struct.Struct("<Q")
_READY = struct.Struct("<QIIIIII")  # ..., vocab_size, n_eos
_RECORD = struct.Struct("<QiIB")
_STATUS = struct.Struct("<IIIIIQQ")


def _ids(values: list[int] | tuple[int, ...]) -> bytes:
    return struct.pack(f"<{len(values)}I", *values)


def encode(message: Message) -> bytes:
    match message:
        case Add(handle, prompt, p, priority, generated):
            head = _ADD.pack(
                handle,
                p.max_new_tokens,
                p.temperature,
                p.top_k,
                p.top_p,
                p.seed,
                p.ignore_eos,
                priority,
                len(p.stop_token_ids),
                len(prompt),
                len(generated),
            )
            return b"".join(
                [_KIND.pack(Kind.ADD), head, _ids(p.stop_token_ids), _ids(prompt), _ids(generated)]
            )
        case Cancel(handle):
            return _KIND.pack(Kind.CANCEL) + _HANDLE.pack(handle)
        case Shutdown():
            return _KIND.pack(Kind.SHUTDOWN)
        case Ready():
            m = message
            fixed = _READY.pack(
                m.pid,
                m.max_batch_size,
                m.kv_blocks_total,
                m.block_size,
                m.max_seq_len,
                m.vocab_size,
                len(m.eos_token_ids),
            )
            texts = b"\x00".join(t.encode() for t in (m.device, m.model_name, m.architecture))
            return _KIND.pack(Kind.READY) + fixed + _ids(m.eos_token_ids) + texts
        case Tokens(records):
            body = b"".join(
                _RECORD.pack(r.handle, r.token_id, r.index, r.finish_reason) for r in records
            )
            return _KIND.pack(Kind.TOKENS) + body
        case Status():
            fields = (
                message.active_sequences,
                message.free_slots,
                message.waiting,
                message.kv_blocks_used,
                message.kv_blocks_total,
                message.total_tokens,
                message.preemptions,
            )
            return _KIND.pack(Kind.STATUS) + _STATUS.pack(*fields)
        case Rejected(handle, text):
            return _KIND.pack(Kind.REJECTED) + _HANDLE.pack(handle) + text.encode()
    raise TypeError(f"not a channel message: {message!r}")


def _take_ids(data: bytes, offset: int, count: int) -> tuple[list[int], int]:
    end = offset + 4 * count
    return list(struct.unpack_from(f"<{count}I", data, offset)), end


def decode(data: bytes) -> Message:
    kind, body = Kind(data[0]), 1
    if kind == Kind.ADD:
        (
            handle,
            max_new,
            temp,
            top_k,
            top_p,
            seed,
            ignore_eos,
            priority,
            n_stop,
            n_prompt,
            n_gen,
        ) = _ADD.unpack_from(data, body)
        offset = body + _ADD.size
        stop, offset = _take_ids(data, offset, n_stop)
        prompt, offset = _take_ids(data, offset, n_prompt)
        generated, offset = _take_ids(data, offset, n_gen)
        params = SamplingParams(
            max_new_tokens=max_new,
            temperature=temp,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop_token_ids=tuple(stop),
            ignore_eos=bool(ignore_eos),
        )
        return Add(handle, prompt, params, Priority(priority), generated)
    if kind == Kind.CANCEL:
        return Cancel(_HANDLE.unpack_from(data, body)[0])
    if kind == Kind.SHUTDOWN:
        return Shutdown()
    if kind == Kind.READY:
        *fields, n_eos = _READY.unpack_from(data, body)
        eos, offset = _take_ids(data, body + _READY.size, n_eos)
        device, name, arch = data[offset:].decode().split("\x00")
        return Ready(*fields, tuple(eos), device, name, arch)
    if kind == Kind.TOKENS:
        return Tokens(
            [
                TokenRecord(h, t, i, FinishReason(f))
                for h, t, i, f in _RECORD.iter_unpack(data[body:])
            ]
        )
    if kind == Kind.STATUS:
        return Status(*_STATUS.unpack_from(data, body))
    handle = _HANDLE.unpack_from(data, body)[0]
    return Rejected(handle, data[body + _HANDLE.size :].decode())
