"""Paged KV cache: one preallocated pool of fixed-size blocks per worker.

A sequence owns a block table (a list of block ids); token t of the sequence
lives in block `table[t // block_size]` at offset `t % block_size`. Which block
holds what, and who shares it, is worker/block_manager.py's bookkeeping: a
sequence lets go of its blocks the moment it finishes, is cancelled or is
preempted, so memory follows the live tokens (and the cached prefixes kept in
what is left), not the longest possible ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.backend import Backend
from worker.model_config import ModelConfig, kv_bytes_per_token

Array = Any


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@dataclass(frozen=True)
class KVCacheLayout:
    num_blocks: int
    block_size: int
    bytes_per_token: int

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def describe(self) -> str:
        mb = self.num_blocks * self.block_size * self.bytes_per_token / 2**20
        return (
            f"KV cache: {self.num_blocks} blocks x {self.block_size} tokens = "
            f"{self.capacity_tokens} tokens ({self.bytes_per_token} B/token, {mb:.1f} MiB)"
        )


def plan_kv_cache(config: ModelConfig, kv_cache_mb: float, block_size: int) -> KVCacheLayout:
    per_token = kv_bytes_per_token(config, np.dtype(np.float32).itemsize)
    num_blocks = int(kv_cache_mb * 2**20) // (per_token * block_size)
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_mb={kv_cache_mb} holds no block of {block_size} tokens "
            f"({per_token * block_size} bytes per block)"
        )
    return KVCacheLayout(num_blocks=num_blocks, block_size=block_size, bytes_per_token=per_token)


class KVCache:
    """Device arrays of the pool (worker/block_manager.py hands out their blocks)."""

    def __init__(self, config: ModelConfig, layout: KVCacheLayout, backend: Backend) -> None:
        self.layout = layout
        self.block_size = layout.block_size
        shape = (layout.num_blocks, layout.block_size, config.num_kv_heads, config.head_dim)
        # One K and one V pool per layer: (num_blocks, block_size, kv_heads, head_dim).
        # Filled now, not lazily zeroed: the memory is really taken at start, and
        # decode steps do not pay page faults as sequences grow into new blocks.
        self.k = [self._filled(backend, shape) for _ in range(config.num_layers)]
        self.v = [self._filled(backend, shape) for _ in range(config.num_layers)]

    @staticmethod
    def _filled(backend: Backend, shape: tuple[int, ...]) -> Array:
        pool = backend.xp.empty(shape, dtype=np.float32)
        pool.fill(0)
        return pool

    def write(self, layer: int, slots: tuple[Array, Array], k: Array, v: Array) -> None:
        """Store new tokens' keys/values; slots = (block ids (T,), offsets (T,))."""
        blocks, offsets = slots
        self.k[layer][blocks, offsets] = k  # k: (T, kv_heads, head_dim)
        self.v[layer][blocks, offsets] = v
