"""Messages on the worker channel, and their binary codec (never pickle).

front -> worker: Add, Cancel, Shutdown
worker -> front: Ready, Status, Tokens, Rejected

A request is named on the channel, and inside the worker, by an integer
`handle` the front assigns; the front maps handles to request ids.

The codec is derived from the dataclass fields, in declaration order:
`int` is a little-endian u64, `float` an f64, `bool` one byte, an enum one
byte, `str` a u32 byte length then UTF-8, `bytes` a u32 length then the
bytes, `list[int]` / `tuple[int, ...]` a
u32 count then u32 values, a nested dataclass its own fields in turn, and
`list[TokenRecord]` a u32 count, fixed 26-byte records, then the logprobs of
the records that carry them. A message is one kind byte (its position in
MESSAGES) followed by its fields.

A record's last byte counts its logprob entries: 0 for none (a request that did
not ask pays one byte), else 1 + len(top); those records' logprobs follow all
the records, in order, each an f32 logprob then len(top) (u32 id, f32 logprob)
pairs. The byte bounds a record to 255 entries (requests ask for at most 21),
so a Tokens frame stays under ~2 KiB per record.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass, field, fields, is_dataclass
from functools import cache
from typing import Any

from worker.channel.types import FinishReason, Priority, SamplingParams, TokenLogprob, TokenRecord


@dataclass(frozen=True)
class Add:
    handle: int
    prompt_ids: list[int]
    params: SamplingParams
    priority: Priority = Priority.NORMAL
    generated: list[int] = field(default_factory=list)  # tokens produced elsewhere already

    @property
    def num_tokens(self) -> int:
        """Tokens whose K/V the request needs at admission."""
        return len(self.prompt_ids) + len(self.generated)


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
    max_seq_len: int  # the model's context, capped by the engine config
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    device: str
    model_name: str
    architecture: str
    # The front tokenizes, detokenizes and renders chats with what the worker loaded:
    tokenizer_zlib: bytes  # the tokenizer's `tokenizers` JSON, zlib-compressed
    chat_template: str  # Jinja source; "" when the checkpoint has none
    bos_token: str  # special-token texts a chat template may use
    eos_token: str

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv_blocks_total * self.block_size

    @property
    def max_context(self) -> int:
        """Longest prompt + completion one request can have: the context, or the KV pool."""
        return min(self.max_seq_len, self.kv_capacity_tokens)


@dataclass(frozen=True)
class Status:
    """A worker's load after a step: the front's only source of capacity ("credits").

    `waiting` counts requests in the worker's admission queue, new or preempted.
    `kv_free_tokens` is what the KV pool can still take once the waiting
    requests are in (cached prefix blocks nobody holds count as free: they are
    evicted on demand). `adds_received` and `add_tokens_received` count every Add
    the worker has read (and their prompt tokens), so the front can subtract
    what is still in flight. The prefix cache counters are in tokens, over every
    admission since the worker started (recomputations after preemption too).
    """

    running: int
    waiting: int
    max_batch_size: int
    kv_blocks_used: int
    kv_blocks_total: int
    kv_free_tokens: int
    total_tokens: int  # generated since the worker started
    preemptions: int
    adds_received: int
    add_tokens_received: int
    # Speculative decoding, since the worker started: draft tokens verified, and accepted.
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    kv_blocks_cached: int = 0  # held by no sequence, kept for prefix cache hits
    prefix_cache_query_tokens: int = 0  # tokens looked up at admission
    prefix_cache_hit_tokens: int = 0  # of those, found cached (not computed again)

    @property
    def utilization(self) -> float:
        """running / max_batch_size, in [0, 1]."""
        return self.running / self.max_batch_size if self.max_batch_size else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prefix cache hit tokens / looked-up tokens, in [0, 1]; 0 before any lookup."""
        return hit_rate(self.prefix_cache_hit_tokens, self.prefix_cache_query_tokens)

    @property
    def free_slots(self) -> int:
        """Requests the worker could start now without queueing any."""
        return max(0, self.max_batch_size - self.running - self.waiting)


def hit_rate(hits: int, queries: int) -> float:
    return hits / queries if queries else 0.0


@dataclass(frozen=True)
class Tokens:
    records: list[TokenRecord]


@dataclass(frozen=True)
class Rejected:
    """An Add the worker can never run (the message names the field and the limit)."""

    handle: int
    message: str


Message = Add | Cancel | Shutdown | Ready | Status | Tokens | Rejected
MESSAGES: tuple[type, ...] = (Add, Cancel, Shutdown, Ready, Status, Tokens, Rejected)
_NESTED = {"SamplingParams": SamplingParams}
_ENUMS = {"Priority": Priority, "FinishReason": FinishReason}
_SCALARS = {"int": struct.Struct("<Q"), "float": struct.Struct("<d"), "bool": struct.Struct("<?")}
_BYTE, _COUNT = struct.Struct("<B"), struct.Struct("<I")
# handle, token_id, index, finish_reason, cached prompt tokens, logprob entries
_RECORD = struct.Struct("<QqIBIB")
_LOGPROB, _TOP = struct.Struct("<f"), struct.Struct("<If")  # a record's logprob; (id, logprob)
_ID_LISTS = ("list[int]", "tuple[int, ...]")


@cache
def _layout(cls: type) -> tuple[tuple[str, str], ...]:
    return tuple((f.name, str(f.type)) for f in fields(cls))


def encode(message: Message) -> bytes:
    out = [_BYTE.pack(MESSAGES.index(type(message)))]
    _write(message, out)
    return b"".join(out)


def decode(data: bytes | memoryview) -> Message:
    cls = MESSAGES[data[0]]
    message, _ = _read(cls, memoryview(data), 1)
    return message


def _write(obj: Any, out: list[bytes]) -> None:
    for name, kind in _layout(type(obj)):
        value = getattr(obj, name)
        if kind in _SCALARS:
            out.append(_SCALARS[kind].pack(value))
        elif kind in _ENUMS:
            out.append(_BYTE.pack(value))
        elif kind in ("str", "bytes"):
            raw = value.encode() if kind == "str" else value
            out += (_COUNT.pack(len(raw)), raw)
        elif kind in _ID_LISTS:
            out += (_COUNT.pack(len(value)), array("I", value).tobytes())
        elif kind == "list[TokenRecord]":
            _write_records(value, out)
        elif kind in _NESTED:
            _write(value, out)
        else:
            raise TypeError(f"{type(obj).__name__}.{name}: no wire codec for {kind}")


def _write_records(records: list[TokenRecord], out: list[bytes]) -> None:
    out.append(_COUNT.pack(len(records)))
    for r in records:
        entries = 0 if r.logprob is None else 1 + len(r.logprob.top)
        fields = (r.handle, r.token_id, r.index, r.finish_reason, r.cached_prompt_tokens)
        out.append(_RECORD.pack(*fields, entries))
    for r in records:
        if r.logprob is not None:
            out.append(_LOGPROB.pack(r.logprob.logprob))
            out += (_TOP.pack(token, logprob) for token, logprob in r.logprob.top)


def _read_records(data: memoryview, offset: int, name: str) -> tuple[list[TokenRecord], int]:
    (count,) = _COUNT.unpack_from(data, offset)
    end = _span(data, offset + 4, _RECORD.size * count, name)
    heads = list(_RECORD.iter_unpack(data[offset + 4 : end]))
    records = []
    for handle, token, index, finish, cached, entries in heads:
        logprob = None
        if entries:
            tail = _span(data, end, _LOGPROB.size + _TOP.size * (entries - 1), name)
            (value,) = _LOGPROB.unpack_from(data, end)
            top = tuple(_TOP.iter_unpack(data[end + _LOGPROB.size : tail]))
            logprob, end = TokenLogprob(token, value, top), tail
        records.append(TokenRecord(handle, token, index, FinishReason(finish), logprob, cached))
    return records, end


def _span(data: memoryview, offset: int, size: int, name: str) -> int:
    """The end of `size` bytes at `offset`; ValueError if the frame is shorter (corrupt)."""
    if offset + size > len(data):
        raise ValueError(
            f"{name}: {size} bytes at {offset} run past the end of a {len(data)}-byte frame"
        )
    return offset + size


def _read(cls: type, data: memoryview, offset: int) -> tuple[Any, int]:
    values: dict[str, Any] = {}
    for name, kind in _layout(cls):
        if kind in _SCALARS:
            (values[name],) = _SCALARS[kind].unpack_from(data, offset)
            offset += _SCALARS[kind].size
        elif kind in _ENUMS:
            values[name] = _ENUMS[kind](data[offset])
            offset += 1
        elif kind in ("str", "bytes"):
            (size,) = _COUNT.unpack_from(data, offset)
            _span(data, offset + 4, size, name)
            raw = bytes(data[offset + 4 : offset + 4 + size])
            values[name] = raw.decode() if kind == "str" else raw
            offset += 4 + size
        elif kind in _ID_LISTS:
            (count,) = _COUNT.unpack_from(data, offset)
            _span(data, offset + 4, 4 * count, name)
            ids_array = array("I")  # native order: little-endian on the platforms we run on
            ids_array.frombytes(data[offset + 4 : offset + 4 + 4 * count])
            ids = ids_array.tolist()
            values[name] = ids if kind == "list[int]" else tuple(ids)
            offset += 4 + 4 * count
        elif kind == "list[TokenRecord]":
            values[name], offset = _read_records(data, offset, name)
        elif kind in _NESTED:
            values[name], offset = _read(_NESTED[kind], data, offset)
        else:
            raise TypeError(f"{cls.__name__}.{name}: no wire codec for {kind}")
    assert is_dataclass(cls)
    return cls(**values), offset
