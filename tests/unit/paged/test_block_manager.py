"""Block manager: allocation, ref-counts, hash-chained prefix caching, LRU eviction, watermark."""

from __future__ import annotations

import pytest

from backends.generation import SamplingParams
from backends.paged.block_manager import BlockManager, chain_hash
from backends.paged.sequence import Sequence


def seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams(max_tokens=4))


def compute(bm: BlockManager, s: Sequence) -> None:
    """Pretend the model computed all of s's tokens."""
    bm.allocate(s, s.num_tokens)
    s.num_computed = s.num_tokens
    bm.commit_full_blocks(s)


def test_allocate_and_free_return_every_block() -> None:
    bm = BlockManager(8, 4)
    a, b = seq(list(range(10)), "a"), seq(list(range(5)), "b")
    bm.allocate(a, 10)
    bm.allocate(b, 5)
    assert len(a.block_table) == 3 and len(b.block_table) == 2
    assert not set(a.block_table) & set(b.block_table)
    assert bm.num_free_blocks == 3 and bm.usage() == pytest.approx(5 / 8)
    bm.allocate(a, 12)  # still fits in 3 blocks
    assert len(a.block_table) == 3
    bm.free(a)
    bm.free(b)
    bm.check_invariants()
    assert bm.num_free_blocks == 8 and bm.usage() == 0.0


def test_allocate_beyond_pool_raises() -> None:
    bm = BlockManager(2, 4)
    with pytest.raises(RuntimeError):
        bm.allocate(seq(list(range(9))), 9)


def test_shared_prefix_is_matched_and_ref_counted() -> None:
    bm = BlockManager(16, 4)
    prefix = list(range(100, 112))  # three full blocks
    a = seq(prefix + [1, 2], "a")
    compute(bm, a)
    b = seq(prefix + [7, 8, 9], "b")
    hit = bm.match_prefix(b)
    assert hit == 12
    assert b.block_table == a.block_table[:3]
    assert bm.prefix_hits == 12 and bm.prefix_queries == 15  # only b went through match_prefix
    bm.free(a)  # b still holds the shared blocks
    assert bm.num_free_blocks == 16 - 3
    bm.free(b)
    bm.check_invariants()
    assert bm.num_free_blocks == 16


def test_prefix_match_leaves_one_token_to_compute() -> None:
    bm = BlockManager(16, 4)
    a = seq(list(range(8)), "a")
    compute(bm, a)
    bm.free(a)
    again = seq(list(range(8)), "b")
    assert bm.match_prefix(again) == 4  # not 8: the last token's logits are needed
    bm.free(again)


def test_different_prefix_does_not_match_later_equal_block() -> None:
    """Hash chains: a block matches only if everything before it matches too."""
    bm = BlockManager(16, 4)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a")
    compute(bm, a)
    b = seq([0, 2, 3, 4, 5, 6, 7, 8, 9], "b")  # second block equal, first differs
    assert bm.match_prefix(b) == 0
    bm.free(a)
    bm.free(b)


def test_lru_eviction_of_unreferenced_cached_blocks() -> None:
    bm = BlockManager(4, 2)
    old = seq([1, 2, 3, 4, 5], "old")
    compute(bm, old)
    bm.free(old)
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 4
    new = seq([9, 9, 8, 8, 7], "new")
    bm.allocate(new, 5)  # needs 3: takes the 2 plain free blocks, then evicts one cached block
    assert bm.num_cached_blocks == 1
    bm.free(new)
    # The surviving cached block is the first one of "old" (tail evicted first), so the
    # prefix still hits one block.
    probe = seq([1, 2, 3, 4, 5], "probe")
    assert bm.match_prefix(probe) == 2
    bm.free(probe)
    bm.check_invariants()


def test_watermark_applies_to_admission_only() -> None:
    bm = BlockManager(100, 4, watermark=0.05)
    assert bm.watermark_blocks == 5
    assert bm.can_allocate(95, watermark=True)
    assert not bm.can_allocate(96, watermark=True)
    assert bm.can_allocate(100)


def test_a_64_bit_hash_collision_is_no_prefix_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached block is found by its chain digest alone, so a digest collision would hand one
    request another prefix's KV. Python's hash() is 64 bits: make every call to it in the
    block manager collide, and two different prompts must still share nothing."""
    import backends.paged.block_manager as block_manager

    monkeypatch.setattr(block_manager, "hash", lambda _value: 0, raising=False)
    bm = BlockManager(16, 4)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a")
    compute(bm, a)
    b = seq([9, 8, 7, 6, 5, 4, 3, 2, 1], "b")
    assert bm.match_prefix(b) == 0
    assert b.block_table == []
    bm.free(a)
    bm.free(b)
    bm.check_invariants()


def test_chain_digest_covers_parent_and_tokens() -> None:
    first = chain_hash(None, [1, 2, 3, 4])
    assert len(first) == 32 and chain_hash(None, [1, 2, 3, 4]) == first  # deterministic
    assert chain_hash(None, [1, 2, 3, 5]) != first
    assert chain_hash(first, [1, 2, 3, 4]) != first  # same tokens, another parent
    # Fixed-width ids: [1, 23] and [12, 3] do not run together into one byte string.
    assert chain_hash(None, [1, 23]) != chain_hash(None, [12, 3])
