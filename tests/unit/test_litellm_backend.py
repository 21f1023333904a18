"""LiteLLMBackend against mocked hosted providers (Anthropic's Messages API and an
OpenAI-compatible server, via respx): requests are translated by litellm, answers and errors
mapped to our wire types; n, tool calling and its history are passed on, never dropped."""

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


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_k": 5}, "top_k"),
        ({"logprobs": True}, "logprobs"),
        # litellm's translations drop strict (Anthropic's has no such field): refused.
        ({"tools": [WEATHER_TOOL, {"type": "function", "function": {"name": "f", "strict": True}}]}, "tools.1.function.strict"),
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
    assert info.value.status == 400 and "seed" in info.value.message and info.value.param == "seed"
    assert not provider.called


@pytest.mark.parametrize("stream", [False, True])
async def test_n_where_the_provider_has_none_is_a_400_naming_it(backend: LiteLLMBackend, provider: respx.Route, stream: bool) -> None:
    request = chat(n=2, max_tokens=5, stream=stream)
    with pytest.raises(InvalidRequest) as info:
        if stream:
            await anext(backend.chat_stream(request))
        else:
            await backend.chat(request)
    assert info.value.status == 400 and info.value.param == "n" and "anthropic does not support parameters: ['n']" in info.value.message
    assert not provider.called and backend.in_flight == 0


async def test_n_1_is_served_where_the_provider_has_no_n(backend: LiteLLMBackend, provider: respx.Route) -> None:
    provider.mock(return_value=httpx.Response(200, json=MESSAGE))
    out = await backend.chat(chat(n=1, max_tokens=5))  # the default: nothing to pass on
    assert len(out.choices) == 1 and "n" not in json.loads(provider.calls.last.request.content)


async def test_a_tool_parameter_the_provider_lacks_is_a_400_naming_it() -> None:
    backend = LiteLLMBackend("local", "ollama_chat/llama3", url="http://ollama.test")
    request = chat(tools=[WEATHER_TOOL], parallel_tool_calls=False)
    with respx.mock(assert_all_called=False) as mock:
        route = mock.route()
        with pytest.raises(InvalidRequest) as info:
            await backend.chat(request)
    assert info.value.status == 400 and info.value.param == "parallel_tool_calls" and not route.called


# -- tool calling through Anthropic's Messages API ---------------------------------------------

TOOL_USE = {
    **MESSAGE,
    "content": [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
    ],
    "stop_reason": "tool_use",
}


async def test_a_tool_call_comes_back_as_tool_calls(backend: LiteLLMBackend, provider: respx.Route) -> None:
    provider.mock(return_value=httpx.Response(200, json=TOOL_USE))
    out = await backend.chat(chat(max_tokens=50, tools=[WEATHER_TOOL]))
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert (call.id, call.type, call.function.name, json.loads(call.function.arguments)) == ("toolu_01", "function", "get_weather", {"city": "Paris"})
    assert out.model_dump(exclude_none=True)["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


# The provider's argument fragments, as Anthropic streams them.
FRAGMENTS = ['{"city": ', '"Par', 'is"}']
TOOL_STREAM = sse(
    [
        {"type": "message_start", "message": {**MESSAGE, "content": [], "stop_reason": None, "usage": {"input_tokens": 12, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Checking."}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}},
        *({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": f}} for f in FRAGMENTS),
        {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": {"output_tokens": 9}},
        {"type": "message_stop"},
    ]
)


async def test_a_streamed_tool_call_comes_back_as_deltas(backend: LiteLLMBackend, provider: respx.Route) -> None:
    provider.mock(return_value=httpx.Response(200, content=TOOL_STREAM, headers={"content-type": "text/event-stream"}))
    chunks = [c async for c in backend.chat_stream(chat(max_tokens=50, stream=True, tools=[WEATHER_TOOL]))]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Checking."
    calls = [call for d in deltas for call in d.tool_calls or []]
    assert all(d.content is None for d in deltas if d.tool_calls)  # OpenAI's shape: no "" beside a call
    first = calls[0]
    assert (first.index, first.id, first.type, first.function.name, first.function.arguments) == (0, "toolu_01", "function", "get_weather", "")
    assert all(call.index == 0 and call.id is None and call.function.name is None for call in calls[1:])
    assert [call.function.arguments for call in calls if call.function.arguments] == FRAGMENTS
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


async def test_the_tool_history_reaches_anthropic_in_its_shape(backend: LiteLLMBackend, provider: respx.Route) -> None:
    provider.mock(return_value=httpx.Response(200, json=MESSAGE))
    request = ChatCompletionRequest.model_validate(
        {
            "model": "haiku",
            "max_tokens": 50,
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "toolu_01", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
                },
                {"role": "tool", "tool_call_id": "toolu_01", "name": "get_weather", "content": "18C, sunny"},
            ],
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": False,
        }
    )
    await backend.chat(request)
    body = json.loads(provider.calls.last.request.content)
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "18C, sunny"}]},
    ]
    function = WEATHER_TOOL["function"]
    assert body["tools"] == [
        {"name": "get_weather", "description": function["description"], "input_schema": function["parameters"], "type": "custom"}
    ]
    assert body["tool_choice"] == {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}


@pytest.mark.parametrize(("tool_choice", "sent"), [("required", {"type": "any"}), ("none", {"type": "none"}), ("auto", {"type": "auto"})])
async def test_tool_choice_reaches_anthropic(backend: LiteLLMBackend, provider: respx.Route, tool_choice: str, sent: dict) -> None:
    provider.mock(return_value=httpx.Response(200, json=MESSAGE))
    await backend.chat(chat(max_tokens=5, tools=[WEATHER_TOOL], tool_choice=tool_choice))
    body = json.loads(provider.calls.last.request.content)
    assert body["tool_choice"] == sent and [t["name"] for t in body["tools"]] == ["get_weather"]


# -- n and tools through an OpenAI-compatible server -------------------------------------------

UPSTREAM = "http://upstream.test/v1"
UPSTREAM_KEY_ENV = "TURNOUT_TEST_UPSTREAM_KEY"


@pytest.fixture
def compat(monkeypatch: pytest.MonkeyPatch) -> LiteLLMBackend:
    monkeypatch.setenv(UPSTREAM_KEY_ENV, "sk-up")
    return LiteLLMBackend("vllm", "openai/llama", model_id="llama", url=UPSTREAM, api_key_env=UPSTREAM_KEY_ENV)


@pytest.fixture
def upstream() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as mock:
        yield mock


def openai_sse(chunks: list[dict[str, Any]]) -> httpx.Response:
    body = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"
    return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})


def chat_chunk(delta: dict[str, Any] | None = None, finish: str | None = None, *, index: int = 0, usage: dict | None = None) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": index, "delta": delta, "finish_reason": finish}]
    return {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": "llama", "choices": choices, "usage": usage}


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def test_n_choices_come_back_with_their_indices(compat: LiteLLMBackend, upstream: respx.MockRouter) -> None:
    answer = {
        "id": "chatcmpl-up",
        "object": "chat.completion",
        "created": 1,
        "model": "llama",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Red."}, "finish_reason": "stop"},
            {"index": 1, "message": {"role": "assistant", "content": "Blue and"}, "finish_reason": "length"},
        ],
        "usage": usage(9, 5),
    }
    route = upstream.post(f"{UPSTREAM}/chat/completions").mock(return_value=httpx.Response(200, json=answer))
    out = await compat.chat(chat(n=2, max_tokens=3))
    assert json.loads(route.calls.last.request.content)["n"] == 2
    assert [(c.index, c.message.content, c.finish_reason) for c in out.choices] == [(0, "Red.", "stop"), (1, "Blue and", "length")]
    assert out.usage is not None and (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (9, 5, 14)


async def test_streamed_n_is_one_stream_a_choice(compat: LiteLLMBackend, upstream: respx.MockRouter) -> None:
    """litellm's stream wrapper keeps one finish reason per stream: each choice is a stream of
    its own (seed + i, so they differ), merged under its index, usage summed."""
    texts, finishes = ["Red.", "Blue and"], ["stop", "length"]

    def answer(request: httpx.Request) -> httpx.Response:
        i = json.loads(request.content)["seed"] - 7
        return openai_sse(
            [
                chat_chunk({"role": "assistant", "content": texts[i][:3]}),
                chat_chunk({"content": texts[i][3:]}, finishes[i]),
                chat_chunk(usage=usage(9, 2 + i)),
            ]
        )

    route = upstream.post(f"{UPSTREAM}/chat/completions").mock(side_effect=answer)
    request = chat(n=2, seed=7, max_tokens=3, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in compat.chat_stream(request)]
    bodies = [json.loads(call.request.content) for call in route.calls]
    assert sorted(b["seed"] for b in bodies) == [7, 8] and all("n" not in b and b["stream"] for b in bodies)
    by_index: dict[int, str] = {}
    ended: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                ended[choice.index] = choice.finish_reason
    assert by_index == {0: "Red.", 1: "Blue and"} and ended == {0: "stop", 1: "length"}
    assert len({c.id for c in chunks}) == 1
    assert [c.usage for c in chunks if c.usage is not None] == [chunks[-1].usage] and not chunks[-1].choices
    assert chunks[-1].usage is not None and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (18, 5)
    assert compat.in_flight == 0


async def test_a_failing_choice_stream_fails_the_request(compat: LiteLLMBackend, upstream: respx.MockRouter) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["seed"] == 8:
            return httpx.Response(400, json={"error": {"message": "bad seed", "type": "invalid_request_error"}})
        return openai_sse([chat_chunk({"role": "assistant", "content": "Red."}, "stop")])

    upstream.post(f"{UPSTREAM}/chat/completions").mock(side_effect=answer)
    with pytest.raises(UpstreamClientError) as info:
        _ = [c async for c in compat.chat_stream(chat(n=2, seed=7, stream=True))]
    assert "bad seed" in info.value.message and compat.in_flight == 0


async def test_closing_a_streamed_n_early_closes_every_choice_stream(compat: LiteLLMBackend, upstream: respx.MockRouter) -> None:
    closed: list[int] = []

    class Stalling(httpx.AsyncByteStream):
        """One chunk, then nothing until closed (a client that went away)."""

        def __init__(self, seed: int) -> None:
            self.seed = seed

        async def __aiter__(self) -> Any:
            yield f"data: {json.dumps(chat_chunk({'role': 'assistant', 'content': 'Hm'}))}\n\n".encode()
            await asyncio.sleep(60)

        async def aclose(self) -> None:
            closed.append(self.seed)

    def answer(request: httpx.Request) -> httpx.Response:
        seed = json.loads(request.content)["seed"]
        return httpx.Response(200, stream=Stalling(seed), headers={"content-type": "text/event-stream"})

    upstream.post(f"{UPSTREAM}/chat/completions").mock(side_effect=answer)
    stream = compat.chat_stream(chat(n=2, seed=7, stream=True))
    started = time.monotonic()
    first = await anext(stream)
    assert first.choices[0].delta.content == "Hm"
    await stream.aclose()  # type: ignore[attr-defined]
    assert sorted(closed) == [7, 8] and compat.in_flight == 0 and time.monotonic() - started < 5


async def test_n_text_completions_streamed_and_not(compat: LiteLLMBackend, upstream: respx.MockRouter) -> None:
    def text_choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}

    whole = {"id": "cmpl-up", "object": "text_completion", "created": 1, "model": "llama", "usage": usage(2, 4)}
    whole["choices"] = [text_choice(0, " red", "stop"), text_choice(1, " blue", "length")]
    route = upstream.post(f"{UPSTREAM}/completions").mock(return_value=httpx.Response(200, json=whole))
    out = await compat.completion(CompletionRequest(model="llama", prompt="Colours:", n=2, max_tokens=2))
    assert json.loads(route.calls.last.request.content)["n"] == 2
    assert [(c.index, c.text, c.finish_reason) for c in out.choices] == [(0, " red", "stop"), (1, " blue", "length")]
    assert out.usage is not None and out.usage.total_tokens == 6

    def answer(request: httpx.Request) -> httpx.Response:
        i = json.loads(request.content)["seed"]
        texts, finishes = [" red", " blue"], ["stop", "length"]
        pieces = (text_choice(0, texts[i], None), text_choice(0, "", finishes[i]))
        return openai_sse([{**whole, "usage": None, "choices": [piece]} for piece in pieces])

    route.mock(side_effect=answer)
    pieces = [c async for c in compat.completion_stream(CompletionRequest(model="llama", prompt="Colours:", n=2, seed=0, stream=True))]
    texts: dict[int, str] = {}
    ended: dict[int, str] = {}
    for piece in pieces:
        for choice in piece.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                ended[choice.index] = choice.finish_reason
    assert texts == {0: " red", 1: " blue"} and ended == {0: "stop", 1: "length"}


async def test_the_tool_history_reaches_an_openai_server_as_sent(compat: LiteLLMBackend, upstream: respx.MockRouter) -> None:
    answer = {
        "id": "chatcmpl-up",
        "object": "chat.completion",
        "created": 1,
        "model": "llama",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": usage(30, 8),
    }
    route = upstream.post(f"{UPSTREAM}/chat/completions").mock(return_value=httpx.Response(200, json=answer))
    history = [
        {"role": "user", "content": "Paris, then Rome."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18C"},
    ]
    request = ChatCompletionRequest.model_validate(
        {"model": "llama", "messages": history, "tools": [WEATHER_TOOL], "tool_choice": "required", "parallel_tool_calls": True}
    )
    out = await compat.chat(request)
    body = json.loads(route.calls.last.request.content)
    assert body["messages"] == [history[0], {k: v for k, v in history[1].items() if k != "content"}, history[2]]  # litellm leaves out a null content
    assert body["tools"] == [WEATHER_TOOL] and body["tool_choice"] == "required" and body["parallel_tool_calls"] is True
    calls = out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "tool_calls" and calls is not None
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [("call_2", "get_weather", '{"city": "Rome"}')]


async def test_parallel_streamed_tool_calls_keep_their_indices_and_fragments(compat: LiteLLMBackend, upstream: respx.MockRouter) -> None:
    def call(index: int, arguments: str, id_: str | None = None, name: str | None = None) -> dict[str, Any]:
        fragment: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
        if id_ is not None:
            fragment.update(id=id_, type="function")
            fragment["function"]["name"] = name
        return chat_chunk({"tool_calls": [fragment]})

    # Two calls, their fragments interleaved.
    sent = [
        call(0, "", "call_a", "get_weather"),
        call(0, '{"city"'),
        call(1, "", "call_b", "get_weather"),
        call(1, '{"city": "Rome"}'),
        call(0, ': "Paris"}'),
    ]
    upstream.post(f"{UPSTREAM}/chat/completions").mock(
        return_value=openai_sse([chat_chunk({"role": "assistant", "content": None}), *sent, chat_chunk({}, "tool_calls")])
    )
    chunks = [c async for c in compat.chat_stream(chat(stream=True, tools=[WEATHER_TOOL]))]
    got = [
        (t.index, t.id, t.function.name, t.function.arguments)
        for c in chunks
        for choice in c.choices
        for t in choice.delta.tool_calls or []
    ]
    fragments = [f for c in sent for f in c["choices"][0]["delta"]["tool_calls"]]
    expected = [(f["index"], f.get("id"), f["function"].get("name"), f["function"]["arguments"]) for f in fragments]
    assert got == expected
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
