"""Request ids, the client's address (trusted proxies only) and the body limit, on a bare ASGI
app; the direct route's path matching."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.client_address import MAX_HOPS, TrustedProxies, client_address, forwarded_for
from gateway.fastpath import route_path
from gateway.middleware import RequestContextMiddleware


async def echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"size": len(body), "id": request.state.request_id})


def client() -> httpx.AsyncClient:
    app = Starlette(routes=[Route("/echo", echo, methods=["POST", "GET"])])
    wrapped = RequestContextMiddleware(app, max_body_bytes=lambda: 1024)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped), base_url="http://test")


async def test_request_id_generated_or_kept() -> None:
    async with client() as c:
        r = await c.post("/echo", content=b"abc")
        assert r.json() == {"size": 3, "id": r.headers["x-request-id"]}
        kept = await c.get("/echo", headers={"x-request-id": "abc-123"})
        assert kept.headers["x-request-id"] == "abc-123"
        unsafe = await c.get("/echo", headers={"x-request-id": "bad id\twith spaces"})
        assert unsafe.headers["x-request-id"] != "bad id\twith spaces"


async def test_body_limit_by_length_and_by_stream() -> None:
    async with client() as c:
        assert (await c.post("/echo", content=b"x" * 1024)).json()["size"] == 1024
        big = await c.post("/echo", content=b"x" * 1025)
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        assert big.headers["x-request-id"]

        async def chunks():
            for _ in range(5):
                yield b"y" * 300

        streamed = await c.post("/echo", content=chunks())
        assert streamed.status_code == 413


@pytest.mark.parametrize(
    ("root", "path", "routed"),
    [
        ("", "/v1/completions", "/v1/completions"),
        ("/api", "/api/v1/completions", "/v1/completions"),  # mounted under a proxy prefix
        ("/api", "/api", ""),
        ("/api", "/apix/v1/completions", "/apix/v1/completions"),  # not under the prefix
        ("/api", "/v1/completions", "/v1/completions"),
    ],
)
def test_route_path_strips_only_a_whole_root_path(root: str, path: str, routed: str) -> None:
    assert route_path({"type": "http", "path": path, "root_path": root}) == routed


# -- the client's address ------------------------------------------------------------------------

NGINX_HOST = ["127.0.0.1", "::1"]  # the nginx deploy: nginx on the gateway's host


@pytest.mark.parametrize(
    ("trusted", "peer", "xff", "expected"),
    [
        # No trusted proxies (the default): the peer, whatever the header claims.
        ([], "127.0.0.1", "6.6.6.6", "127.0.0.1"),
        ([], "203.0.113.9", "", "203.0.113.9"),
        # An untrusted peer with a spoofed header: the peer.
        (NGINX_HOST, "203.0.113.9", "6.6.6.6", "203.0.113.9"),
        (NGINX_HOST, "203.0.113.9", "127.0.0.1", "203.0.113.9"),  # claiming to be a proxy helps nothing
        # A trusted proxy: the client it names.
        (NGINX_HOST, "127.0.0.1", "198.51.100.7", "198.51.100.7"),
        (NGINX_HOST, "::1", "198.51.100.7", "198.51.100.7"),
        # The client's own forgery on the left of what nginx appended is never read.
        (NGINX_HOST, "127.0.0.1", "6.6.6.6, 198.51.100.7", "198.51.100.7"),
        # A chain: load balancer (10.0.0.0/8) -> nginx -> gateway.
        ([*NGINX_HOST, "10.0.0.0/8"], "127.0.0.1", "198.51.100.7, 10.1.2.3", "198.51.100.7"),
        ([*NGINX_HOST, "10.0.0.0/8"], "127.0.0.1", "6.6.6.6,198.51.100.7,10.1.2.3", "198.51.100.7"),
        ([*NGINX_HOST, "10.0.0.0/8"], "127.0.0.1", "10.0.0.5, 10.0.0.6", "10.0.0.5"),  # all ours: the farthest
        # Garbage: the walk stops at the last good address to its right.
        (NGINX_HOST, "127.0.0.1", "not-an-ip", "127.0.0.1"),
        (NGINX_HOST, "127.0.0.1", "unknown, , ;;", "127.0.0.1"),
        (NGINX_HOST, "127.0.0.1", "\xff\xfe\x00", "127.0.0.1"),
        ([*NGINX_HOST, "10.0.0.0/8"], "127.0.0.1", "198.51.100.7, garbage, 10.0.0.6", "10.0.0.6"),
        (NGINX_HOST, "127.0.0.1", "garbage, 198.51.100.7", "198.51.100.7"),
        (NGINX_HOST, "127.0.0.1", "198.51.100.7/24", "127.0.0.1"),
        (NGINX_HOST, "127.0.0.1", "[2001:db8::1", "127.0.0.1"),
        # An empty header: the peer.
        (NGINX_HOST, "127.0.0.1", "", "127.0.0.1"),
        # Ports, brackets, IPv6, IPv4-mapped peers (a dual-stack socket).
        (NGINX_HOST, "127.0.0.1", "198.51.100.7:4711", "198.51.100.7"),
        (NGINX_HOST, "127.0.0.1", "[2001:db8::1]:443", "2001:db8::1"),
        (NGINX_HOST, "127.0.0.1", "2001:DB8::1", "2001:db8::1"),
        (NGINX_HOST, "::ffff:127.0.0.1", "198.51.100.7", "198.51.100.7"),
        # No peer at all (a unix socket): nothing to say.
        (NGINX_HOST, None, "198.51.100.7", None),
    ],
)
def test_client_address(trusted: list[str], peer: str | None, xff: str, expected: str | None) -> None:
    assert client_address(peer, xff, TrustedProxies(trusted)) == expected


def test_a_huge_header_is_read_only_so_far() -> None:
    trusted = TrustedProxies(["10.0.0.0/8", "127.0.0.1"])
    xff = ", ".join(f"10.0.{i // 256 % 256}.{i % 256}" for i in range(100_000))
    found = client_address("127.0.0.1", xff, trusted)
    # Past MAX_HOPS entries the rest is not read: the farthest hop read is the answer.
    assert found == xff.split(", ")[-MAX_HOPS]


def test_several_header_lines_read_as_one_list() -> None:
    headers = [(b"x-forwarded-for", b"6.6.6.6"), (b"host", b"x"), (b"x-forwarded-for", b"198.51.100.7")]
    assert forwarded_for(headers) == "6.6.6.6,198.51.100.7"
    assert client_address("127.0.0.1", forwarded_for(headers), TrustedProxies(NGINX_HOST)) == "198.51.100.7"


async def whoami(request: Request) -> JSONResponse:
    return JSONResponse({"client_ip": request.state.client_ip, "peer": request.client.host if request.client else None})


def client_from(peer: str, trusted: Callable[[], Sequence[str]]) -> httpx.AsyncClient:
    app = Starlette(routes=[Route("/whoami", whoami)])
    wrapped = RequestContextMiddleware(app, max_body_bytes=lambda: 1024, trusted_proxies=trusted)
    transport = httpx.ASGITransport(app=wrapped, client=(peer, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def test_middleware_sets_client_ip_from_the_current_policy() -> None:
    policy = {"trusted_proxies": ["127.0.0.1"]}
    async with client_from("127.0.0.1", lambda: policy["trusted_proxies"]) as c:
        r = await c.get("/whoami", headers={"x-forwarded-for": "198.51.100.7"})
        assert r.json() == {"client_ip": "198.51.100.7", "peer": "127.0.0.1"}
        policy["trusted_proxies"] = []  # a reload that trusts no one: the peer from the next request on
        r = await c.get("/whoami", headers={"x-forwarded-for": "198.51.100.7"})
        assert r.json()["client_ip"] == "127.0.0.1"
    async with client_from("203.0.113.9", lambda: ["127.0.0.1"]) as c:
        r = await c.get("/whoami", headers={"x-forwarded-for": "198.51.100.7"})
        assert r.json()["client_ip"] == "203.0.113.9"


async def test_middleware_without_trusted_proxies_records_the_peer() -> None:
    app = Starlette(routes=[Route("/whoami", whoami)])
    wrapped = RequestContextMiddleware(app, max_body_bytes=lambda: 1024)  # as gateway/app.py adds it today
    transport = httpx.ASGITransport(app=wrapped, client=("127.0.0.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        r = await c.get("/whoami", headers={"x-forwarded-for": "6.6.6.6"})
        assert r.json()["client_ip"] == "127.0.0.1"
