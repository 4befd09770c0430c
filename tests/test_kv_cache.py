"""BlockManager's plain blocks and blocks_for: the KV pool's bookkeeping, no arrays.

Prefix caching (hashes, sharing, eviction) is tested in tests/test_prefix_cache.py.
"""

from __future__ import annotations

import pytest

from worker.block_manager import BlockManager
from worker.kv_cache import blocks_for


def test_blocks_for_rounds_up() -> None:
    assert [blocks_for(n, 4) for n in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]


def test_allocate_and_free_keep_the_counts() -> None:
    blocks = BlockManager(10, block_size=4)
    assert (blocks.num_free, blocks.num_used) == (10, 0)
    first = blocks.allocate(3)
    second = blocks.allocate(4)
    assert len(first) == 3 and len(second) == 4
    assert len(set(first) | set(second)) == 7  # no block handed out twice
    assert set(first) | set(second) <= set(range(10))
    assert (blocks.num_free, blocks.num_used) == (3, 7)
    assert blocks.allocate(0) == [] and blocks.num_free == 3
    blocks.free(first)
    assert (blocks.num_free, blocks.num_used) == (6, 4)
    blocks.free(second)
    assert (blocks.num_free, blocks.num_used) == (10, 0)
    assert sorted(blocks.allocate(10)) == list(range(10))  # every block came back
    assert blocks.num_free == 0


def test_last_freed_is_first_reused() -> None:
    blocks = BlockManager(8, block_size=4)
    held = blocks.allocate(6)
    blocks.free([held[1]])
    blocks.free([held[4]])
    assert blocks.allocate(1) == [held[4]]  # the most recently freed block
    assert blocks.allocate(1) == [held[1]]
    blocks.free([held[2], held[3]])  # a table is freed in order: its last block comes back
    assert blocks.allocate(2) == [held[3], held[2]]  # first


def test_asking_for_more_than_is_free_raises_and_takes_nothing() -> None:
    blocks = BlockManager(4, block_size=4)
    held = blocks.allocate(3)
    with pytest.raises(MemoryError, match="asked for 2 KV blocks, 1 free"):
        blocks.allocate(2)
    assert blocks.num_free == 1
    last = blocks.allocate(1)
    assert last[0] not in held
    with pytest.raises(MemoryError):
        blocks.allocate(1)
