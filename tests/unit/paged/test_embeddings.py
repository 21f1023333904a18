"""Embeddings through the paged engine (CPU, dummy weights): prefill-only sequences pooled
over the last hidden states, batched with generations under the scheduler's token budget."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from backends.embeddings import pool
from backends.generation import GenerationRequest, SamplingParams
from backends.paged.async_engine import AsyncEngine
from backends.paged.backend import PagedBackend
from backends.paged.engine import LLMEngine
from backends.paged.pooling import PoolingRequest
from backends.protocol import ChatCompletionRequest, ContextLengthExceeded, EmbeddingRequest, InvalidRequest
from tests.unit.paged.conftest import assert_blocks_all_free

INPUTS = [[5 + (i * 7 + j) % 200 for j in range(n)] for i, n in enumerate([3, 17, 40, 1, 33, 64])]


def _dense_hidden(m, tokens: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """LlamaModel.dense_logits' path without the lm head: causal attention, no cache."""
    from backends.paged.model import _rotate_half, rms_norm

    c = m.config
    ids = torch.tensor(tokens)
    T = ids.shape[0]
    nh, nkv, hd = c.num_heads, c.num_kv_heads, c.head_dim
    pos = torch.arange(T)
    cos, sin = m._cos[pos][:, None, :], m._sin[pos][:, None, :]
    h = m.w.embed[ids]
    for layer in m.w.layers:
        x = rms_norm(h, layer.attn_norm, c.rms_norm_eps)
        q, k, v = torch.nn.functional.linear(x, layer.qkv, layer.qkv_bias).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q, k, v = q.reshape(T, nh, hd), k.reshape(T, nkv, hd), v.reshape(T, nkv, hd)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        o = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        h = h + torch.nn.functional.linear(o.transpose(0, 1).reshape(T, nh * hd), layer.o)
        x = rms_norm(h, layer.ffn_norm, c.rms_norm_eps)
        gate, up = torch.nn.functional.linear(x, layer.gate_up).chunk(2, dim=-1)
        h = h + torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, layer.down)
    return rms_norm(h, m.w.final_norm, c.rms_norm_eps)


def embed(engine: LLMEngine, inputs: list[list[int]], pooling: str = "mean", rid: str = "e") -> list[np.ndarray]:
    return engine.embed_sync([PoolingRequest(rid, inputs, pooling)])[rid]  # type: ignore[arg-type]


def close(a: list[np.ndarray], b: list[np.ndarray], tol: float = 1e-4) -> bool:
    return len(a) == len(b) and all(np.allclose(x, y, atol=tol, rtol=tol) for x, y in zip(a, b))


@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
def test_pooled_vectors_match_a_dense_forward(make_engine, pooling: str) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine()
    got = embed(engine, INPUTS, pooling)
    assert engine.runner.model is not None
    for tokens, vector in zip(INPUTS, got):
        want = pool(_dense_hidden(engine.runner.model, tokens), pooling).numpy()  # type: ignore[arg-type]
        assert vector.shape == (engine.config.hidden_size,)
        np.testing.assert_allclose(vector, want, atol=1e-4, rtol=1e-4)


def test_mean_last_and_cls_differ(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine()
    tokens = [INPUTS[2]]
    mean, last, cls = (embed(engine, tokens, p, rid=p)[0] for p in ("mean", "last", "cls"))
    assert not np.allclose(mean, last) and not np.allclose(mean, cls) and not np.allclose(last, cls)


@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
def test_batched_equals_one_by_one(make_engine, pooling: str) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(enable_prefix_caching=False)
    batched = embed(engine, INPUTS, pooling, rid="all")
    alone = [embed(engine, [t], pooling, rid=f"one{i}")[0] for i, t in enumerate(INPUTS)]
    assert close(batched, alone)


@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
def test_chunked_prefill_equals_unchunked(make_engine, pooling: str) -> None:  # type: ignore[no-untyped-def]
    whole = make_engine(max_num_batched_tokens=4096)
    chunked = make_engine(max_num_batched_tokens=7)  # every input over 7 tokens runs in chunks
    chunked.runner.model = whole.runner.model
    steps_before = chunked.counters.steps
    a, b = embed(whole, INPUTS, pooling), embed(chunked, INPUTS, pooling)
    assert chunked.counters.steps - steps_before >= sum(map(len, INPUTS)) // 7  # it really was chunked
    assert close(a, b)


def test_prefix_cache_does_not_skip_an_embedding_input(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(enable_prefix_caching=True, block_size=4)
    tokens = INPUTS[2]  # 40 tokens: 10 full blocks
    # A generation of the same prompt leaves its blocks in the prefix cache.
    engine.generate_sync([GenerationRequest("g", list(tokens), SamplingParams(max_tokens=2, temperature=0.0))])
    assert engine.block_manager.num_cached_blocks >= 9
    hits = engine.block_manager.prefix_hits
    first = embed(engine, [tokens], "mean", rid="a")[0]
    assert engine.block_manager.prefix_hits == hits, "an embedding input reused cached blocks"
    fresh = make_engine(enable_prefix_caching=False, block_size=4)
    fresh.runner.model = engine.runner.model
    assert close([first], embed(fresh, [tokens], "mean"))


def test_blocks_are_freed_after_the_last_chunk(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(max_num_batched_tokens=16, enable_prefix_caching=False)
    engine.add_request(PoolingRequest("e", [INPUTS[2]], "mean"))  # 40 tokens: 3 steps of 16
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks  # it holds blocks mid-prefill
    outputs = engine.step() + engine.step()
    assert [o.request_id for o in outputs] == ["e"]
    assert_blocks_all_free(engine)  # freed in the step of its last chunk, not later


def test_generations_and_embeddings_mixed_in_one_engine(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(max_num_batched_tokens=24)
    alone_engine = make_engine(max_num_batched_tokens=24)
    alone_engine.runner.model = engine.runner.model
    gens = [GenerationRequest(f"g{i}", INPUTS[i + 1], SamplingParams(max_tokens=6, temperature=0.0)) for i in range(3)]
    want_tokens = alone_engine.generate_sync([GenerationRequest(g.request_id, g.prompt_tokens, g.sampling) for g in gens])
    want_vectors = embed(alone_engine, INPUTS, "last", rid="w")

    for g in gens:
        engine.add_request(g)
    engine.add_request(PoolingRequest("e", INPUTS, "last"))
    tokens: dict[str, list[int]] = {g.request_id: [] for g in gens}
    vectors = None
    mixed_step = False
    while engine.has_unfinished():
        running = engine.scheduler.running
        mixed_step |= any(s.pooling is not None for s in running) and any(s.pooling is None for s in running)
        for out in engine.step():
            if out.request_id == "e":
                vectors = out.delta.vectors  # type: ignore[union-attr]
            else:
                tokens[out.request_id] += out.delta.token_ids  # type: ignore[union-attr]
    assert mixed_step, "the embedding never ran beside a generation"
    assert tokens == want_tokens
    assert vectors is not None and close(vectors, want_vectors)


def test_preempted_embedding_is_pooled_again_from_the_start(make_engine) -> None:  # type: ignore[no-untyped-def]
    # A pool too small for everything at once: the scheduler preempts (recompute).
    engine = make_engine(num_blocks=12, block_size=4, max_num_batched_tokens=8, enable_prefix_caching=False, watermark=0.0)
    ref = make_engine(enable_prefix_caching=False)
    ref.runner.model = engine.runner.model
    gen = GenerationRequest("g", INPUTS[1], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    engine.add_request(gen)
    engine.add_request(PoolingRequest("e", [INPUTS[4]], "mean"))
    got = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == "e":
                got = out.delta.vectors  # type: ignore[union-attr]
    assert engine.scheduler.num_preemptions > 0
    assert got is not None and close(got, embed(ref, [INPUTS[4]], "mean"))


def test_abort_frees_an_embedding_request(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(max_num_batched_tokens=8)
    engine.add_request(PoolingRequest("e", INPUTS, "mean"))
    engine.step()
    assert engine.abort("e")
    assert not engine.has_unfinished()
    assert_blocks_all_free(engine)


def test_engine_refuses_inputs_it_cannot_take(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(max_model_len=32)
    with pytest.raises(ContextLengthExceeded) as exc:
        engine.add_request(PoolingRequest("e", [[5], [5] * 33], "mean"))
    assert exc.value.param == "input.1"
    with pytest.raises(InvalidRequest) as bad:
        engine.add_request(PoolingRequest("e", [[5, 100000]], "mean"))
    assert bad.value.param == "input.0"


async def test_async_engine_embeds_and_cancels() -> None:
    engine = LLMEngine.from_model("dummy:tiny", max_num_batched_tokens=8)
    runner = AsyncEngine(engine)
    runner.start()
    try:
        out = await runner.embed(PoolingRequest("a", INPUTS[:3], "last"))
        assert len(out.vectors) == 3 and out.num_tokens == sum(map(len, INPUTS[:3]))
        task = asyncio.ensure_future(runner.embed(PoolingRequest("b", [[7] * 300] * 8, "mean")))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if not engine.has_unfinished():
                break
            await asyncio.sleep(0.02)
        assert_blocks_all_free(engine)
    finally:
        runner.shutdown()


async def test_backend_embeddings_and_task_embed() -> None:
    backend = PagedBackend("p", "dummy:tiny", task="embed", max_model_len=64, pooling="mean", matryoshka=[16, 32])
    await backend.start()
    try:
        assert backend.engine is not None and backend.engine.runner.graphs is None
        res = await backend.embeddings(EmbeddingRequest(model="m", input=["hello", "world"]))
        assert [d.index for d in res.data] == [0, 1]
        vec = np.array(res.data[0].embedding)
        assert vec.shape == (64,) and abs(np.linalg.norm(vec) - 1) < 1e-5
        assert res.usage.prompt_tokens == len(backend.tokenize("hello")) + len(backend.tokenize("world"))
        cut = await backend.embeddings(EmbeddingRequest(model="m", input="hello", dimensions=16))
        cut_vec = np.array(cut.data[0].embedding)
        assert cut_vec.shape == (16,) and abs(np.linalg.norm(cut_vec) - 1) < 1e-5
        np.testing.assert_allclose(cut_vec, vec[:16] / np.linalg.norm(vec[:16]), atol=1e-5)
        with pytest.raises(InvalidRequest) as dims:
            await backend.embeddings(EmbeddingRequest(model="m", input="hello", dimensions=20))
        assert dims.value.param == "dimensions"
        with pytest.raises(ContextLengthExceeded) as long:
            await backend.embeddings(EmbeddingRequest(model="m", input=["a", "x" * 100]))
        assert long.value.param == "input.1"
        cut_long = await backend.embeddings(EmbeddingRequest(model="m", input=["x" * 100], truncate=True))
        assert cut_long.usage.prompt_tokens == 64
        with pytest.raises(InvalidRequest) as chat:
            await backend.chat(ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}]))
        assert "embedding model" in chat.value.message
    finally:
        await backend.close()
