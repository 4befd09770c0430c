"""Plain types both processes share: priority, finish reason, sampling parameters, engine knobs.

Standard library only. Nothing here is numbered after a wire enum: the gRPC
servicer maps these to protobuf at the edge.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass

DEVICES = ("auto", "cpu", "cuda")
# MiB of KV pool per worker: holds an 8k-token context of a 135M model (46 KB/token) and
# ~16k tokens of a 1B one (32 KB/token); a 3-7B model wants several GiB (--kv-cache-mb).
DEFAULT_KV_CACHE_MB = 512.0
SPECULATIVE_METHODS = ("ngram", "draft")
MAX_SPECULATIVE_TOKENS = 16  # draft tokens per sequence per step: 17 verify rows at most
MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's limit too)


class Priority(enum.IntEnum):
    """Scheduling class; a lower value is served first."""

    HIGH = 0
    NORMAL = 1
    LOW = 2


class FinishReason(enum.IntEnum):
    NONE = 0  # still running
    LENGTH = 1  # max_new_tokens, or the context limit
    STOP = 2  # a stop token id or a stop string
    EOS = 3  # the model's end-of-sequence token
    CANCELLED = 4  # by the client, a deadline, a drain or the server


@dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen and when it ends (checked by server/validation.py).

    The wire codec (worker/channel/messages.py) is derived from these fields:
    a new parameter needs no change there.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off; keep tokens with p >= min_p * p(most likely)
    seed: int = 0  # uint64; token i's random draw is a pure function of (seed, i)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Penalties (worker/penalties.py), applied before temperature; defaults are off.
    repetition_penalty: float = 1.0  # Hugging Face: over prompt + completion; 1 = off
    frequency_penalty: float = 0.0  # OpenAI: minus count * this, over the completion
    presence_penalty: float = 0.0  # OpenAI: minus this for a token already in the completion
    logprobs: bool = False  # report each sampled token's log-probability
    top_logprobs: int = 0  # and this many most likely alternatives (0..20, with logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalized(self) -> bool:
        """Whether any penalty changes this request's logits."""
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )


@dataclass(frozen=True)
class EngineConfig:
    """One worker's engine knobs, validated once at start (ValueError names the field)."""

    max_batch_size: int = 32  # running sequences (slots)
    max_seq_len: int = 0  # prompt + completion; 0 = the model's context
    kv_cache_mb: float = DEFAULT_KV_CACHE_MB  # KV pool budget per worker, MiB
    block_size: int = 16  # tokens per KV block
    prefill_token_budget: int = 512  # prompt tokens per step, besides the decodes
    device: str = "auto"  # auto | cpu | cuda
    # Speculative decoding (worker/speculator.py): draft tokens verified per sequence per
    # step, 0 = off; drafted by prompt lookup ("ngram") or a draft model ("draft");
    # "" = "draft" when draft_model is set, else "ngram".
    num_speculative_tokens: int = 0
    speculative_method: str = ""
    draft_model: str = ""  # checkpoint sharing the model's tokenizer
    prompt_lookup_max: int = 4  # longest / shortest n-gram prompt lookup matches
    prompt_lookup_min: int = 2
    # A row's logits bitwise independent of the rest of the batch (docs/batch-invariance.md)
    batch_invariant: bool = False
    prefix_caching: bool = True  # share and keep full KV blocks of equal prefixes

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "kv_cache_mb", "block_size", "prefill_token_budget"):
            value = getattr(self, name)
            if not value > 0:  # also rejects NaN
                raise ValueError(f"{name} must be > 0 (got {value})")
        if self.max_seq_len and self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2 or 0 (got {self.max_seq_len})")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)} (got {self.device!r})")
        self._check_speculation()

    def _check_speculation(self) -> None:
        k = self.num_speculative_tokens
        if not 0 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(
                f"num_speculative_tokens must be in [0, {MAX_SPECULATIVE_TOKENS}] (got {k})"
            )
        if self.speculative_method not in ("", *SPECULATIVE_METHODS):
            raise ValueError(
                f"speculative_method must be one of {', '.join(SPECULATIVE_METHODS)} "
                f"(got {self.speculative_method!r})"
            )
        if self.speculative_method == "draft" and not self.draft_model:
            raise ValueError("draft_model must be set with speculative_method draft")
        if self.speculative_method == "ngram" and self.draft_model:
            raise ValueError("draft_model must be empty with speculative_method ngram")
        if self.draft_model and k == 0:
            raise ValueError("draft_model needs num_speculative_tokens > 0")
        if self.prompt_lookup_min < 1:
            raise ValueError(f"prompt_lookup_min must be >= 1 (got {self.prompt_lookup_min})")
        if self.prompt_lookup_max < self.prompt_lookup_min:
            raise ValueError(
                f"prompt_lookup_max must be >= prompt_lookup_min ({self.prompt_lookup_min}) "
                f"(got {self.prompt_lookup_max})"
            )

    @property
    def speculation(self) -> str:
        """The speculation in use: "ngram", "draft", or "" when off."""
        if self.num_speculative_tokens == 0:
            return ""
        return self.speculative_method or ("draft" if self.draft_model else "ngram")


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability and the most likely alternatives (natural log).

    Under the distribution the token was drawn from, after penalties and temperature,
    before the top-k / top-p / min-p cut (worker/sampling.py `token_logprobs`). `top`:
    (token_id, logprob) pairs, most likely first, as many as the request's top_logprobs.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenRecord:
    """One new token of one request, or the end of a request that produced none.

    `handle` names the request inside the worker and on the channel; `index` is
    the token's position in the completion. `token_id` is -1 on a record that
    carries only a finish (a cancellation). `finish_reason` is set on the last.
    `logprob` is set only for a request that asked for logprobs.
    `cached_prompt_tokens`: prompt tokens whose K/V the request's first admission
    on this worker found in the prefix cache (the same on each of its records).
    """

    handle: int
    token_id: int
    index: int
    finish_reason: FinishReason = FinishReason.NONE
    logprob: TokenLogprob | None = None
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class WorkerArgs:
    """What the front tells a worker process it spawns (`python -m worker.process JSON`)."""

    index: int
    model_dir: str
    engine: EngineConfig
    inbox: str  # shared-memory segment names
    outbox: str
    inbox_bell_fd: int  # inherited pipe ends: read the inbox doorbell, ring the outbox one
    outbox_bell_fd: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerArgs:
        values = json.loads(text)
        return cls(**{**values, "engine": EngineConfig(**values["engine"])})
