"""BlockAllocator and blocks_for: the KV pool's bookkeeping, no arrays."""

from __future__ import annotations

import pytest

from worker.kv_cache import BlockAllocator, blocks_for


def test_blocks_for_rounds_up() -> None:
    assert [blocks_for(n, 4) for n in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]


def test_allocate_and_free_keep_the_counts() -> None:
    allocator = BlockAllocator(10)
    assert (allocator.num_free, allocator.num_used) == (10, 0)
    first = allocator.allocate(3)
    second = allocator.allocate(4)
    assert len(first) == 3 and len(second) == 4
    assert len(set(first) | set(second)) == 7  # no block handed out twice
    assert set(first) | set(second) <= set(range(10))
    assert (allocator.num_free, allocator.num_used) == (3, 7)
    assert allocator.allocate(0) == [] and allocator.num_free == 3
    allocator.free(first)
    assert (allocator.num_free, allocator.num_used) == (6, 4)
    allocator.free(second)
    assert (allocator.num_free, allocator.num_used) == (10, 0)
    assert sorted(allocator.allocate(10)) == list(range(10))  # every block came back
    assert allocator.num_free == 0


def test_last_freed_is_first_reused() -> None:
    allocator = BlockAllocator(8)
    held = allocator.allocate(6)
    allocator.free([held[1]])
    allocator.free([held[4]])
    assert allocator.allocate(1) == [held[4]]  # the most recently freed block
    assert allocator.allocate(1) == [held[1]]
    allocator.free([held[2], held[3]])  # a table is freed in order: its last block comes back
    assert allocator.allocate(2) == [held[3], held[2]]  # first


def test_asking_for_more_than_is_free_raises_and_takes_nothing() -> None:
    allocator = BlockAllocator(4)
    held = allocator.allocate(3)
    with pytest.raises(MemoryError, match="asked for 2 KV blocks, 1 free"):
        allocator.allocate(2)
    assert allocator.num_free == 1
    last = allocator.allocate(1)
    assert last[0] not in held
    with pytest.raises(MemoryError):
        allocator.allocate(1)
