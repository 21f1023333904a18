"""Admission control in a real gateway: one llama.cpp instance behind routes that each keep
their own admission queue (limit 1), API keys with priority classes from a file store.

Each test holds the route's only slot with a long stream, then shows what happens to the
requests that arrive meanwhile: shed at once when the queue is full or the deadline cannot
be met, served interactive-first when the slot frees, dropped when their client leaves.
Closing the holding stream (a client disconnect) frees the slot at a moment the test picks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.keys import FileKeyStore, new_key
from tests.conftest import Server, llamacpp_config, start_server

pytestmark = pytest.mark.slow

WAIT_S = 15.0  # upper bound on every wait in these tests (they take well under a second each)
HOLD = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
SHORT = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}


def route(model: str, **admission: object) -> dict:
    return {"model": model, "backends": ["local"], "retries": {"max_retries": 0},
            "admission": {"limit": 1, **admission}}  # fmt: skip


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A file key store with one interactive and one batch key; returns (path, secrets)."""
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    store = FileKeyStore(path)
    secrets = {}
    for priority in ("interactive", "batch"):
        secret, record = new_key(f"{priority}-key", priority=priority)  # type: ignore[arg-type]
        store.add(record)
        secrets[priority] = secret
    return path, secrets


@pytest.fixture(scope="module")
def gateway(model_path: Path, keys: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory):
    config = llamacpp_config(model_path, instances=1, max_queue=16, n_threads=1)
    config["server"]["watch_config"] = False
    config["auth"] = {"store": "file", "path": str(keys[0])}
    config["routes"] = [
        route("shed", max_queue=0),
        route("prio", max_queue=4, default_deadline_s=30, batch_deadline_s=30),
        route("gone", max_queue=4, default_deadline_s=30),
        # No slot has been released on this route yet, so the expected wait is the prior
        # mean hold (2 s): more than the 1 s budget.
        route("deadline", max_queue=4, default_deadline_s=1.0),
    ]
    server = start_server(config, tmp_path_factory.mktemp("gw"))
    yield server
    server.stop()


def auth(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def admission_metrics(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value for the turnout:admission_* families."""
    text = httpx.get(server.url + "/metrics", timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("turnout:admission_")
    }


def shed(server: Server, model: str, reason: str) -> float:
    return admission_metrics(server).get(("turnout:admission_shed_total", (("model", model), ("reason", reason))), 0.0)


def in_use(server: Server, model: str) -> float:
    return admission_metrics(server)[("turnout:admission_in_use", (("model", model),))]


def depth(server: Server, model: str, priority: str) -> float:
    return admission_metrics(server)[("turnout:admission_queue_depth", (("model", model), ("priority", priority)))]


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` (blocking calls run in a thread) until true, or fail after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if await asyncio.to_thread(condition):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {what}")


@asynccontextmanager
async def holding_slot(client: httpx.AsyncClient, model: str, secret: str) -> AsyncIterator[None]:
    """A stream on `model` that holds its only slot until the block ends (the client closes
    the stream: a disconnect, which releases the slot)."""
    async with client.stream("POST", "/completions", json={"model": model, **HOLD}, headers=auth(secret)) as r:
        assert r.status_code == 200
        lines = r.aiter_lines()
        while not (await anext(lines)).startswith("data: {"):
            pass  # the first token: the request holds its slot
        yield


async def complete(client: httpx.AsyncClient, model: str, secret: str) -> httpx.Response:
    return await client.post("/completions", json={"model": model, **SHORT}, headers=auth(secret))


def client_for(server: Server, timeout: float = WAIT_S) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.base_url, timeout=timeout)


def test_full_queue_sheds_with_503_and_retry_after(gateway: Server, keys: tuple[Path, dict[str, str]]) -> None:
    secret = keys[1]["interactive"]

    async def run() -> None:
        async with client_for(gateway) as client:
            before = shed(gateway, "shed", "queue_full")
            async with holding_slot(client, "shed", secret):
                started = time.monotonic()
                r = await complete(client, "shed", secret)
                elapsed = time.monotonic() - started
                assert r.status_code == 503, r.text
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["code"] == "overloaded"
                assert elapsed < 2.0  # refused at once, not after a wait
                assert shed(gateway, "shed", "queue_full") == before + 1
            await until(lambda: in_use(gateway, "shed") == 0, "the holder's slot to be released")
            assert (await complete(client, "shed", secret)).status_code == 200  # a free slot serves

    asyncio.run(run())


def test_interactive_is_served_before_earlier_batch(gateway: Server, keys: tuple[Path, dict[str, str]]) -> None:
    secrets = keys[1]

    async def run() -> None:
        finished: list[str] = []

        async def request(priority: str) -> int:
            r = await complete(client, "prio", secrets[priority])
            finished.append(priority)
            return r.status_code

        async with client_for(gateway) as client:
            async with holding_slot(client, "prio", secrets["interactive"]):
                batch = asyncio.create_task(request("batch"))
                await until(lambda: depth(gateway, "prio", "batch") == 1, "the batch request to queue")
                interactive = asyncio.create_task(request("interactive"))
                await until(lambda: depth(gateway, "prio", "interactive") == 1, "the interactive request to queue")
                assert finished == []  # both wait while the slot is held
            # The slot is free: limit 1 serialises the two, so the order they finish in is
            # the order admission handed out the slot.
            assert await asyncio.wait_for(asyncio.gather(batch, interactive), WAIT_S) == [200, 200]
        assert finished == ["interactive", "batch"]

    asyncio.run(run())


def test_queued_request_whose_client_leaves_is_dropped(gateway: Server, keys: tuple[Path, dict[str, str]]) -> None:
    secret = keys[1]["interactive"]

    async def run() -> None:
        before = shed(gateway, "gone", "client_gone")
        async with client_for(gateway) as client:
            async with holding_slot(client, "gone", secret):
                async with client_for(gateway) as leaver:
                    waiting = asyncio.create_task(complete(leaver, "gone", secret))
                    await until(lambda: depth(gateway, "gone", "interactive") == 1, "the request to queue")
                    waiting.cancel()  # the client gives up while queued
                    with pytest.raises(asyncio.CancelledError):
                        await waiting
                # Closing the client closed its connection: the gateway notices and drops it.
                await until(lambda: shed(gateway, "gone", "client_gone") == before + 1, "client_gone to be counted")
                assert depth(gateway, "gone", "interactive") == 0
                assert in_use(gateway, "gone") == 1  # only the holder: the leaver took no slot
            await until(lambda: in_use(gateway, "gone") == 0, "the holder's slot to be released")
            # Had the dropped request been handed the slot, this one would wait behind a leak.
            r = await asyncio.wait_for(complete(client, "gone", secret), WAIT_S)
            assert r.status_code == 200
            assert in_use(gateway, "gone") == 0

    asyncio.run(run())


def test_request_that_would_miss_its_deadline_is_refused_at_once(gateway: Server, keys: tuple[Path, dict[str, str]]) -> None:
    secret = keys[1]["interactive"]

    async def run() -> None:
        before = shed(gateway, "deadline", "deadline_unmeetable")
        async with client_for(gateway) as client:
            async with holding_slot(client, "deadline", secret):
                started = time.monotonic()
                r = await complete(client, "deadline", secret)
                elapsed = time.monotonic() - started
                assert r.status_code == 503, r.text
                assert int(r.headers["retry-after"]) >= 1
                # Refused on arrival, not after waiting out the 1 s deadline in the queue.
                assert elapsed < 0.9, elapsed
                assert shed(gateway, "deadline", "deadline_unmeetable") == before + 1
                assert shed(gateway, "deadline", "deadline_expired") == 0
                assert depth(gateway, "deadline", "interactive") == 0

    asyncio.run(run())
