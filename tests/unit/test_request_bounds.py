"""Issue 17, item 1, without a model: the request bounds (`server.max_messages`,
`max_message_bytes`, `max_tools`, `max_schema_bytes`) answered with OpenAI's 400 naming the
param; a large body validated in pieces gives the same request (or the same first error) as
one pydantic call; the worker decodes a Submit the same way; the context window is checked
from the prompt's length before any tokenizing; the event-loop lag monitor observes and stops."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from backends.generation import GenerationDelta, GenerationRequest
from backends.grammar import GrammarCompiler
from backends.local import LocalBackend
from backends.protocol import ChatCompletionRequest, CompletionRequest, ContextLengthExceeded, InvalidRequest, LoadReport
from backends.worker.messages import decode_request
from gateway.body import LARGE_BODY_BYTES, PIECEWISE_ITEMS, check_bounds, parse_body, validate_in_pieces
from gateway.errors import install_error_handlers
from gateway.loop_lag import monitor_loop_lag
from gateway.metrics import GatewayMetrics
from policies.schema import ServerConfig

SERVER = ServerConfig()


def chat(n: int, content: Any = "word", **fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content} for _ in range(n)], **fields}


def bound_error(data: dict[str, Any], server: ServerConfig = SERVER) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        check_bounds(data, server)
    assert info.value.status == 400 and info.value.type == "invalid_request_error"
    return info.value


# -- the bounds -----------------------------------------------------------------------------------


def test_messages_past_max_messages_are_a_400_naming_messages() -> None:
    check_bounds(chat(2048), SERVER)  # the default bound itself is fine
    exc = bound_error(chat(2049))
    assert (exc.param, exc.code) == ("messages", "array_above_max_length")
    assert "maximum length 2048" in exc.message and "length 2049" in exc.message
    assert bound_error(chat(4), ServerConfig(max_messages=3)).param == "messages"


def test_a_message_past_max_message_bytes_counts_utf8_bytes() -> None:
    server = ServerConfig(max_message_bytes=1000)
    check_bounds(chat(2, "a" * 1000), server)
    exc = bound_error(chat(1, "a" * 1001), server)
    assert (exc.param, exc.code) == ("messages.0.content", "string_above_max_length")
    assert "1001 bytes" in exc.message
    # 501 characters, 1002 bytes: bytes are what count.
    assert bound_error(chat(1, "é" * 501), server).param == "messages.0.content"
    # Text parts count together; the param names the message.
    body = chat(1)
    body["messages"].append({"role": "user", "content": [{"type": "text", "text": "a" * 600}] * 2})
    assert bound_error(body, server).param == "messages.1.content"
    # The default: 1 MiB.
    check_bounds(chat(1, "a" * (1 << 20)), SERVER)
    assert bound_error(chat(1, "a" * ((1 << 20) + 1))).param == "messages.0.content"


def test_tools_and_response_format_bounds() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    check_bounds({**chat(1), "tools": [tool] * 128}, SERVER)
    exc = bound_error({**chat(1), "tools": [tool] * 129})
    assert (exc.param, exc.code) == ("tools", "array_above_max_length")
    big = {"type": "function", "function": {"name": "f", "description": "x" * (64 * 1024)}}
    exc = bound_error({**chat(1), "tools": [big]})
    assert (exc.param, exc.code) == ("tools", "schema_too_large")
    schema = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"description": "x" * (64 * 1024)}}}
    assert bound_error({**chat(1), "response_format": schema}).param == "response_format"
    check_bounds({**chat(1), "response_format": {"type": "json_object"}}, SERVER)


def test_what_is_not_a_chat_is_left_to_validation() -> None:
    for data in (b"raw", [1, 2], {"messages": "nope"}, {"messages": [1, None, {"content": 5}]}, {"prompt": "x" * 10}):
        check_bounds(data, ServerConfig(max_message_bytes=1))


# -- through parse_body: the app's 400 ---------------------------------------------------------------


def app_with(server: ServerConfig) -> httpx.AsyncClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def route(request: Request) -> JSONResponse:
        request.scope.setdefault("state", {})["snapshot"] = SimpleNamespace(config=SimpleNamespace(server=server))
        body, _ = await parse_body(request, ChatCompletionRequest)
        return JSONResponse({"messages": len(body.messages)})

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.mark.parametrize("n", [3, 3000])  # inline, and a large body (in a thread, in pieces)
async def test_parse_body_answers_the_bound_in_openai_shape(n: int) -> None:
    async with app_with(ServerConfig(max_messages=n - 1)) as client:
        r = await client.post("/v1/chat/completions", json=chat(n))
        assert r.status_code == 400
        error = r.json()["error"]
        assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "messages", "array_above_max_length")
    async with app_with(ServerConfig(max_messages=n)) as client:
        r = await client.post("/v1/chat/completions", json=chat(n))
        assert r.status_code == 200 and r.json() == {"messages": n}


@pytest.mark.parametrize("n", [1, 2000])
async def test_parse_body_measures_each_message_and_schema(n: int) -> None:
    body = chat(n)
    body["messages"][-1]["content"] = "é" * 60  # 120 bytes
    async with app_with(ServerConfig(max_message_bytes=100, max_schema_bytes=100)) as client:
        error = (await client.post("/v1/chat/completions", json=body)).json()["error"]
        assert (error["param"], error["code"]) == (f"messages.{n - 1}.content", "string_above_max_length")
        body["messages"][-1]["content"] = "x"
        body["response_format"] = {"type": "json_object", "pad": "x" * 100}
        error = (await client.post("/v1/chat/completions", json=body)).json()["error"]
        assert (error["param"], error["code"]) == ("response_format", "schema_too_large")


async def test_a_large_body_gets_the_same_validation_error() -> None:
    body = chat(2000)
    body["messages"][1234] = {"role": "wizard", "content": "x"}
    assert len(json.dumps(body)) > LARGE_BODY_BYTES
    async with app_with(SERVER) as client:
        r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.1234.role"


# -- validation in pieces ----------------------------------------------------------------------------------


def parts(n: int, bad: int | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"type": "text", "text": f"p{i}"} for i in range(n)]
    if bad is not None:
        out[bad] = {"type": "image", "text": 5}
    return out


VALID = [
    chat(1),
    chat(500, temperature=0.5, max_tokens=7),
    {**chat(PIECEWISE_ITEMS + 5), "messages": [{"role": "system", "content": parts(PIECEWISE_ITEMS * 3)}, {"role": "assistant", "content": None, "name": "n"}]},
]


@pytest.mark.parametrize("data", VALID)
def test_validation_in_pieces_gives_the_same_request(data: dict[str, Any]) -> None:
    whole = ChatCompletionRequest.model_validate(data)
    pieces = validate_in_pieces(ChatCompletionRequest, data)
    assert pieces == whole
    assert pieces.model_dump_json(exclude_unset=True) == whole.model_dump_json(exclude_unset=True)
    assert pieces.model_fields_set == whole.model_fields_set
    assert [m.model_fields_set for m in pieces.messages] == [m.model_fields_set for m in whole.messages]


def _broken() -> list[dict[str, Any]]:
    many = chat(200)
    many["messages"][150] = {"role": "wizard", "content": "x"}
    many["messages"][170] = {"role": "user", "content": 5}
    long_parts = chat(3)
    long_parts["messages"][1] = {"role": "user", "content": parts(200, bad=130)}
    long_parts_bad_role = chat(3)
    long_parts_bad_role["messages"][2] = {"role": "nobody", "content": parts(200)}
    return [
        many,
        long_parts,
        long_parts_bad_role,
        {**chat(300), "temperature": "hot"},  # a field before `messages` fails first
        {**chat(300), "top_logprobs": 99},  # one after it
        {**chat(300), "messages": [*chat(100)["messages"], "not a message"]},
        {**chat(1), "messages": []},
        {"messages": chat(100)["messages"]},  # no model
    ]


@pytest.mark.parametrize("data", _broken())
def test_validation_in_pieces_reports_the_same_first_error(data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as whole:
        ChatCompletionRequest.model_validate(data)
    with pytest.raises(ValidationError) as pieces:
        validate_in_pieces(ChatCompletionRequest, data)
    first = {k: whole.value.errors()[0][k] for k in ("type", "loc", "msg")}
    assert {k: pieces.value.errors()[0][k] for k in ("type", "loc", "msg")} == first


def test_other_models_are_validated_whole() -> None:
    data = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 2}
    assert validate_in_pieces(CompletionRequest, data) == CompletionRequest.model_validate(data)


# -- the worker's decoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("data", VALID)
def test_the_worker_decodes_a_submit_as_the_gateway_validated_it(data: dict[str, Any]) -> None:
    body = ChatCompletionRequest.model_validate(data).model_dump_json(exclude_unset=True).encode()
    decoded = decode_request("chat", body)
    assert decoded == ChatCompletionRequest.model_validate_json(body)
    assert decoded.model_dump_json(exclude_unset=True).encode() == body
    completion = CompletionRequest(model="m", prompt="hi", echo=True).model_dump_json(exclude_unset=True).encode()
    assert decode_request("completions", completion) == CompletionRequest.model_validate_json(completion)


# -- the early context-window check ----------------------------------------------------------------------------


class NoTokenizer(LocalBackend):
    """A backend whose tokenizer must not be reached: the length estimate answers first."""

    name = "fake"
    model_id = "fake"
    max_token_bytes: int | None = 8

    @property
    def context_window(self) -> int:
        return 512

    def tokenize(self, text: str) -> list[int]:
        raise AssertionError(f"tokenized {len(text)} characters")

    def chat_template(self) -> tuple[str | None, str, str]:
        return None, "", ""

    def detokenize(self, token_ids: list[int]) -> str:
        return ""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        raise AssertionError("generated")
        yield  # pragma: no cover

    def load(self) -> LoadReport:
        return LoadReport()

    def grammar_compiler(self) -> GrammarCompiler:
        raise AssertionError("compiled a grammar")


def test_a_prompt_too_long_by_its_length_alone_is_refused_before_tokenizing() -> None:
    backend = NoTokenizer()
    request = ChatCompletionRequest.model_validate(chat(20_000))
    with pytest.raises(ContextLengthExceeded) as info:
        backend.prepare("chat", request)
    assert info.value.param == "messages" and info.value.code == "context_length_exceeded"
    assert "maximum context length is 512 tokens" in info.value.message and "at least" in info.value.message
    with pytest.raises(ContextLengthExceeded) as info:
        backend.prepare("chat", ChatCompletionRequest.model_validate(chat(20_000, max_tokens=10)))
    assert info.value.param == "max_tokens"
    with pytest.raises(ContextLengthExceeded) as info:
        backend.prepare("completions", CompletionRequest(model="m", prompt="x" * 8 * 512))
    assert info.value.param == "prompt"


def test_the_estimate_never_refuses_what_may_fit() -> None:
    backend = NoTokenizer()
    backend.check_length_estimate(8 * 511, None, "messages")  # at least 511 tokens: may fit
    backend.check_length_estimate(8 * 500, 12, "messages")
    with pytest.raises(ContextLengthExceeded):
        backend.check_length_estimate(8 * 500 + 1, 12, "messages")
    backend.max_token_bytes = None  # unknown: no estimate, the exact count decides
    backend.check_length_estimate(10**9, None, "messages")


# -- event-loop lag -----------------------------------------------------------------------------------------------


async def test_the_lag_monitor_sees_a_blocked_loop_and_stops_when_cancelled() -> None:
    seen: list[float] = []
    task = asyncio.create_task(monitor_loop_lag(seen.append, interval_s=0.01))
    await asyncio.sleep(0.05)
    time.sleep(0.2)  # block the loop: the next wake-up is late by about this much
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen and all(lag >= 0 for lag in seen)
    assert max(seen) >= 0.1


def test_the_lag_histogram_is_in_the_apps_registry() -> None:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    metrics.loop_lag.observe(0.003)
    assert registry.get_sample_value("turnout_event_loop_lag_seconds_count") == 1
    assert registry.get_sample_value("turnout_event_loop_lag_seconds_bucket", {"le": "0.005"}) == 1
