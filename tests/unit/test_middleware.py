"""Request ids and the body limit, on a bare ASGI app; the direct route's path matching."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

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
