"""n > 1 in the paged engine: one request, several choices sharing the prompt's KV blocks
(computed once, with or without prefix caching); each choice seeded seed + i; indexes and the
final delta; block accounting through aborts and preemption."""

from __future__ import annotations

import random

import pytest

from backends.generation import GenerationRequest, SamplingParams
from backends.paged.async_engine import AsyncEngine
from backends.paged.block_manager import BlockManager
from backends.paged.engine import LLMEngine
from backends.paged.sequence import Sequence

from .conftest import assert_blocks_all_free


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 300) for _ in range(n - 1)]


def request(rid: str, p: list[int], max_tokens: int, **kw) -> GenerationRequest:
    kw.setdefault("ignore_eos", True)
    kw.setdefault("temperature", 0.0)
    return GenerationRequest(rid, p, SamplingParams(max_tokens=max_tokens, **kw))


def steps_checked(engine: LLMEngine) -> list:
    """Every delta until the engine is idle, the block pool's invariants checked each step."""
    deltas = []
    while engine.has_unfinished():
        for o in engine.step():
            deltas.append((o.request_id, o.delta))
        engine.block_manager.check_invariants()
    return deltas


def test_fork_shares_the_full_prompt_blocks_by_reference() -> None:
    bm = BlockManager(16, 4)
    parent = Sequence("r", list(range(1, 11)), SamplingParams(max_tokens=4))  # 10 tokens: 2 full blocks + 2
    bm.allocate(parent, 10)
    parent.num_computed = 10
    bm.commit_full_blocks(parent)
    child = Sequence("r", parent.prompt_ids, parent.sampling, index=1, parent=parent)
    assert bm.fork(parent, child) == 8 and child.num_computed == 8
    assert child.block_table == parent.block_table[:2] and child.block_hashes == parent.block_hashes[:2]
    assert bm.num_free_blocks == 16 - 3
    bm.free(parent)  # the child still holds the shared two
    assert bm.num_free_blocks == 16 - 2
    bm.free(child)
    assert bm.num_free_blocks == 16
    bm.check_invariants()
    # A prompt of whole blocks keeps its last block to compute: the child needs its own logits.
    whole = Sequence("w", list(range(1, 9)), SamplingParams(max_tokens=4))
    bm.allocate(whole, 8)
    whole.num_computed = 8
    child = Sequence("w", whole.prompt_ids, whole.sampling, index=1, parent=whole)
    assert bm.fork(whole, child) == 4
    bm.free(whole)
    bm.free(child)
    bm.check_invariants()


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_choices_equal_the_single_answer(make_engine, async_scheduling: bool, prefix_caching: bool) -> None:
    p = prompt(23)
    opts = dict(num_blocks=64, block_size=4, async_scheduling=async_scheduling, enable_prefix_caching=prefix_caching)
    single = make_engine(**opts).generate_sync([request("one", p, 10)])["one"]
    engine = make_engine(**opts)
    engine.add_request(request("three", p, 10, n=3))
    deltas = steps_checked(engine)
    choices: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for _, d in deltas:
        choices[d.index] += d.token_ids
    assert list(choices.values()) == [single] * 3
    # Each choice finishes once; the very last delta, and only it, is final.
    assert sorted(d.index for _, d in deltas if d.finish_reason) == [0, 1, 2]
    assert [d.final for _, d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert engine.counters.requests_finished == 1


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_seeded_choices_are_the_single_answers_of_seeds_s_s1_s2(make_engine, async_scheduling: bool) -> None:
    p = prompt(18, seed=3)
    kw = dict(temperature=0.9, top_p=0.95)
    opts = dict(num_blocks=64, block_size=4, async_scheduling=async_scheduling)
    singles = make_engine(**opts).generate_sync([request(f"s{i}", p, 12, seed=40 + i, **kw) for i in range(3)])
    got = make_engine(**opts).generate_choices([request("n3", p, 12, seed=40, n=3, **kw)])["n3"]
    assert got == [singles["s0"], singles["s1"], singles["s2"]]
    assert len({tuple(c) for c in got}) > 1  # the seeds differ


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_the_prompt_is_computed_once_without_prefix_caching(make_engine, async_scheduling: bool) -> None:
    """The parent computes the whole prompt; each further choice only the tail past its last
    full block (here 3 of 23 tokens); then every choice decodes its own tokens."""
    p, m, n, bs = prompt(23, seed=5), 6, 4, 4
    engine = make_engine(num_blocks=64, block_size=bs, enable_prefix_caching=False, async_scheduling=async_scheduling)
    engine.generate_choices([request("r", p, m, n=n)])
    tail = len(p) - (len(p) - 1) // bs * bs
    assert tail == 3
    computed = engine.counters.prefill_tokens + engine.counters.decode_tokens
    assert computed == len(p) + (n - 1) * tail + n * (m - 1)  # the last token of each choice is never fed back
    assert engine.block_manager.prefix_hits == 0


def test_abort_mid_way_frees_every_choice(make_engine) -> None:
    engine = make_engine(num_blocks=64, block_size=4, max_num_seqs=3)  # the fourth choice waits
    engine.add_request(request("drop", prompt(21), 40, n=4))
    engine.add_request(request("keep", prompt(9, seed=1), 8))
    for _ in range(4):
        engine.step()
        engine.block_manager.check_invariants()
    group = engine.requests["drop"]
    assert len(engine.scheduler.running) == 3 and any(s in engine.scheduler.waiting for s in group.seqs)
    assert engine.abort("drop")
    engine.block_manager.check_invariants()
    assert not engine.abort("drop")
    deltas = steps_checked(engine)
    assert {rid for rid, _ in deltas} == {"keep"}
    assert_blocks_all_free(engine)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preemption_with_a_tiny_pool_keeps_every_choice_right(make_engine, async_scheduling: bool) -> None:
    p = prompt(14, seed=2)
    roomy = make_engine(num_blocks=128, block_size=4).generate_choices([request("r", p, 24, n=3), request("x", prompt(12, seed=9), 24)])
    tight = make_engine(num_blocks=16, block_size=4, max_num_batched_tokens=8, watermark=0.0, async_scheduling=async_scheduling)
    for r in (request("r", p, 24, n=3), request("x", prompt(12, seed=9), 24)):
        tight.add_request(r)
    deltas = steps_checked(tight)
    assert tight.scheduler.num_preemptions > 0, "the pool was sized to force preemption"
    got: dict[str, dict[int, list[int]]] = {}
    for rid, d in deltas:
        got.setdefault(rid, {}).setdefault(d.index, []).extend(d.token_ids)
    assert {rid: [c[i] for i in sorted(c)] for rid, c in got.items()} == roomy
    assert_blocks_all_free(tight)


def test_a_choice_whose_parent_finished_computes_its_own_prompt(make_engine) -> None:
    """max_num_seqs=1: the choices run one after another, each after the previous finished."""
    p = prompt(13, seed=4)
    engine = make_engine(num_blocks=64, block_size=4, max_num_seqs=1, enable_prefix_caching=False)
    got = engine.generate_choices([request("r", p, 5, n=3)])["r"]
    assert got == [engine.generate_sync([request("one", p, 5)])["one"]] * 3
    assert engine.counters.prefill_tokens == 4 * len(p)


async def test_async_engine_streams_every_choice_until_the_final_delta(make_engine) -> None:
    engine = make_engine(num_blocks=64, block_size=4)
    runner = AsyncEngine(engine)
    runner.start()
    try:
        deltas = [d async for d in runner.generate(request("r", prompt(10), 5, n=3))]
    finally:
        runner.shutdown()
    assert sorted(d.index for d in deltas if d.finish_reason) == [0, 1, 2]
    assert deltas[-1].final and sum(d.final for d in deltas) == 1
    assert sum(len(d.token_ids) for d in deltas) == 15
