"""EngineConfig: the validated knobs of one BatchProcessor, built once at start."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32  # running sequences (slots)
    max_seq_len: int | None = None  # prompt + completion; None = the model's context
    kv_cache_mb: float = 256.0  # KV pool budget per worker
    block_size: int = 16  # tokens per KV block
    prefill_token_budget: int = 512  # prompt tokens per step, besides the decodes
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        positive = {
            "max_batch_size": self.max_batch_size,
            "kv_cache_mb": self.kv_cache_mb,
            "block_size": self.block_size,
            "prefill_token_budget": self.prefill_token_budget,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0 (got {value})")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2 (got {self.max_seq_len})")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda (got {self.device!r})")
