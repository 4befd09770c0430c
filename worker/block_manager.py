"""BlockManager: the KV pool's bookkeeping - allocation, reference counts, prefix caching.

Block ids only, no arrays (worker/kv_cache.py holds the pool itself). A
sequence's block table maps token t to block `table[t // block_size]`.

Automatic prefix caching, as vLLM's and SGLang's. A block whose tokens are all
written (full, K/V computed) is named by `block_hash`: a hash chained over its
tokens and its prefix's hash, so two blocks with equal hashes hold equal K/V.
A new sequence looks its full blocks up in order and starts its prefill after
the longest run found; those blocks are shared, and `ref_count` says by how
many sequences. At least one token is always computed, so that its logits
exist: a prompt cached to its very end takes its last block fresh and
recomputes it (as vLLM does), so a shared block is never written.

When its last sequence lets go of a block (finished, cancelled, preempted),
a hashed block keeps its K/V and hash ("cached", evictable), in an LRU; it is
evicted - its hash forgotten, the block reused - only when an allocation finds
no never-hashed free block. Every block is in exactly one state:

    free       ref 0, no hash   `_free`, a stack (last freed, first reused: warm in the CPU cache)
    cached     ref 0, a hash    `_evictable`, least recently used first
    in use     ref > 0          held by `ref_count[b]` sequences (hashed or not)

`num_free` counts free and cached blocks: all of them can be handed out.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from worker.kv_cache import blocks_for
from worker.sequence import Sequence

ROOT_HASH = bytes(32)  # the "prefix hash" of a sequence's first block


def block_hash(parent: bytes, token_ids: list[int], extra: bytes = b"") -> bytes:
    """SHA-256 of (prefix hash, extra, token ids as u32): the name of one full block's K/V.

    `extra` is the hook for anything else that changes the K/V of the same tokens
    (a LoRA adapter, a multimodal input's hash); nothing does today, so it is empty.
    SHA-256 rather than Python's hash(): a collision would silently serve another
    prompt's K/V (vLLM offers SHA-256 for that reason).
    """
    h = hashlib.sha256(parent)
    h.update(len(extra).to_bytes(4, "little"))
    h.update(extra)
    h.update(array("I", token_ids).tobytes())
    return h.digest()


class BlockManager:
    """Allocation, hashing, reference counts and the LRU of cached blocks of one KV pool."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # block hash -> the block holding that K/V
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest first
        # Prefix cache hit rate, in tokens, over every admission (also recomputations).
        self.query_tokens = 0
        self.hit_tokens = 0

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: never-hashed free ones plus cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks held by nobody that keep their K/V for a later prefix hit."""
        return len(self._evictable)

    # -- plain blocks -------------------------------------------------------------------
    def allocate(self, count: int) -> list[int]:
        """`count` blocks with nothing in them, each held once; evicts the LRU cached
        blocks when the free stack runs out. MemoryError (taking nothing) past num_free."""
        if count > self.num_free:
            raise MemoryError(f"asked for {count} KV blocks, {self.num_free} free")
        taken = []
        for _ in range(count):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self.cached[self.hash_of[block]]  # type: ignore[index]
                self.hash_of[block] = None
            self.ref_count[block] = 1
            taken.append(block)
        return taken

    def free(self, blocks: list[int]) -> None:
        """Let go of one reference to each block (a whole table, in table order).

        A block nobody holds any more becomes free, or cached if it has a hash. Cached
        blocks join the LRU from the table's end, so a sequence's last blocks, the
        least likely to be shared, are evicted first.
        """
        unnamed = []
        for block in reversed(blocks):
            assert self.ref_count[block] > 0, f"KV block {block} freed more often than taken"
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                if self.hash_of[block] is None:
                    unnamed.append(block)
                else:
                    self._evictable[block] = None
        self._free.extend(reversed(unnamed))  # the table's last block on top: reused first

    # -- sequences ----------------------------------------------------------------------
    def allocate_sequence(self, seq: Sequence, reserve: int = 0) -> bool:
        """Give a waiting sequence the blocks for all its tokens, its cached prefix shared.

        Sets `seq.block_table` and `seq.num_computed` (the cached tokens, a multiple of
        block_size, always fewer than its tokens). False, changing nothing, if fewer
        than `reserve` blocks would be left free.
        """
        hits = self.cache_hits(seq)
        fresh = blocks_for(seq.current_length, self.block_size) - len(hits)
        revived = sum(1 for b in hits if self.ref_count[b] == 0)  # leave the cached LRU
        if self.num_free < fresh + revived + reserve:
            return False
        self._share(hits)
        seq.block_table = hits + self.allocate(fresh)
        seq.num_computed = seq.num_hashed_blocks = 0
        if self.enable_prefix_caching:
            self.query_tokens += seq.current_length
        self._computed_from_cache(seq, len(hits))
        return True

    def take_cached_blocks(self, seq: Sequence) -> None:
        """Before a prefill chunk: swap seq's next blocks, not computed yet, for cached ones
        with the same content that other sequences computed since seq was admitted.

        So requests with a common prefix that start together compute it once: the first
        computes it while the others wait for prefill budget, and they go on after it.
        """
        if seq.num_computed % self.block_size:
            return
        start = seq.num_computed // self.block_size
        hits = self.cache_hits(seq, start)
        if not hits:
            return
        own = seq.block_table[start : start + len(hits)]
        assert all(self.ref_count[b] == 1 and self.hash_of[b] is None for b in own)
        self._share(hits)
        seq.block_table[start : start + len(hits)] = hits
        self.free(own)
        self._computed_from_cache(seq, start + len(hits))

    def cache_computed(self, seq: Sequence) -> None:
        """After a step: name the blocks of seq that are now full and computed.

        A block whose hash another block already holds (the same prompt computed twice
        at once) stays unnamed and is simply freed at the end.
        """
        full = seq.num_computed // self.block_size
        if not self.enable_prefix_caching or full <= seq.num_hashed_blocks:
            return  # most steps: no block was filled
        hashes = self._hashes(seq, full)
        for i in range(seq.num_hashed_blocks, full):
            if hashes[i] not in self.cached:
                block = seq.block_table[i]
                self.cached[hashes[i]] = block
                self.hash_of[block] = hashes[i]
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def cache_hits(self, seq: Sequence, start: int = 0) -> list[int]:
        """The cached blocks that continue seq's first `start` blocks, as far as the cache
        goes, leaving at least one token of seq to compute."""
        if not self.enable_prefix_caching:
            return []
        limit = self._max_hits(seq)
        hits = []
        for h in self._hashes(seq, limit)[start:limit]:
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def next_block_hash(self, seq: Sequence) -> bytes | None:
        """The hash of the block seq computes next, if that block could come from the cache
        (it starts at a block boundary and leaves a token to compute); else None."""
        i, offset = divmod(seq.num_computed, self.block_size)
        if not self.enable_prefix_caching or offset or i >= self._max_hits(seq):
            return None
        return self._hashes(seq, i + 1)[i]

    def hashes_completed(self, seq: Sequence, chunk: int) -> list[bytes]:
        """The hashes of the blocks that seq's next `chunk` tokens fill."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        first, last = seq.num_computed // bs, (seq.num_computed + chunk) // bs
        return self._hashes(seq, last)[first:last]

    def _max_hits(self, seq: Sequence) -> int:
        """Blocks of seq the cache may supply: all full ones short of its last token."""
        return (seq.current_length - 1) // self.block_size

    def _share(self, blocks: list[int]) -> None:
        for block in blocks:
            if self.ref_count[block] == 0:
                del self._evictable[block]
            self.ref_count[block] += 1

    def _computed_from_cache(self, seq: Sequence, num_blocks: int) -> None:
        """seq's first `num_blocks` blocks hold K/V from the cache: its prefill starts after."""
        computed = num_blocks * self.block_size
        self.hit_tokens += computed - seq.num_computed
        seq.num_computed, seq.num_hashed_blocks = computed, num_blocks
        if seq.num_preemptions == 0:  # reported for the first prefill only, as vLLM does
            seq.cached_prompt_tokens = min(computed, len(seq.prompt_ids))

    def _hashes(self, seq: Sequence, count: int) -> list[bytes]:
        """seq's chained block hashes, at least its first `count` (full blocks; the list may
        hold more): a sequence's tokens never change, only grow, so each is computed once."""
        hashes, bs, tokens = seq.block_hashes, self.block_size, None
        while len(hashes) < count:
            tokens = tokens or seq.tokens
            i = len(hashes)
            parent = hashes[-1] if hashes else ROOT_HASH
            hashes.append(block_hash(parent, tokens[i * bs : (i + 1) * bs]))
        return hashes
