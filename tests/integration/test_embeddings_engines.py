"""Embeddings from the real SmolLM2-135M GGUF through both local engines, each in its engine
worker (built as the gateway builds them): the llama.cpp runner (embedding-mode instance,
last-token pooling) and the paged engine (the same Q4_1 weights, dequantized to fp32).

Agreement: measured cosine between the two engines' vectors for the same text is 0.9997 to
0.9999 on this box; the bound is 0.995, below that by a margin for other CPUs' kernels but far
above what different pooling or a wrong token would give (mean vs last: about 0.8)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest
import pytest_asyncio

from backends.embeddings import decode_base64
from backends.protocol import ChatCompletionRequest, ContextLengthExceeded, EmbeddingRequest, InvalidRequest
from backends.worker.backend import WorkerBackend
from gateway.registry import build_backend
from policies.schema import BackendConfig

# One event loop for the module: the workers are started once and shared by the tests.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300), pytest.mark.asyncio(loop_scope="module")]

TEXTS = [
    "The cat sat on the mat.",
    "A kitten was sitting on the rug.",
    "Quarterly revenue grew by twelve percent.",
    "The central bank raised interest rates again.",
]
AGREE = 0.995
N_CTX = 256


def config(kind: str, **fields: object) -> BackendConfig:
    options: dict[str, object] = {"n_ctx": N_CTX, "n_threads": 1} if kind == "llamacpp" else {"max_model_len": N_CTX, "num_threads": 1}
    return BackendConfig(name=kind, kind=kind, model="smollm2-135m", options=options, **fields)  # type: ignore[arg-type]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines(model_path) -> AsyncIterator[dict[str, WorkerBackend]]:  # type: ignore[no-untyped-def]
    built = {kind: build_backend(config(kind)) for kind in ("llamacpp", "paged")}
    assert all(isinstance(b, WorkerBackend) for b in built.values())
    yield built  # type: ignore[misc]
    for b in built.values():
        await b.close()


async def vectors(backend: WorkerBackend, texts: list[str], **fields: object) -> np.ndarray:
    res = await backend.embeddings(EmbeddingRequest(model="s", input=texts, **fields))  # type: ignore[arg-type]
    return np.array([d.embedding for d in res.data])


async def test_the_engines_agree_and_similar_texts_are_closer(engines: dict[str, WorkerBackend]) -> None:
    llama, paged = await vectors(engines["llamacpp"], TEXTS), await vectors(engines["paged"], TEXTS)
    for v in (llama, paged):
        assert v.shape == (4, 576)
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
        sim = v @ v.T
        assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[0, 3]  # cats with cats
        assert sim[2, 3] > sim[2, 1]  # money with money
    cosine = (llama * paged).sum(1)
    assert (cosine > AGREE).all(), cosine


@pytest.mark.parametrize("kind", ["llamacpp", "paged"])
async def test_batched_equals_one_by_one_and_usage(engines: dict[str, WorkerBackend], kind: str) -> None:
    backend = engines[kind]
    res = await backend.embeddings(EmbeddingRequest(model="s", input=TEXTS))
    alone = [await vectors(backend, [t]) for t in TEXTS]
    for d, one in zip(res.data, alone):
        np.testing.assert_allclose(d.embedding, one[0], atol=2e-3)
    counted = sum([(await backend.embeddings(EmbeddingRequest(model="s", input=t))).usage.prompt_tokens for t in TEXTS])
    assert res.usage.prompt_tokens == res.usage.total_tokens == counted > len(TEXTS)


@pytest.mark.parametrize("kind", ["llamacpp", "paged"])
async def test_base64_context_dimensions_and_truncate(engines: dict[str, WorkerBackend], kind: str) -> None:
    backend = engines[kind]
    floats = await vectors(backend, TEXTS[:1])
    b64 = await backend.embeddings(EmbeddingRequest(model="s", input=TEXTS[:1], encoding_format="base64"))
    assert isinstance(b64.data[0].embedding, str)
    np.testing.assert_allclose(decode_base64(b64.data[0].embedding), floats[0], atol=1e-6)

    long = "word " * (N_CTX * 2)
    with pytest.raises(ContextLengthExceeded) as exc:
        await backend.embeddings(EmbeddingRequest(model="s", input=["short", long]))
    assert exc.value.status == 400 and exc.value.param == "input.1"
    cut = await backend.embeddings(EmbeddingRequest(model="s", input=["short", long], truncate=True))
    assert len(cut.data) == 2 and cut.usage.prompt_tokens <= N_CTX + 2

    with pytest.raises(InvalidRequest) as dims:
        await backend.embeddings(EmbeddingRequest(model="s", input="hi", dimensions=128))
    assert dims.value.param == "dimensions"
    same = await backend.embeddings(EmbeddingRequest(model="s", input="hi", dimensions=576))
    assert len(same.data[0].embedding) == 576


@pytest.mark.parametrize("kind", ["llamacpp", "paged"])
async def test_task_embed_serves_embeddings_and_refuses_chat(model_path, kind: str) -> None:  # type: ignore[no-untyped-def]
    backend = build_backend(config(kind, task="embed", keep_alive=0))
    assert isinstance(backend, WorkerBackend)
    try:
        with pytest.raises(InvalidRequest, match="embedding model"):
            await backend.chat(ChatCompletionRequest(model="s", messages=[{"role": "user", "content": "hi"}]))  # type: ignore[list-item]
        v = await vectors(backend, TEXTS[:2])
        assert v.shape == (2, 576) and v[0] @ v[1] > 0.5
    finally:
        await backend.close()
