"""PagedBackend and the async engine on a tiny random model: the Backend protocol, load
reports, metrics, and abort-on-close freeing blocks at once."""

from __future__ import annotations

import asyncio

import pytest

from backends.generation import GenerationRequest, SamplingParams
from backends.paged.backend import PagedBackend
from backends.protocol import Backend, ChatCompletionRequest, CompletionRequest, ContextLengthExceeded, LoadReport

from .conftest import assert_blocks_all_free


@pytest.fixture
async def backend():
    b = PagedBackend(name="tiny", model="dummy:tiny", num_blocks=64, block_size=4, max_num_seqs=4)
    await b.start()
    yield b
    await b.close()
    assert_blocks_all_free(b.engine)


def long_request(rid: str = "long") -> GenerationRequest:
    return GenerationRequest(rid, [1, 10, 20, 30, 40, 50], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))


async def test_is_a_backend_and_reports_load(backend: PagedBackend) -> None:
    assert isinstance(backend, Backend)
    assert backend.models()[0].id == "dummy:tiny" and backend.models()[0].max_model_len == 256
    report = backend.load()
    assert isinstance(report, LoadReport)
    assert (report.kv_usage, report.kv_free_blocks, report.block_size, report.max_running) == (0.0, 64, 4, 4)
    assert report.healthy
    assert "named_metrics.kv_free_blocks=64" in report.to_header()


async def test_completion_and_stream(backend: PagedBackend) -> None:
    req = CompletionRequest(model="dummy:tiny", prompt="hello", max_tokens=5, temperature=0.0, seed=1, ignore_eos=True)
    full = await backend.completion(req)
    assert full.usage.completion_tokens == 5 and full.usage.prompt_tokens == 6  # BOS + 5 bytes
    assert full.choices[0].finish_reason == "length"
    streamed = [c async for c in backend.completion_stream(req.model_copy(update={"stream": True}))]
    assert "".join(c.choices[0].text for c in streamed) == full.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"


async def test_context_window_is_enforced(backend: PagedBackend) -> None:
    with pytest.raises(ContextLengthExceeded):
        await backend.completion(CompletionRequest(model="m", prompt="x" * 250, max_tokens=20))


async def test_closing_the_stream_aborts_and_frees_blocks_at_once(backend: PagedBackend) -> None:
    bm = backend.engine.block_manager
    stream = backend.generate(long_request())
    got = [await stream.__anext__() for _ in range(3)]
    assert all(d.finish_reason is None for d in got)
    assert bm.num_free_blocks < bm.num_blocks
    running = backend.load().running
    assert running == 1
    await stream.aclose()
    assert bm.num_free_blocks == bm.num_blocks  # no waiting: aclose returns after the free
    assert backend.load().running == 0


async def test_cancelled_consumer_frees_blocks(backend: PagedBackend) -> None:
    """A client disconnect cancels the task that is iterating the stream."""
    bm = backend.engine.block_manager
    seen = asyncio.Event()

    req = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=200, temperature=0.0, ignore_eos=True, stream=True
    )

    async def consume() -> None:
        async for _ in backend.chat_stream(req):
            seen.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(seen.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if bm.num_free_blocks == bm.num_blocks:
            break
        await asyncio.sleep(0.01)
    assert bm.num_free_blocks == bm.num_blocks


async def test_concurrent_requests_and_stats(backend: PagedBackend) -> None:
    reqs = [CompletionRequest(model="m", prompt=f"prompt {i}", max_tokens=8, temperature=0.0, ignore_eos=True) for i in range(6)]
    outs = await asyncio.gather(*(backend.completion(r) for r in reqs))
    assert all(o.usage.completion_tokens == 8 for o in outs)
    s = backend.stats()
    assert s["vllm:generation_tokens"] == 48
    assert s["vllm:num_requests_running"] == 0 and s["vllm:num_requests_waiting"] == 0
    assert s["vllm:kv_cache_usage_perc"] == 0.0
    # BOS + "prompt i" is 9 byte tokens: the first two blocks of 4 are shared by all six.
    assert s["vllm:prefix_cache_hits"] > 0


def test_unknown_option_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown paged backend option"):
        PagedBackend(name="x", model="dummy:tiny", block_sise=8)


async def test_start_builds_through_from_model_with_what_init_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """One construction path (LLMEngine.from_model), and the shape and tokenizer read at
    __init__ are reused: a GGUF's metadata is not parsed a second time at start()."""
    import backends.paged.engine as engine_module

    b = PagedBackend(name="tiny", model="dummy:tiny", num_blocks=16, block_size=4, max_num_seqs=2)
    built = []
    real = engine_module.LLMEngine.from_model.__func__

    def from_model(cls, *args, **kwargs):
        engine = real(cls, *args, **kwargs)
        built.append(engine)
        return engine

    def no_second_read(source):
        raise AssertionError("the config and tokenizer were read again")

    monkeypatch.setattr(engine_module.LLMEngine, "from_model", classmethod(from_model))
    monkeypatch.setattr(engine_module, "load_config_and_tokenizer", no_second_read)
    await b.start()
    try:
        assert built == [b.engine] and b.engine.config is b._config and b.engine.tokenizer is b._tokenizer
        assert b.engine.options is b.options and b.engine.block_manager.num_blocks == 16
    finally:
        await b.close()
    assert_blocks_all_free(b.engine)


async def test_engine_thread_time_and_step_counters_are_reported(backend: PagedBackend) -> None:
    """The engine thread's idle / deliver / drain seconds and the engine's step counters grow
    and reach stats(), under the names gateway.metrics exports."""
    runner = backend._engine()
    await asyncio.sleep(0.05)  # the thread waits: nothing unfinished yet
    assert runner.idle_seconds() > 0  # counted while the wait is still in progress
    deltas = [d async for d in runner.generate(long_request("timed"))]
    assert sum(len(d.token_ids) for d in deltas) == 200
    assert runner.idle_s > 0 and runner.deliver_s > 0 and runner.drain_s > 0
    engine_stats = backend.engine.stats()
    assert engine_stats["turnout:paged_step_seconds"] > 0
    assert engine_stats["turnout:paged_decode_tokens"] >= 199  # every token after the first is a decode
    assert engine_stats["turnout:paged_prefill_tokens"] >= 6
    assert engine_stats["turnout:paged_graph_steps"] == 0  # no CUDA graphs on the CPU
    assert engine_stats["turnout:paged_sync_wait_seconds"] == 0.0  # the CPU samples in the step: nothing to wait for
    s = backend.stats()
    assert s["turnout:paged_deliver_seconds"] == runner.deliver_s and s["turnout:paged_drain_seconds"] == runner.drain_s
    assert s["turnout:paged_idle_seconds"] >= runner.idle_s
    # The parts fit inside the thread's wall.
    parts = s["turnout:paged_step_seconds"] + s["turnout:paged_deliver_seconds"] + s["turnout:paged_drain_seconds"]
    assert 0 < parts + s["turnout:paged_idle_seconds"] <= s["turnout:paged_loop_seconds"] + 1e-3
