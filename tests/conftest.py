"""Shared fixtures: the real model, and real `turnout serve` processes on loopback (the
process helpers are the benchmarks' own, gateway/bench/harness.py)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.bench.harness import REPO, RedisServer, Server, free_port, start_server

__all__ = ["REPO", "RedisServer", "Server", "free_port", "llamacpp_config", "start_server"]


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
