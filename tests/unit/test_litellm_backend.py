"""LiteLLMBackend against a mocked hosted provider (Anthropic's Messages API, via respx):
requests are translated by litellm, answers and errors mapped to our wire types."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import respx

from backends.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, ContextLengthExceeded, InvalidRequest, Overloaded
from backends.remote.litellm_backend import LiteLLMBackend
from backends.remote.upstream_errors import RemoteFailure, UpstreamClientError
from policies.retry import Outcome, classify

MESSAGES_URL = "https://api.anthropic.com/v1/messages"
KEY_ENV = "TURNOUT_TEST_ANTHROPIC_KEY"

MESSAGE = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "model": "claude-3-haiku-20240307",
    "content": [{"type": "text", "text": "Red, green, blue."}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 12, "output_tokens": 6},
}


def sse(events: list[dict[str, Any]]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


STREAM = sse(
    [
        {"type": "message_start", "message": {**MESSAGE, "content": [], "stop_reason": None, "usage": {"input_tokens": 12, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Red, "}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "green, blue."}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None}, "usage": {"output_tokens": 6}},
        {"type": "message_stop"},
    ]
)


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> LiteLLMBackend:
    monkeypatch.setenv(KEY_ENV, "sk-ant-test")
    return LiteLLMBackend("claude", "anthropic/claude-3-haiku-20240307", model_id="haiku", api_key_env=KEY_ENV)


@pytest.fixture
def provider() -> Iterator[respx.Route]:
    with respx.mock(assert_all_called=False) as mock:
        yield mock.post(MESSAGES_URL)


def chat(**kw: Any) -> ChatCompletionRequest:
    messages = [ChatMessage(role="developer", content="Be brief."), ChatMessage(role="user", content="Name three colours.")]
    return ChatCompletionRequest(model="haiku", messages=messages, **kw)


async def test_chat_is_translated_both_ways(backend: LiteLLMBackend, provider: respx.Route) -> None:
    provider.mock(return_value=httpx.Response(200, json=MESSAGE))
    out = await backend.chat(chat(max_tokens=20, temperature=0.5, stop=["\n\n"]))
    assert out.object == "chat.completion" and out.model == "haiku"
    assert out.choices[0].message.content == "Red, green, blue."
    assert out.choices[0].finish_reason == "stop"  # Anthropic's end_turn
    assert out.usage is not None and (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (12, 6, 18)
    sent = provider.calls.last.request
    assert sent.headers["x-api-key"] == "sk-ant-test"
    body = json.loads(sent.content)
    assert body["model"] == "claude-3-haiku-20240307" and body["max_tokens"] == 20 and body["temperature"] == 0.5
    assert body["stop_sequences"] == ["\n\n"]
    # Our developer message became Anthropic's system prompt.
    assert body["system"] == [{"type": "text", "text": "Be brief."}]
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Name three colours."}]}]
    assert backend.in_flight == 0


async def test_chat_stream_maps_chunks_and_usage(backend: LiteLLMBackend, provider: respx.Route) -> None:
    provider.mock(return_value=httpx.Response(200, content=STREAM, headers={"content-type": "text/event-stream"}))
    chunks = [c async for c in backend.chat_stream(chat(max_tokens=6, stream=True, stream_options={"include_usage": True}))]
    assert json.loads(provider.calls.last.request.content)["stream"] is True
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Red, green, blue."
    assert all(c.model == "haiku" and c.object == "chat.completion.chunk" for c in chunks)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]  # Anthropic's max_tokens
    usage = [c.usage for c in chunks if c.usage is not None]
    assert usage and usage[-1].completion_tokens == 6 and usage[-1].prompt_tokens == 12
    assert backend.in_flight == 0


async def test_stream_without_usage_request_has_no_usage(backend: LiteLLMBackend, provider: respx.Route) -> None:
    provider.mock(return_value=httpx.Response(200, content=STREAM, headers={"content-type": "text/event-stream"}))
    chunks = [c async for c in backend.chat_stream(chat(max_tokens=6, stream=True))]
    assert chunks and all(c.usage is None for c in chunks)


async def test_text_completion(backend: LiteLLMBackend, provider: respx.Route) -> None:
    provider.mock(return_value=httpx.Response(200, json=MESSAGE))
    out = await backend.completion(CompletionRequest(model="haiku", prompt="Colours:", max_tokens=7))
    assert out.object == "text_completion" and out.model == "haiku"
    assert out.choices[0].text == "Red, green, blue." and out.choices[0].finish_reason == "stop"
    body = json.loads(provider.calls.last.request.content)
    assert body["max_tokens"] == 7 and body["messages"][0]["content"][0]["text"] == "Colours:"


def anthropic_error(status: int, type_: str, message: str, **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"type": "error", "error": {"type": type_, "message": message}}, headers=headers)


async def test_bad_request_passes_through_with_provider_message(backend: LiteLLMBackend, provider: respx.Route) -> None:
    provider.mock(return_value=anthropic_error(400, "invalid_request_error", "temperature: range: 0..1"))
    with pytest.raises(UpstreamClientError) as info:
        await backend.chat(chat(max_tokens=5))
    assert info.value.status == 400 and info.value.message == "temperature: range: 0..1"
    assert info.value.body()["error"]["type"] == "invalid_request_error"
    assert classify(info.value) is Outcome.CLIENT_ERROR


async def test_context_window(backend: LiteLLMBackend, provider: respx.Route) -> None:
    provider.mock(return_value=anthropic_error(400, "invalid_request_error", "prompt is too long: 200001 tokens > 199999 maximum"))
    with pytest.raises(ContextLengthExceeded) as info:
        await backend.chat(chat(max_tokens=5))
    assert info.value.code == "context_length_exceeded" and "200001 tokens" in info.value.message


@pytest.mark.parametrize(("status", "type_"), [(429, "rate_limit_error"), (529, "overloaded_error")])
async def test_throttling_is_503_with_retry_after(backend: LiteLLMBackend, provider: respx.Route, status: int, type_: str) -> None:
    provider.mock(return_value=anthropic_error(status, type_, "slow down", **{"retry-after": "4"}))
    with pytest.raises(Overloaded) as info:
        await backend.chat(chat(max_tokens=5))
    assert info.value.status == 503 and info.value.retry_after == 4.0 and "slow down" in info.value.message
    assert classify(info.value) is Outcome.OVERLOADED


@pytest.mark.parametrize(
    ("response", "failure"),
    [
        (anthropic_error(401, "authentication_error", "invalid x-api-key"), "server"),
        (anthropic_error(500, "api_error", "internal"), "server"),
        (httpx.ConnectError("connection refused"), "connect"),
        (httpx.ReadTimeout("read timed out"), "timeout"),
    ],
)
async def test_other_failures_are_502(backend: LiteLLMBackend, provider: respx.Route, response: Any, failure: str) -> None:
    if isinstance(response, Exception):
        provider.mock(side_effect=response)
    else:
        provider.mock(return_value=response)
    with pytest.raises(RemoteFailure) as info:
        await backend.chat(chat(max_tokens=5))
    assert info.value.status == 502 and info.value.failure == failure
    assert "x-api-key" not in info.value.message  # nothing of the provider's auth complaint leaks
    assert backend.load().healthy is (failure != "connect")


async def test_streamed_errors_surface_before_the_first_chunk(backend: LiteLLMBackend, provider: respx.Route) -> None:
    provider.mock(return_value=anthropic_error(400, "invalid_request_error", "bad stop"))
    with pytest.raises(UpstreamClientError):
        await anext(backend.chat_stream(chat(max_tokens=5, stream=True)))
    assert backend.in_flight == 0


async def test_first_token_timeout(monkeypatch: pytest.MonkeyPatch, provider: respx.Route) -> None:
    monkeypatch.setenv(KEY_ENV, "k")
    backend = LiteLLMBackend("claude", "anthropic/claude-3-haiku-20240307", api_key_env=KEY_ENV, first_token_timeout_s=0.3)

    async def stall(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200, content=STREAM, headers={"content-type": "text/event-stream"})

    provider.mock(side_effect=stall)
    started = time.monotonic()
    with pytest.raises(RemoteFailure) as info:
        await anext(backend.chat_stream(chat(max_tokens=5, stream=True)))
    assert info.value.failure == "timeout" and time.monotonic() - started < 3
    assert backend.model_id == "claude-3-haiku-20240307"  # default id: the model string's last part


def test_missing_key_env_fails_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TURNOUT_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="TURNOUT_NO_SUCH_KEY"):
        LiteLLMBackend("x", "anthropic/claude-3-haiku-20240307", api_key_env="TURNOUT_NO_SUCH_KEY")


async def test_keep_alive_is_refused_not_dropped(backend: LiteLLMBackend, provider: respx.Route) -> None:
    """A provider cannot keep a model loaded on request: a 400 naming the field, and no call."""
    from backends.protocol import InvalidRequest

    with pytest.raises(InvalidRequest) as err:
        await backend.chat(chat(keep_alive="10m"))
    assert err.value.status == 400 and err.value.param == "keep_alive" and not provider.called


@pytest.mark.parametrize(
    "response_format",
    [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "person", "schema": {"type": "object"}, "strict": True}}],
)
def test_response_format_reaches_litellm_as_openai_spells_it(backend: LiteLLMBackend, response_format: dict) -> None:
    request = ChatCompletionRequest.model_validate(
        {"model": "haiku", "messages": [{"role": "user", "content": "hi"}], "response_format": response_format}
    )
    assert backend._chat_kwargs(request)["response_format"] == response_format  # never dropped


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_k": 5}, "top_k"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
async def test_what_is_not_passed_on_is_refused_by_name(
    backend: LiteLLMBackend, provider: respx.Route, extra: dict, param: str
) -> None:
    request = ChatCompletionRequest.model_validate({"model": "haiku", "messages": [{"role": "user", "content": "hi"}], **extra})
    with pytest.raises(InvalidRequest) as info:
        await backend.chat(request)
    assert info.value.status == 400 and info.value.param == param
    assert not provider.called


async def test_a_field_the_provider_lacks_is_a_400_not_dropped(backend: LiteLLMBackend, provider: respx.Route) -> None:
    with pytest.raises(InvalidRequest) as info:
        await backend.chat(chat(seed=7))  # Anthropic has no seed
    assert info.value.status == 400 and "seed" in info.value.message
    assert not provider.called
