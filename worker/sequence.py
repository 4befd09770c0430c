"""Plain data types of one request's life in the engine (no arrays, no gRPC).

These are also the types the worker loop exchanges with the front, so they stay
free of anything but the standard library.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field


class Priority(enum.IntEnum):
    """Lower value = served first (the wire enum maps UNSPECIFIED to NORMAL)."""

    HIGH = 0
    NORMAL = 1
    LOW = 2


class FinishReason(enum.IntEnum):
    """Numbered as the wire enum `shoal.v1.FinishReason`."""

    NONE = 0  # still running
    LENGTH = 1  # max_new_tokens, or the context limit
    STOP = 2  # a stop token id (the front also uses it for stop strings)
    EOS = 3
    CANCELLED = 4


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 0 or 1 = off
    seed: int = 0  # token i's random draw is a pure function of (seed, i)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


_arrival = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request inside a BatchProcessor.

    `tokens` = prompt + generated so far. `num_computed` tokens have K/V in the
    cache; the rest still have to go through the model (a prefill chunk, the
    last sampled token for a decode, or everything again after preemption).
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: Priority = Priority.NORMAL
    generated: list[int] = field(default_factory=list)
    arrival: int = field(default_factory=lambda: next(_arrival))
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    finish_reason: FinishReason = FinishReason.NONE

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.generated

    @property
    def current_length(self) -> int:
        return len(self.prompt_ids) + len(self.generated)

    @property
    def tokens_generated(self) -> int:
        return len(self.generated)

    @property
    def num_pending(self) -> int:
        """Tokens whose K/V are not yet cached."""
        return self.current_length - self.num_computed

    @property
    def active(self) -> bool:
        return self.finish_reason == FinishReason.NONE

    @property
    def is_decoding(self) -> bool:
        return self.num_pending == 1 and self.num_computed > 0


@dataclass(frozen=True)
class TokenEvent:
    """One new token of one request; `finish_reason` is set on its last one.

    A cancelled request yields one event with token_id -1.
    """

    request_id: str
    token_id: int
    index: int  # position of the token in the completion
    finish_reason: FinishReason = FinishReason.NONE
