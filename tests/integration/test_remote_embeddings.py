"""Embeddings through the remote kinds: `remote` forwards `POST {url}/embeddings` (a scripted
upstream on loopback), `litellm` calls `litellm.aembedding` (an OpenAI-compatible provider
mocked with respx)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import respx

from backends.protocol import EmbeddingRequest, Embeds, InvalidRequest, Overloaded, Passthrough
from backends.remote.litellm_backend import LiteLLMBackend
from backends.remote.openai_http import RemoteBackend
from backends.remote.upstream_errors import RemoteFailure, UpstreamClientError
from tests.conftest import asgi_in_thread, read_body, start_server

ANSWER = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.6, 0.8]}, {"object": "embedding", "index": 1, "embedding": "AACAPw=="}],
    "model": "upstream-name",
    "usage": {"prompt_tokens": 7, "total_tokens": 7},
}


class Upstream:
    """Answers by the (rewritten) model name; records each request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        body = json.loads(await read_body(receive))
        self.requests.append((scope["path"], body))
        status, payload, headers = 200, ANSWER, [(b"content-type", b"application/json")]
        mode = body["model"]
        if mode == "bad":
            status, payload = 400, {"error": {"message": "dimensions not supported", "type": "invalid_request_error", "param": "dimensions"}}
        elif mode == "boom":
            status, payload = 500, {"error": {"message": "kaput", "type": "server_error"}}
        elif mode == "busy":
            status, payload = 503, {"error": {"message": "full", "type": "server_error"}}
            headers.append((b"retry-after", b"3"))
        elif mode == "slow":
            await asyncio.sleep(3)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, Upstream]]:
    app = Upstream()
    with asgi_in_thread(app) as url:
        yield url, app


async def test_remote_forwards_the_body_with_model_rewritten(upstream: tuple[str, Upstream]) -> None:
    backend = RemoteBackend("up", "ok", url=upstream[0], model_id="alias")
    assert isinstance(backend, Embeds) and isinstance(backend, Passthrough)
    try:
        request = EmbeddingRequest(model="alias", input=["a", "b"], dimensions=2, truncate=True)
        raw = b'{"model":"alias","input":["a","b"],"dimensions":2,"truncate":true,"vendor_extra":1}'
        out = await backend.embeddings_raw(request, raw)
        plain = await backend.embeddings(EmbeddingRequest(model="alias", input="a"))
    finally:
        await backend.close()
    (path, body), (_, plain_body) = upstream[1].requests[-2:]
    assert path.endswith("/v1/embeddings")
    assert body == {"model": "ok", "input": ["a", "b"], "dimensions": 2, "truncate": True, "vendor_extra": 1}
    assert plain_body == {"model": "ok", "input": "a"}  # only the fields set, no stream flag
    assert out.model == "alias" and out.data[0].embedding == [0.6, 0.8] and out.data[1].embedding == "AACAPw=="
    assert out.usage.prompt_tokens == 7 and plain.model == "alias"


def test_the_gateway_forwards_the_clients_own_body(upstream: tuple[str, Upstream], tmp_path: Any) -> None:
    """Through `turnout serve`: fields the gateway does not model reach the upstream."""
    config = {
        "server": {"host": "127.0.0.1"},
        "backends": [{"name": "up", "kind": "remote", "model": "ok", "url": upstream[0] + "/v1", "served_name": "emb", "metrics_url": "none"}],
    }
    server = start_server(config, tmp_path)
    try:
        answer = httpx.post(server.base_url + "/embeddings", json={"model": "emb", "input": "a", "vendor_extra": 2}, timeout=30)
    finally:
        server.stop()
    assert answer.status_code == 200, answer.text
    assert upstream[1].requests[-1][1] == {"model": "ok", "input": "a", "vendor_extra": 2}


@pytest.mark.parametrize(("mode", "error", "status"), [("bad", UpstreamClientError, 400), ("boom", RemoteFailure, 502), ("busy", Overloaded, 503)])
async def test_remote_errors_map_as_for_chat(upstream: tuple[str, Upstream], mode: str, error: type, status: int) -> None:
    backend = RemoteBackend("up", mode, url=upstream[0])
    try:
        with pytest.raises(error) as info:
            await backend.embeddings(EmbeddingRequest(model="m", input="a"))
    finally:
        await backend.close()
    assert info.value.status == status
    if mode == "bad":
        assert info.value.param == "dimensions"


async def test_remote_timeout_as_for_a_non_streamed_chat(upstream: tuple[str, Upstream]) -> None:
    backend = RemoteBackend("up", "slow", url=upstream[0], total_timeout_s=0.5)
    try:
        with pytest.raises(RemoteFailure) as info:
            await backend.embeddings(EmbeddingRequest(model="m", input="a"))
    finally:
        await backend.close()
    assert info.value.failure == "timeout"


# -- litellm ------------------------------------------------------------------------------------

PROVIDER = "https://embed.example.test/v1"


@pytest.fixture
def provider() -> Iterator[respx.Route]:
    with respx.mock(assert_all_called=False) as mock:
        yield mock.post(f"{PROVIDER}/embeddings")


def litellm_backend() -> LiteLLMBackend:
    return LiteLLMBackend("emb", "openai/text-embedding-3-small", model_id="emb", url=PROVIDER, api_key="sk-test")


async def test_litellm_embeds_through_aembedding(provider: respx.Route) -> None:
    provider.mock(return_value=httpx.Response(200, json={**ANSWER, "data": ANSWER["data"][:1]}))
    out = await litellm_backend().embeddings(EmbeddingRequest(model="emb", input=["a"], dimensions=2, user="u1"))
    body = json.loads(provider.calls.last.request.content)
    assert body["model"] == "text-embedding-3-small" and body["input"] == ["a"] and body["dimensions"] == 2 and body["user"] == "u1"
    assert out.model == "emb" and out.data[0].embedding == pytest.approx([0.6, 0.8]) and out.usage.prompt_tokens == 7


@pytest.mark.parametrize("field", [{"truncate": True}, {"keep_alive": "5m"}])
async def test_litellm_refuses_what_it_cannot_pass(provider: respx.Route, field: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as info:
        await litellm_backend().embeddings(EmbeddingRequest(model="emb", input="a", **field))
    assert info.value.param == next(iter(field)) and not provider.calls
