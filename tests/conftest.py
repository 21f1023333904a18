"""Shared fixtures: the real model, and real `turnout serve` processes on loopback (the
process helpers are the benchmarks' own, gateway/bench/harness.py)."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from gateway.bench.harness import REPO, RedisServer, Server, free_port, start_server

__all__ = ["REPO", "RedisServer", "Server", "asgi_in_thread", "free_port", "llamacpp_config", "read_body", "start_server"]


@pytest.fixture(scope="session")
def model_path() -> Path:
    """SmolLM2-135M-Instruct GGUF from the model store (pulled when missing)."""
    from backends.models import pull

    return pull("smollm2-135m")


def llamacpp_config(model_path: Path, **options: object) -> dict:
    """A one-backend config serving SmolLM2 as `smollm2-135m` through the llama.cpp runner."""
    return {
        "server": {"host": "127.0.0.1", "max_body_bytes": 65536},
        "backends": [
            {
                "name": "local",
                "kind": "llamacpp",
                "model": str(model_path),
                "served_name": "smollm2-135m",
                "options": {"n_ctx": 512, **options},
            }
        ],
    }


@pytest.fixture(scope="session")
def llamacpp_server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One llama.cpp instance, a wait queue of 4."""
    server = start_server(llamacpp_config(model_path, instances=1, max_queue=4), tmp_path_factory.mktemp("srv"))
    yield server
    server.stop()


# -- a real redis-server ---------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server per test (it starts in milliseconds)."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: `make test` installs it (apt-get install redis-server)")
    server = RedisServer(port=free_port(), log=tmp_path / "redis.log")
    server.start()
    yield server
    server.stop()


@contextmanager
def asgi_in_thread(app: Any) -> Iterator[str]:
    """Serve an ASGI app (a scripted upstream) with uvicorn in a thread on a loopback port;
    yields its base URL and stops it on exit."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the scripted upstream did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)


async def read_body(receive: Any) -> bytes:
    """An ASGI request's whole body (for scripted upstreams)."""
    raw = b""
    while True:
        message = await receive()
        raw += message.get("body", b"")
        if not message.get("more_body"):
            return raw
