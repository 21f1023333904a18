"""Embeddings through an engine worker: the answer in one message, loaded on demand with the
request's keep_alive, aborted when the caller leaves, a clean error when the worker dies, and
a `task: embed` backend that refuses chat and completions."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import numpy as np
import pytest

from backends.embeddings import decode_base64
from backends.protocol import ChatCompletionRequest, EmbeddingRequest, Embeds, InvalidRequest
from backends.worker.backend import WorkerBackend
from backends.worker.pipe import WorkerDied
from gateway.registry import build_backend
from policies.schema import BackendConfig
from tests.unit.worker.test_worker_backend import NUM_BLOCKS, prompt, wait_for

pytestmark = pytest.mark.timeout(120)

OPTIONS = {"num_blocks": NUM_BLOCKS, "block_size": 4, "max_num_seqs": 4, "num_threads": 1, "max_num_batched_tokens": 32}


def worker(model: str = "dummy:tiny", options: dict[str, object] | None = None, **fields: object) -> WorkerBackend:
    backend = build_backend(BackendConfig(name="e", kind="paged", model=model, options=options or OPTIONS, **fields))  # type: ignore[arg-type]
    assert isinstance(backend, WorkerBackend)
    return backend


@pytest.fixture
async def backend() -> AsyncIterator[WorkerBackend]:
    b = worker()
    yield b
    await b.close()


async def test_embeddings_load_on_demand_and_come_back_whole(backend: WorkerBackend) -> None:
    assert isinstance(backend, Embeds) and backend.state == "unloaded"
    res = await backend.embeddings(EmbeddingRequest(model="e", input=["hello there", "general kenobi", "hi"]))
    assert backend.state == "ready"
    assert [d.index for d in res.data] == [0, 1, 2] and res.model == "e"
    vectors = [np.array(d.embedding) for d in res.data]
    assert all(v.shape == (64,) and abs(np.linalg.norm(v) - 1) < 1e-5 for v in vectors)
    assert res.usage.prompt_tokens == res.usage.total_tokens > 0
    b64 = await backend.embeddings(EmbeddingRequest(model="e", input=["hello there"], encoding_format="base64"))
    assert isinstance(b64.data[0].embedding, str)
    np.testing.assert_allclose(decode_base64(b64.data[0].embedding), vectors[0], atol=1e-6)
    assert backend.in_flight == 0
    await wait_for(lambda: backend.load().kv_free_blocks == NUM_BLOCKS)


async def test_errors_cross_the_pipe_in_their_own_shape(backend: WorkerBackend) -> None:
    with pytest.raises(InvalidRequest) as dims:
        await backend.embeddings(EmbeddingRequest(model="e", input="hi", dimensions=8))
    assert dims.value.param == "dimensions"
    with pytest.raises(InvalidRequest) as vocab:
        await backend.embeddings(EmbeddingRequest(model="e", input=[[5, 6], [1, 99999]]))
    assert vocab.value.param == "input.1"


async def test_a_request_keep_alive_wins() -> None:
    backend = worker(keep_alive=-1)
    try:
        await backend.embeddings(EmbeddingRequest(model="e", input="hi", keep_alive=0))
        await wait_for(lambda: backend.state == "unloaded", 10)
    finally:
        await backend.close()


async def test_a_caller_that_leaves_aborts_it_in_the_worker(backend: WorkerBackend) -> None:
    await backend.embeddings(EmbeddingRequest(model="e", input="hi"))  # loaded
    long = EmbeddingRequest(model="e", input=[[7] * 250] * 400)  # 100k tokens: thousands of steps of 32
    task = asyncio.ensure_future(backend.embeddings(long))
    await wait_for(lambda: backend.load().kv_free_blocks < NUM_BLOCKS, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: backend.load().kv_free_blocks == NUM_BLOCKS and backend.load().running == 0)
    assert backend.in_flight == 0
    assert (await backend.embeddings(EmbeddingRequest(model="e", input="hi"))).data


async def test_a_worker_that_dies_fails_the_request_cleanly() -> None:
    # SmolLM2's shape on random weights: slow enough on one thread to be killed mid-request.
    backend = worker("dummy:smollm2-135m", {"num_blocks": 256, "block_size": 16, "num_threads": 1, "max_num_batched_tokens": 64})
    try:
        await backend.embeddings(EmbeddingRequest(model="e", input="hi"))
        pid = backend.pid
        assert pid is not None
        task = asyncio.ensure_future(backend.embeddings(EmbeddingRequest(model="e", input=[[7] * 1000] * 4)))
        await wait_for(lambda: backend.load().running >= 1, 10)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerDied, match="SIGKILL"):
            await asyncio.wait_for(task, 30)
        assert backend.in_flight == 0
        await wait_for(lambda: backend.state == "ready")
        assert (await backend.embeddings(EmbeddingRequest(model="e", input="hi"))).data
    finally:
        await backend.close()


async def test_task_embed_refuses_chat_and_completions_without_loading() -> None:
    backend = worker(task="embed")
    try:
        with pytest.raises(InvalidRequest, match="embedding model") as chat:
            await backend.chat(ChatCompletionRequest(model="e", messages=[{"role": "user", "content": "hi"}]))  # type: ignore[list-item]
        assert chat.value.status == 400 and chat.value.param == "model"
        with pytest.raises(InvalidRequest, match="embedding model"):
            await backend.completion(prompt())
        with pytest.raises(InvalidRequest, match="embedding model"):
            await anext(backend.completion_stream(prompt(stream=True)))
        assert backend.state == "unloaded"
        assert (await backend.embeddings(EmbeddingRequest(model="e", input="hi"))).data
    finally:
        await backend.close()
