"""Paged KV cache: one preallocated pool of fixed-size blocks per worker.

A sequence owns a block table (a list of block ids); token t of the sequence
lives in block `table[t // block_size]` at offset `t % block_size`. Blocks go
back to the free list the moment a sequence finishes, is cancelled or is
preempted, so memory follows the live tokens, not the longest possible ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.backend import Backend
from worker.model_config import ModelConfig, kv_bytes_per_token

Array = Any


class BlockAllocator:
    """Free list of block ids; pure bookkeeping, no arrays.

    Last freed, first reused: recently written blocks are still in the CPU cache.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise MemoryError(f"asked for {count} KV blocks, {len(self._free)} free")
        taken = self._free[len(self._free) - count :]
        del self._free[len(self._free) - count :]
        return taken[::-1]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


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
    """Device arrays of the pool plus the allocator that hands out their blocks."""

    def __init__(self, config: ModelConfig, layout: KVCacheLayout, backend: Backend) -> None:
        self.layout = layout
        self.block_size = layout.block_size
        shape = (layout.num_blocks, layout.block_size, config.num_kv_heads, config.head_dim)
        # One K and one V pool per layer: (num_blocks, block_size, kv_heads, head_dim).
        # Filled now, not lazily zeroed: the memory is really taken at start, and
        # decode steps do not pay page faults as sequences grow into new blocks.
        self.k = [self._filled(backend, shape) for _ in range(config.num_layers)]
        self.v = [self._filled(backend, shape) for _ in range(config.num_layers)]
        self.allocator = BlockAllocator(layout.num_blocks)

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
