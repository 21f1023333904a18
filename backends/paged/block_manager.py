"""Which KV blocks belong to whom: allocation, reference counts, hash-chained prefix caching
with LRU eviction of unreferenced cached blocks, and a watermark for admission.

Block states:
  free       ref 0, no content worth keeping        -> `_free` (a deque)
  cached     ref 0, full block with a known digest  -> `_evictable` (LRU order), reusable by digest
  in use     ref > 0 (shared prefix blocks, and a prompt shared by a request's choices, ref > 1)

A cached block is found by its chain digest alone, with no comparison of tokens, so the digest
must not collide: a collision would hand one request another prefix's KV. Python's `hash()` is
64 bits (and a tuple's hash is not built to resist collisions); BLAKE2b-256 over the parent's
digest and the block's token ids is, and costs about a microsecond per full block.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from backends.paged.sequence import Sequence

DIGEST_SIZE = 32  # bytes of BLAKE2b output: collisions out of reach, by chance or by design


def chain_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    """Digest of a full block given its parent's digest (None for a sequence's first block):
    equal digests mean equal whole prefixes, up to BLAKE2b-256 collisions."""
    h = hashlib.blake2b(parent or b"", digest_size=DIGEST_SIZE)
    h.update(array("q", tokens))  # int64 ids: fixed width, so the byte string is unambiguous
    return h.digest()


class BlockManager:
    """Owns the block ids of one KV cache."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True, watermark: float = 0.01) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.watermark_blocks = max(1, int(watermark * num_blocks)) if num_blocks > 4 else 0
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[bytes, int] = {}  # chain digest -> block id
        # Counted in tokens, like vLLM's vllm:prefix_cache_queries / _hits.
        self.prefix_queries = 0
        self.prefix_hits = 0

    # -- accounting -------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence references (cached ones included: they can be evicted)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        """Fraction of blocks referenced by sequences (0..1)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks seq needs to hold num_tokens tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_allocate(self, n: int, *, watermark: bool = False) -> bool:
        """Whether n blocks can be taken, keeping the watermark free when admitting new work."""
        return self.num_free_blocks - n >= (self.watermark_blocks if watermark else 0)

    # -- allocation ----------------------------------------------------------------------

    def _take(self) -> int:
        if self._free:
            b = self._free.popleft()
        else:  # evict the least recently used cached block
            b, _ = self._evictable.popitem(last=False)
            h = self._hash[b]
            if h is not None and self._cached.get(h) == b:
                del self._cached[h]
            self._hash[b] = None
        self._ref[b] = 1
        return b

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq's block table to hold num_tokens tokens. The caller checked can_allocate."""
        n = self.blocks_needed(seq, num_tokens)
        if n > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {n}, {self.num_free_blocks} free")
        for _ in range(n):
            seq.block_table.append(self._take())

    def free(self, seq: Sequence) -> None:
        """Drop seq's references (finish, abort or preemption). Hashed blocks stay cached."""
        # Tail blocks first into the LRU so they are evicted before the shared prefix blocks.
        for b in reversed(seq.block_table):
            self._ref[b] -= 1
            assert self._ref[b] >= 0, f"block {b} freed twice"
            if self._ref[b] == 0:
                if self._hash[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)
        seq.block_table = []
        seq.block_hashes = []

    # -- prefix caching ------------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> int:
        """Point a fresh sequence's table at cached blocks for its longest cached prefix of full
        blocks; return the number of tokens covered. At least one token is always left to
        compute, since the step that samples needs that token's logits."""
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return 0
        tokens = seq.tokens
        self.prefix_queries += len(tokens)
        max_blocks = (len(tokens) - 1) // self.block_size
        parent: bytes | None = None
        for i in range(max_blocks):
            h = chain_hash(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
            b = self._cached.get(h)
            if b is None:
                break
            if self._ref[b] == 0:
                del self._evictable[b]
            self._ref[b] += 1
            seq.block_table.append(b)
            seq.block_hashes.append(h)
            parent = h
        hit = len(seq.block_table) * self.block_size
        self.prefix_hits += hit
        return hit

    def fork(self, parent: Sequence, child: Sequence) -> int:
        """Point a fresh child's table at its parent's full prompt blocks, shared by reference
        (the other choices of an n > 1 request: the prompt's KV is computed once, with or
        without prefix caching); set and return the child's computed tokens. As in
        match_prefix, at least one prompt token is left to compute: the child needs its own
        logits at the prompt's last position, and the partial last block is its own to fill."""
        assert not child.block_table and child.prompt_ids == parent.prompt_ids
        shared = (len(parent.prompt_ids) - 1) // self.block_size
        assert parent.num_computed >= shared * self.block_size and len(parent.block_table) >= shared, "the parent's prompt is not computed"
        child.block_table = parent.block_table[:shared]
        for b in child.block_table:
            self._ref[b] += 1  # > 1 now: the parent holds it too, so it is in no free list
        child.block_hashes = parent.block_hashes[:shared]
        child.num_computed = shared * self.block_size
        return child.num_computed

    def commit_full_blocks(self, seq: Sequence, known: int | None = None) -> None:
        """Register the hashes of seq's blocks that became full and computed this step.
        `known`: how many of seq's leading tokens have known values (async scheduling leaves
        sampled tokens on the device for a step); blocks past it wait for a later call."""
        if not self.enable_prefix_caching:
            return
        computed = seq.num_computed if known is None else min(seq.num_computed, known)
        full = computed // self.block_size
        while len(seq.block_hashes) < full:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = chain_hash(parent, seq.token_slice(i * self.block_size, (i + 1) * self.block_size))
            seq.block_hashes.append(h)
            b = seq.block_table[i]
            if h not in self._cached and self._hash[b] is None:
                self._cached[h] = b
                self._hash[b] = h
            # else: another sequence computed the same block concurrently; keep theirs cached
            # and let ours be plainly freed later.

    def check_invariants(self) -> None:
        """Assert the free lists and ref counts agree (tests call this)."""
        in_free = set(self._free)
        in_evict = set(self._evictable)
        assert not in_free & in_evict
        for b in range(self.num_blocks):
            if self._ref[b] == 0:
                assert b in in_free or b in in_evict, f"block {b} is lost"
            else:
                assert b not in in_free and b not in in_evict, f"block {b} is in use and free"
        for h, b in self._cached.items():
            assert self._hash[b] == h
