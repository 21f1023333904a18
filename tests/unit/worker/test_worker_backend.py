"""WorkerBackend over real engine worker processes (the paged engine on a tiny random model):
errors cross the pipe in their own shape, a killed worker fails its requests cleanly and is
restarted, an early close frees KV blocks in the worker, keep_alive unloads, a load failure
is answered and retried on the next request only, and the memory budget unloads the least
recently used idle model."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import pytest

from backends.protocol import Backend, CompletionRequest, ContextLengthExceeded, Overloaded
from backends.worker.backend import WorkerBackend
from backends.worker.pipe import LoadError, WorkerDied
from gateway.registry import build_backend
from gateway.residency import ModelResidency
from policies.schema import BackendConfig

pytestmark = pytest.mark.timeout(120)

NUM_BLOCKS = 64


def tiny(name: str = "tiny", model: str = "dummy:tiny", num_blocks: int = NUM_BLOCKS, **fields: object) -> WorkerBackend:
    cfg = BackendConfig(
        name=name, kind="paged", model=model, options={"num_blocks": num_blocks, "block_size": 4, "max_num_seqs": 4, "num_threads": 1}, **fields
    )  # fmt: skip
    backend = build_backend(cfg)
    assert isinstance(backend, WorkerBackend)
    return backend


def prompt(max_tokens: int = 8, **fields: object) -> CompletionRequest:
    return CompletionRequest(model="tiny", prompt="hello there", max_tokens=max_tokens, temperature=0, **fields)  # type: ignore[arg-type]


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); it is gone once it is no longer running.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] == "Z"


async def wait_for(condition, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


@pytest.fixture
async def backend() -> AsyncIterator[WorkerBackend]:
    b = tiny()
    yield b
    await b.close()


async def test_loads_on_first_request_and_answers(backend: WorkerBackend) -> None:
    assert isinstance(backend, Backend)
    assert backend.state == "unloaded" and backend.pid is None and backend.load().healthy
    answer = await backend.completion(prompt())
    assert backend.state == "ready" and backend.pid not in (None, os.getpid())
    assert answer.usage is not None and answer.usage.completion_tokens == 8
    again = await backend.completion(prompt())
    assert again.choices[0].text == answer.choices[0].text  # greedy, same worker
    streamed = [c async for c in backend.completion_stream(prompt(stream=True))]
    assert "".join(c.choices[0].text for c in streamed if c.choices) == answer.choices[0].text
    await wait_for(lambda: backend.load().kv_free_blocks == NUM_BLOCKS)
    assert backend.models()[0].max_model_len == 256 and backend.load().block_size == 4
    await wait_for(lambda: backend.stats().get("vllm:generation_tokens", 0) >= 24)  # counters ride on load reports


async def test_errors_keep_their_shape_across_the_pipe(backend: WorkerBackend) -> None:
    with pytest.raises(ContextLengthExceeded) as err:
        await backend.completion(prompt(max_tokens=10_000))
    assert err.value.status == 400 and err.value.param == "max_tokens"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGILL])
async def test_killed_mid_stream_fails_cleanly_restarts_and_frees_everything(backend: WorkerBackend, sig: signal.Signals) -> None:
    await backend.completion(prompt())
    pid = backend.pid
    assert pid is not None
    seen = 0
    with pytest.raises(WorkerDied) as err:
        async for _ in backend.completion_stream(prompt(max_tokens=200, ignore_eos=True, stream=True)):
            seen += 1
            if seen == 3:
                os.kill(pid, sig)
    assert err.value.status == 502 and "'tiny'" in err.value.message and sig.name in err.value.message
    assert backend.state == "restarting" and not backend.load().healthy
    with pytest.raises(Overloaded, match="restarting"):  # 503 + Retry-After while it comes back
        await backend.completion(prompt())
    await wait_for(lambda: backend.state == "ready")
    assert backend.restarts == 1 and backend.pid != pid and process_gone(pid) and backend.last_exit == sig.name
    assert (await backend.completion(prompt())).usage.completion_tokens == 8  # type: ignore[union-attr]
    await wait_for(lambda: backend.load().kv_free_blocks == NUM_BLOCKS and backend.in_flight == 0)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGILL])
async def test_killed_mid_answer_names_the_signal(sig: signal.Signals) -> None:
    # The model's whole context (1,024 tokens), so that the answer is still running when the
    # kill lands: a 200-token one could finish first on a fast or a loaded machine (the
    # "running" it waits for comes with a load report, up to 0.1 s late).
    backend = tiny(num_blocks=256)
    try:
        await backend.completion(prompt())
        pid = backend.pid
        assert pid is not None
        answer = asyncio.ensure_future(backend.completion(prompt(max_tokens=1000, ignore_eos=True)))
        await wait_for(lambda: backend.load().running == 1)
        os.kill(pid, sig)
        with pytest.raises(WorkerDied, match=sig.name):
            await answer
        assert backend.in_flight == 0
        await wait_for(lambda: backend.state == "ready")
        assert (await backend.completion(prompt())).usage.completion_tokens == 8  # type: ignore[union-attr]
    finally:
        await backend.close()


async def test_closing_a_stream_early_aborts_it_in_the_worker(backend: WorkerBackend) -> None:
    stream = backend.completion_stream(prompt(max_tokens=200, ignore_eos=True, stream=True))
    await anext(stream)
    await wait_for(lambda: backend.load().kv_free_blocks < NUM_BLOCKS)
    await stream.aclose()
    await wait_for(lambda: backend.load().kv_free_blocks == NUM_BLOCKS and backend.load().running == 0)
    assert backend.in_flight == 0


async def test_keep_alive_unloads_and_a_request_keep_alive_wins() -> None:
    backend = tiny(keep_alive=0.5)
    try:
        await backend.completion(prompt())
        pid = backend.pid
        assert pid is not None and backend.expires_at is not None
        await wait_for(lambda: backend.state == "unloaded")
        assert backend.pid is None and backend.expires_at is None
        await wait_for(lambda: process_gone(pid), 10)
        await backend.completion(prompt(keep_alive=-1))  # loads again, and stays
        await asyncio.sleep(1.0)
        assert backend.state == "ready" and backend.expires_at is None
        await backend.completion(prompt(keep_alive=0))  # unloads once done
        await wait_for(lambda: backend.state == "unloaded", 10)
    finally:
        await backend.close()


async def test_a_failed_load_is_answered_and_retried_on_the_next_request_only() -> None:
    backend = tiny(model="dummy:no-such-shape")
    try:
        with pytest.raises(LoadError, match="could not load model 'dummy:no-such-shape'") as err:
            await backend.completion(prompt())
        assert err.value.status == 502 and backend.state == "failed" and backend.pid is None
        await asyncio.sleep(1.0)
        assert backend.state == "failed" and backend.restarts == 0  # no retry loop
        with pytest.raises(LoadError):
            await backend.completion(prompt())  # tried again, because a request came
    finally:
        await backend.close()


async def test_the_memory_budget_unloads_the_least_recently_used_idle_model() -> None:
    backends: dict[str, WorkerBackend] = {}
    residency = ModelResidency(0.001, lambda: backends.values())  # ~1 MiB: one model at a time
    for name in ("a", "b"):
        cfg = BackendConfig(name=name, kind="paged", model="dummy:tiny", options={"num_blocks": 16, "block_size": 4, "num_threads": 1})
        backends[name] = build_backend(cfg, residency)  # type: ignore[assignment]
    try:
        await backends["a"].completion(prompt())
        assert backends["a"].loaded and backends["a"].memory_bytes() > 0
        await backends["b"].completion(prompt())
        assert backends["b"].loaded and not backends["a"].loaded
    finally:
        for b in backends.values():
            await b.close()
