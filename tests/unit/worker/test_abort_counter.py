"""The engine worker counts the requests the gateway aborted (`turnout:requests_aborted`),
streamed or not, and only those: answers that ran to their end are not counted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from backends.protocol import CompletionRequest
from backends.worker.backend import WorkerBackend
from backends.worker.server import ABORTED
from gateway.registry import build_backend
from policies.schema import BackendConfig
from tests.unit.worker.test_worker_backend import wait_for

pytestmark = pytest.mark.timeout(120)

NUM_BLOCKS = 128
LONG = 1000  # tokens: tens of seconds for SmolLM2's shape on one CPU thread, so an abort is seen


def long_prompt(stream: bool) -> CompletionRequest:
    return CompletionRequest(model="s", prompt="hello there", max_tokens=LONG, temperature=0, ignore_eos=True, stream=stream)  # type: ignore[arg-type]


def short_prompt() -> CompletionRequest:
    return CompletionRequest(model="s", prompt="hi", max_tokens=4, temperature=0, ignore_eos=True)  # type: ignore[arg-type]


@pytest.fixture
async def backend() -> AsyncIterator[WorkerBackend]:
    # Random weights of SmolLM2-135M's shape: slow enough per token (the "tiny" shape makes
    # 200 tokens in a tenth of a second) that a request cannot finish before its abort lands.
    options = {"num_blocks": NUM_BLOCKS, "block_size": 16, "max_num_seqs": 2, "num_threads": 1}
    b = build_backend(BackendConfig(name="s", kind="paged", model="dummy:smollm2-135m", options=options))
    assert isinstance(b, WorkerBackend)
    yield b
    await b.close()


async def test_aborted_requests_are_counted_and_finished_ones_are_not(backend: WorkerBackend) -> None:
    done = await backend.completion(short_prompt())
    assert done.usage is not None and done.usage.completion_tokens == 4
    await wait_for(lambda: ABORTED in backend.stats())
    assert backend.stats()[ABORTED] == 0  # reported from the start, and a finished answer is no abort

    stream = backend.completion_stream(long_prompt(stream=True))
    await anext(stream)
    await stream.aclose()  # a streaming client left
    # Both in one report: the count can land a step before the blocks come back, and a stale
    # "blocks in use" would let the next wait pass before the next request has even been sent.
    await wait_for(lambda: backend.stats()[ABORTED] == 1 and backend.load().kv_free_blocks == NUM_BLOCKS)

    waiting = asyncio.create_task(backend.completion(long_prompt(stream=False)))
    await wait_for(lambda: backend.load().kv_free_blocks < NUM_BLOCKS)  # it is generating
    waiting.cancel()  # what the gateway does when a client waiting for a whole answer leaves
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await wait_for(lambda: backend.stats()[ABORTED] == 2 and backend.load().kv_free_blocks == NUM_BLOCKS)
    assert (await backend.completion(short_prompt())).usage
    await asyncio.sleep(0.6)  # a heartbeat later: still two
    assert backend.stats()[ABORTED] == 2
    # The two aborted requests stopped far short of their LONG tokens each.
    assert backend.stats()["vllm:generation_tokens"] < 4 + 4 + LONG / 4
