"""Shared fixtures: the real model, and real `turnout serve` processes on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def model_path() -> Path:
    """SmolLM2-135M-Instruct GGUF from the model store (pulled when missing)."""
    from backends.models import pull

    return pull("smollm2-135m")


@dataclass
class Server:
    """A `turnout serve` process on loopback."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_server(config: dict, tmp_dir: Path, *, ready_timeout_s: float = 60.0) -> Server:
    """Write `config` to a file, run `turnout serve` on it, and wait until /readyz says ready."""
    port = free_port()
    config_path = tmp_dir / f"config-{port}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log = tmp_dir / f"server-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config_path), "--port", str(port), "--log-level", "warning"],
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    server = Server(process, port, log)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"turnout serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(server.url + "/readyz", timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"turnout serve did not become ready:\n{log.read_text()}")


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
