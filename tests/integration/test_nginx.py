"""deploy/nginx/turnout.conf in front of two gateway processes: a real nginx on loopback with
TLS from a certificate made here. Streams pass token by token; rate-limit headers and
request ids pass through; oversize bodies get OpenAI-shaped 413s; the access log names the
real client, and a forged X-Forwarded-For names no one."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import REPO, Server, free_port, llamacpp_config, start_server

pytestmark = pytest.mark.slow

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
# The client connects from another loopback address than the one nginx connects to the
# gateways from, so that "the client" and "the proxy" are told apart in the access log.
CLIENT_HOST = "127.0.0.2"
FORGED = "6.6.6.6"
# What the deploy trusts (the policy example that deploy/systemd serves behind nginx).
TRUSTED_PROXIES = yaml.safe_load((REPO / "config" / "examples" / "gateway.yaml").read_text())["server"]["trusted_proxies"]


@dataclass
class Stack:
    client: httpx.Client  # through nginx, from 127.0.0.1
    gateways: list[Server]
    node: Server
    nginx_url: str
    tls: ssl.SSLContext

    def client_from(self, host: str, base_url: str | None = None) -> httpx.Client:
        """A client whose connections leave from `host` (through nginx unless `base_url`)."""
        transport = httpx.HTTPTransport(local_address=host, verify=self.tls)
        return httpx.Client(base_url=base_url or self.nginx_url, transport=transport, timeout=60)


def make_cert(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def nginx_config(tmp: Path, listen: int, gateways: list[Server], cert: Path, key: Path) -> Path:
    """The deploy config with this test's ports and certificate, inside a minimal nginx.conf."""
    site = (REPO / "deploy" / "nginx" / "turnout.conf").read_text()
    site = site.replace("server 127.0.0.1:8081", f"server 127.0.0.1:{gateways[0].port}")
    site = site.replace("server 127.0.0.1:8082", f"server 127.0.0.1:{gateways[1].port}")
    site = site.replace("listen 8443", f"listen 127.0.0.1:{listen}")
    site = site.replace("/etc/turnout/tls/cert.pem", str(cert)).replace("/etc/turnout/tls/key.pem", str(key))
    assert str(cert) in site and str(gateways[1].port) in site  # the deploy file still has these lines
    (tmp / "turnout.conf").write_text(site)
    temp_paths = "\n".join(f"    {kind}_temp_path {tmp}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    main = f"""
{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {tmp}/access.log;
{temp_paths}
    include {tmp}/turnout.conf;
}}
"""
    (tmp / "nginx.conf").write_text(main)
    return tmp / "nginx.conf"


@pytest.fixture(scope="module")
def stack(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """node (llama.cpp) <- two gateways (remote backend, limits on) <- nginx (TLS)."""
    tmp = tmp_path_factory.mktemp("nginx")
    started: list[Server] = []
    process = None
    try:
        node = start_server(llamacpp_config(model_path, n_ctx=1024, max_queue=16), tmp)
        started.append(node)
        gateway_config = {
            "server": {"host": "127.0.0.1", "trusted_proxies": TRUSTED_PROXIES},
            "limits": {"key": {"rpm": 10000}},
            "backends": [{"name": "node", "kind": "remote", "model": "smollm2-135m", "url": node.base_url}],
        }
        gateways = [start_server(gateway_config, tmp) for _ in range(2)]
        started.extend(gateways)
        cert, key = make_cert(tmp)
        listen = free_port()
        conf = nginx_config(tmp, listen, gateways, cert, key)
        process = subprocess.Popen([NGINX, "-p", str(tmp), "-c", str(conf), "-g", "daemon off;"], stderr=subprocess.PIPE)
        tls = ssl.create_default_context(cafile=str(cert))
        client = httpx.Client(base_url=f"https://127.0.0.1:{listen}/v1", verify=tls, timeout=60)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.get("/models")
                break
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start: {process.stderr.read().decode() if process.stderr else ''}")
                time.sleep(0.1)
        yield Stack(client, gateways, node, f"https://127.0.0.1:{listen}/v1", tls)
        client.close()
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
        for server in started:
            server.stop()


def test_stream_arrives_token_by_token(stack: Stack) -> None:
    client = stack.client
    body = {"model": "smollm2-135m", "prompt": "Once upon a time", "max_tokens": 150, "ignore_eos": True, "stream": True}
    start = time.monotonic()
    arrivals: list[float] = []
    with client.stream("POST", "/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) >= 100  # a chunk per token (a few tokens carry no text of their own)
    # Buffered, every chunk would land together at the end; streamed, the first lands long
    # before the last.
    assert arrivals[0] < 0.5 * arrivals[-1], (arrivals[0], arrivals[-1])


def test_request_ids_and_rate_limit_headers_pass_through(stack: Stack) -> None:
    client = stack.client
    body = {"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 1}
    mine = client.post("/completions", json=body, headers={"x-request-id": "client-chosen-id-42"})
    assert mine.status_code == 200 and mine.headers["x-request-id"] == "client-chosen-id-42"
    assert mine.headers["x-ratelimit-limit-requests"] == "10000"
    assert int(mine.headers["x-ratelimit-remaining-requests"]) < 10000
    theirs = client.post("/completions", json=body)
    assert len(theirs.headers["x-request-id"]) == 32  # nginx's $request_id, echoed by the gateway


def test_both_gateways_take_traffic(stack: Stack) -> None:
    client, gateways = stack.client, stack.gateways
    for _ in range(6):
        assert client.post("/completions", json={"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 1}).status_code == 200
    for gateway in gateways:
        assert 'turnout_requests_total{backend="node"' in httpx.get(gateway.url + "/metrics").text


@pytest.mark.parametrize("size_mb", [5, 9])  # over the gateway's 4 MiB; over nginx's 8m
def test_oversize_bodies_are_413_in_openai_shape(stack: Stack, size_mb: int) -> None:
    client = stack.client
    body = b'{"model": "smollm2-135m", "prompt": "' + b"x" * (size_mb * 1024 * 1024) + b'"}'
    r = client.post("/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    assert r.headers["x-request-id"]


# -- the client's address -----------------------------------------------------------------------


def access_line(servers: list[Server], request_id: str, timeout_s: float = 10.0) -> dict:
    """The access-log line of `request_id` in any of `servers`' logs. It is written after the
    last byte went out, so it may land a moment after the answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        for server in servers:
            for line in server.log.read_text().splitlines():
                if "turnout.access" in line and request_id in line:
                    return json.loads(line.split(": ", 1)[1])
        if time.monotonic() > deadline:
            raise AssertionError(f"no access line for {request_id}")
        time.sleep(0.05)


def send(client: httpx.Client, headers: dict[str, str] | None = None) -> str:
    """One small completion; its request id."""
    request_id = f"addr-{uuid.uuid4().hex}"
    r = client.post("/completions", json={"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 1},
                    headers={"x-request-id": request_id, **(headers or {})})  # fmt: skip
    assert r.status_code == 200, r.text
    return request_id


@pytest.fixture
def remote(stack: Stack) -> Iterator[httpx.Client]:
    with stack.client_from(CLIENT_HOST) as client:
        yield client


def test_access_log_shows_the_real_client(stack: Stack, remote: httpx.Client) -> None:
    request_id = send(remote)
    assert access_line(stack.gateways, request_id)["client_ip"] == CLIENT_HOST


def test_a_forged_forwarded_for_through_nginx_is_not_believed(stack: Stack, remote: httpx.Client) -> None:
    # nginx appends the address it saw: "6.6.6.6, 127.0.0.2"; the rightmost untrusted entry wins.
    request_id = send(remote, {"x-forwarded-for": FORGED})
    assert access_line(stack.gateways, request_id)["client_ip"] == CLIENT_HOST


def test_a_direct_request_with_a_forged_forwarded_for_logs_the_peer(stack: Stack) -> None:
    # To a gateway, from an address that is no trusted proxy.
    with stack.client_from(CLIENT_HOST, stack.gateways[0].base_url) as direct:
        request_id = send(direct, {"x-forwarded-for": FORGED})
    assert access_line(stack.gateways, request_id)["client_ip"] == CLIENT_HOST
    # To the node, which trusts no proxy (the default), from loopback: a loopback peer is
    # no proxy either.
    with stack.client_from("127.0.0.1", stack.node.base_url) as direct:
        request_id = send(direct, {"x-forwarded-for": FORGED})
    assert access_line([stack.node], request_id)["client_ip"] == "127.0.0.1"
