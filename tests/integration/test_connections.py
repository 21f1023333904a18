"""The connection guard (gateway/connections.py) with real sockets on loopback: connections
that never finish their request headers are closed after `server.header_timeout_s`, and past
`server.max_connections` a new connection gets a 503 (or, far past it, is closed at once),
while normal requests keep being served. Under uvicorn in-process for both parsers
(httptools and h11), then through `turnout serve` in one process and with `--workers 2`.

Every wait is a bounded poll; every socket and server is closed by the test that made it.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import pytest
import uvicorn

from gateway.connections import ConnectionLimits, connection_protocol
from tests.conftest import free_port, start_server

PARSERS = ["httptools", "h11"]
HALF_HEADERS = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "  # never ends
REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def tiny_app(scope: dict, receive: object, send: object) -> None:
    """A stand-in for the gateway: 200 `ok` to every request."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]


@contextmanager
def in_process_server(parser: str, limits: ConnectionLimits) -> Iterator[int]:
    """uvicorn with the guarded `parser` protocol in a thread; yields its port."""
    port = free_port()
    config = uvicorn.Config(
        tiny_app, host="127.0.0.1", port=port, http=connection_protocol(limits, parser=parser),  # type: ignore[arg-type]
        lifespan="off", log_level="warning", timeout_graceful_shutdown=1,
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setblocking(False)
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server closed `sock` (EOF or reset); any bytes it sent are read first."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (BlockingIOError, InterruptedError):
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True


def wait_closed(socks: list[socket.socket], timeout_s: float) -> float:
    """Wait until the server has closed every socket of `socks`; the seconds it took.
    Fails after `timeout_s` naming how many are still open."""
    started = time.monotonic()
    pending = list(socks)
    while pending:
        left = started + timeout_s - time.monotonic()
        assert left > 0, f"{len(pending)} of {len(socks)} connections still open after {timeout_s} s"
        readable, _, _ = select.select(pending, [], [], min(left, 0.2))
        pending = [s for s in pending if not (s in readable and closed_by_peer(s))]
    return time.monotonic() - started


def read_answer(sock: socket.socket) -> bytes:
    """One answer from a blocking socket: until its content-length is read, or the server
    closes."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length" and len(body) >= int(value):
                    return data


def request(port: int, raw: bytes = REQUEST, timeout_s: float = 5.0) -> bytes:
    """One request on a new connection; the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(raw)
        return read_answer(sock)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def stalled_sockets(port: int, n: int) -> list[socket.socket]:
    """`n` connections that never finish their headers: a third send nothing, a third half a
    request, a third a whole request and then the start of a second (keep-alive)."""
    socks = []
    for i in range(n):
        sock = connect(port)
        if i % 3 == 1:
            sock.sendall(HALF_HEADERS)
        elif i % 3 == 2:
            sock.settimeout(5)
            sock.sendall(REQUEST)
            assert status_of(read_answer(sock)) == 200
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
            sock.setblocking(False)
        socks.append(sock)
    return socks


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        with suppress(OSError):
            sock.close()


# -- the guard under uvicorn ------------------------------------------------------------------------


@pytest.mark.parametrize("parser", PARSERS)
def test_stalled_headers_are_closed_after_the_timeout(parser: str) -> None:
    with in_process_server(parser, ConnectionLimits(header_timeout_s=1.0, max_connections=2048)) as port:
        socks = stalled_sockets(port, 60)
        try:
            time.sleep(0.3)
            assert not any(closed_by_peer(s) for s in socks), "closed before header_timeout_s"
            assert status_of(request(port)) == 200  # the server serves meanwhile
            took = wait_closed(socks, timeout_s=10.0)
            assert took >= 0.4  # 1 s from each connection's start (or its second request's first byte)
            assert status_of(request(port)) == 200
        finally:
            close_all(socks)


@pytest.mark.parametrize("parser", PARSERS)
def test_slow_but_complete_headers_within_the_timeout_are_served(parser: str) -> None:
    with in_process_server(parser, ConnectionLimits(header_timeout_s=2.0, max_connections=2048)) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            for piece in (b"GET /healthz HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"\r\n"):
                sock.sendall(piece)
                time.sleep(0.3)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")


def fill_to_cap(port: int, cap: int) -> list[socket.socket]:
    """`cap` idle connections, and proof that the server took them all: a request on a new
    connection is refused (the server accepts asynchronously, so it is asked until it is)."""
    socks = [connect(port) for _ in range(cap)]
    deadline = time.monotonic() + 10
    while True:
        answer = request(port)
        if status_of(answer) == 503:
            return socks
        assert status_of(answer) == 200, answer
        assert time.monotonic() < deadline, "the cap never applied"
        time.sleep(0.05)


@pytest.mark.parametrize("parser", PARSERS)
def test_past_max_connections_new_ones_get_503_until_others_close(parser: str) -> None:
    cap = 20
    with in_process_server(parser, ConnectionLimits(header_timeout_s=30.0, max_connections=cap)) as port:
        socks = fill_to_cap(port, cap)
        extra: list[socket.socket] = []
        try:
            answer = request(port)
            assert status_of(answer) == 503
            head, _, body = answer.partition(b"\r\n\r\n")
            assert b"retry-after: 1" in head.lower() and b"x-request-id: " in head.lower()
            error = json.loads(body)["error"]
            assert error["code"] == "too_many_connections" and error["type"] == "server_error"
            # Refused connections are bounded too: past twice the cap, closed at once.
            extra = [connect(port) for _ in range(cap + 5)]
            deadline = time.monotonic() + 10
            while sum(closed_by_peer(s) for s in extra) < 5:
                assert time.monotonic() < deadline, "connections past twice the cap were left open"
                time.sleep(0.05)
            close_all(extra)
            # Once admitted connections close, new ones are served.
            close_all(socks[:5])
            deadline = time.monotonic() + 10
            while status_of(request(port)) != 200:
                assert time.monotonic() < deadline, "no connection served after others closed"
                time.sleep(0.05)
        finally:
            close_all(socks + extra)


# -- through `turnout serve` ------------------------------------------------------------------------


def serve_config(**server: object) -> dict:
    """A gateway whose one backend is a remote on a closed port: it starts ready (nothing is
    scraped) and answers /healthz, which is all these tests ask of it."""
    return {
        "server": {"host": "127.0.0.1", **server},
        "backends": [{"name": "up", "kind": "remote", "model": "m", "url": f"http://127.0.0.1:{free_port()}/v1", "metrics_url": "none"}],
    }


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_turnout_serve_closes_stalled_connections(tmp_path: Path, workers: int) -> None:
    server = start_server(serve_config(header_timeout_s=1), tmp_path, extra_args=["--workers", str(workers)])
    try:
        socks = stalled_sockets(server.port, 30)
        try:
            assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
            wait_closed(socks, timeout_s=15.0)
        finally:
            close_all(socks)
        assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
    finally:
        server.stop()


@pytest.mark.slow
def test_turnout_serve_caps_connections(tmp_path: Path) -> None:
    cap = 20
    server = start_server(serve_config(max_connections=cap, header_timeout_s=30), tmp_path)
    try:
        socks = fill_to_cap(server.port, cap)
        try:
            response = httpx.get(server.url + "/healthz", timeout=5)
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "too_many_connections"
            close_all(socks[:3])
            deadline = time.monotonic() + 10
            while httpx.get(server.url + "/healthz", timeout=5).status_code != 200:
                assert time.monotonic() < deadline, "no connection served after others closed"
                time.sleep(0.05)
        finally:
            close_all(socks)
        assert "refused" in server.log.read_text()  # one (rate-limited) warning for ops
    finally:
        server.stop()
