"""Async scheduling (on by default on CUDA) run on the CPU: sampled tokens stay in a tensor
that feeds the next step and are processed one step later. Every result must equal the
synchronous engine's."""

from __future__ import annotations

import random

import torch

from backends.generation import GenerationRequest, SamplingParams
from backends.paged.cuda_graphs import DecodeGraphRunner

from .conftest import assert_blocks_all_free
from .test_gpu_paths_on_cpu import _capture_without_cuda


def prompts(n: int, seed: int = 0, lo: int = 5, hi: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 300) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def greedy(rid: str, prompt: list[int], n: int, **kw) -> GenerationRequest:
    kw.setdefault("ignore_eos", True)
    return GenerationRequest(rid, prompt, SamplingParams(max_tokens=n, temperature=0.0, **kw))


def collect(engine, requests: list[GenerationRequest]) -> dict[str, tuple[list[int], str, str | None]]:
    """(token ids, text, finish reason) per request, stepping by hand."""
    for r in requests:
        engine.add_request(r)
    out: dict[str, tuple[list[int], str, str | None]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            ids, text, fin = out.get(o.request_id, ([], "", None))
            assert fin is None, f"{o.request_id} produced a delta after finishing"
            out[o.request_id] = (ids + o.delta.token_ids, text + o.delta.text, o.delta.finish_reason)
    return out


def test_async_equals_sync_under_chunked_prefill_and_preemption(make_engine) -> None:
    ps = prompts(8, seed=1, lo=10, hi=20)
    opts = dict(num_blocks=14, block_size=4, max_num_batched_tokens=8, max_num_seqs=8, watermark=0.0)
    reqs = [greedy(f"r{i}", p, 16) for i, p in enumerate(ps)]
    sync = make_engine(async_scheduling=False, **opts)
    asy = make_engine(async_scheduling=True, **opts)
    assert asy.async_scheduling and not sync.async_scheduling
    a, b = collect(sync, reqs), collect(asy, reqs)
    assert asy.scheduler.num_preemptions > 0
    assert a == b
    assert all(len(v[0]) == 16 and v[2] == "length" for v in b.values())
    assert asy.counters.generation_tokens == 8 * 16


def test_async_with_decode_graphs_equals_sync(make_engine) -> None:
    ps = prompts(7, seed=0, lo=5, hi=40)
    reqs = [greedy(f"r{i}", p, 12) for i, p in enumerate(ps)]

    def run(asy: bool):
        engine = make_engine(num_blocks=40, block_size=4, max_num_batched_tokens=16, max_num_seqs=7, watermark=0.0, async_scheduling=asy)
        engine.runner.graphs = DecodeGraphRunner(
            engine.runner.model, engine.runner.cache, max_batch=7, max_blocks_per_seq=-(-engine.max_model_len // 4),
            max_context=engine.max_model_len, splits_for=lambda b, ctx: 1,
        )  # fmt: skip
        _capture_without_cuda(engine.runner.graphs)
        out = collect(engine, reqs)
        assert engine.counters.graph_steps > 0
        return out

    assert run(True) == run(False)


def test_async_stops_and_lengths(make_engine) -> None:
    x, a = ord("x") + 3, ord("a") + 3  # the byte tokenizer's ids
    cases = [
        dict(max_tokens=5, logit_bias={x: 100.0}),
        dict(max_tokens=5, logit_bias={x: 100.0}, stop_token_ids=[x]),
        dict(max_tokens=5, logit_bias={2: 100.0}),  # EOS
        dict(max_tokens=5, logit_bias={2: 100.0}, ignore_eos=True),
        dict(max_tokens=10, logit_bias={a: 100.0}, stop=["aa"]),
        dict(max_tokens=1),
    ]
    # Mixed with plain greedy requests that keep running after the others stopped.
    reqs = [GenerationRequest(f"c{i}", [1, 70, 80], SamplingParams(temperature=0.0, **kw)) for i, kw in enumerate(cases)]
    reqs += [greedy(f"g{i}", p, 9, stop=["zz"]) for i, p in enumerate(prompts(3, seed=4))]
    sync = make_engine(num_blocks=64, block_size=4, async_scheduling=False)
    asy = make_engine(num_blocks=64, block_size=4, async_scheduling=True)
    a, b = collect(sync, reqs), collect(asy, reqs)
    assert a == b
    assert b["c0"] == ([x] * 5, "xxxxx", "length")
    assert b["c1"] == ([x], "", "stop")
    assert b["c2"] == ([2], "", "stop")
    assert b["c4"][1] == "" and b["c4"][2] == "stop"


def test_async_host_sampler_rows_mixed_with_device_rows(make_engine) -> None:
    """Seeded, penalised and logprob requests need the host sampler: those steps process the
    previous step's tokens first and then their own."""
    ps = prompts(6, seed=7)
    reqs = [
        greedy("g0", ps[0], 10),
        GenerationRequest("s1", ps[1], SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True)),
        greedy("g2", ps[2], 14),
        GenerationRequest("p3", ps[3], SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5, ignore_eos=True)),
        GenerationRequest("l4", ps[4], SamplingParams(max_tokens=6, temperature=0.0, logprobs=2, ignore_eos=True)),
        greedy("g5", ps[5], 3),
    ]
    opts = dict(num_blocks=64, block_size=4, max_num_batched_tokens=16)
    sync = make_engine(async_scheduling=False, **opts)
    asy = make_engine(async_scheduling=True, **opts)
    assert collect(sync, reqs) == collect(asy, reqs)
    # Only greedy rows: every step stays on the device path.
    only_greedy = [r for r in reqs if r.request_id.startswith("g")]
    assert collect(sync, only_greedy) == collect(asy, only_greedy)


def test_async_abort_with_a_step_in_flight(make_engine) -> None:
    engine = make_engine(num_blocks=64, block_size=4, async_scheduling=True)
    ps = prompts(2, seed=5, lo=20, hi=25)
    engine.add_request(greedy("keep", ps[0], 10))
    engine.add_request(greedy("drop", ps[1], 50))
    for _ in range(3):
        engine.step()
    assert engine._inflight is not None
    held = len(engine.requests["drop"].seqs[0].block_table)
    free_before = engine.block_manager.num_free_blocks
    assert engine.abort("drop")
    assert engine.block_manager.num_free_blocks == free_before + held
    got: list[int] = []
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id == "keep"
            got += o.delta.token_ids
    assert len(got) == 10 - 2  # two tokens came back from the first three steps
    ref = make_engine(num_blocks=64, block_size=4, async_scheduling=False)
    assert ref.generate_sync([greedy("keep", ps[0], 10)])["keep"][2:] == got
    assert_blocks_all_free(engine)


def test_async_prefix_cache_hashes_only_known_tokens(make_engine) -> None:
    engine = make_engine(num_blocks=64, block_size=4, async_scheduling=True)
    system = [1] + list(range(10, 30))
    a = engine.generate_sync([greedy("a", system + [40, 41, 42], 9)])["a"]
    # A second request whose prompt is a's prompt + output reuses a's blocks, output included.
    hits = engine.block_manager.prefix_hits
    full = system + [40, 41, 42] + a
    b = engine.generate_sync([greedy("b", full, 4)])["b"]
    assert engine.block_manager.prefix_hits - hits == (len(full) - 1) // 4 * 4
    ref = make_engine(num_blocks=64, block_size=4, async_scheduling=False, enable_prefix_caching=False)
    assert ref.generate_sync([greedy("b", full, 4)])["b"] == b
    assert torch.is_grad_enabled()  # nothing left inference mode switched on
