"""Processes the benchmark programs start on loopback: a `turnout serve` and a throwaway
`redis-server`. The test suite uses them too (tests/conftest.py); they need no pytest, as
a program in the package must not import the test suite (an installed package has none)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A `turnout serve` process on loopback."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        """Terminate it (kill after 10 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_server(
    config: dict,
    tmp_dir: Path,
    *,
    ready_timeout_s: float = 60.0,
    port: int | None = None,
    env: dict | None = None,
    extra_args: list[str] | None = None,
) -> Server:
    """Write `config` to a file, run `turnout serve` on it, and wait until /readyz says ready."""
    port = port or free_port()
    config_path = tmp_dir / f"config-{port}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log = tmp_dir / f"server-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config_path), "--port", str(port), "--log-level", "warning", *(extra_args or [])],
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    server = Server(process, port, log, config_path)
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


@dataclass
class RedisServer:
    """A throwaway `redis-server` on loopback: no persistence, stoppable and restartable on
    the same port (tests use it to see the gateway while Redis is down, and its recovery)."""

    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        """Start it and wait until it answers PING."""
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--protected-mode", "yes", "--daemonize", "no", "--enable-debug-command", "local", "--logfile", str(self.log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        """Kill it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None
