"""Anthropic's Messages API dialect without a model: request validation and its wording, the
translation onto the contract, the Message and the event stream written from the contract's
answers, and which stop sequence matched."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import ValidationError

from backends.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    ChunkFunctionCall,
    ChunkToolCall,
    InvalidRequest,
    ResponseFunctionCall,
    ResponseMessage,
    ResponseToolCall,
    TokenLogprob,
    UpstreamError,
    Usage,
)
from gateway.dialects.anthropic import to_contract, validation_message
from gateway.dialects.anthropic_stream import MessagesDialect, StopSeen, tool_use_id
from gateway.dialects.anthropic_types import CountTokensRequest, MessagesRequest

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
TOOLS = [{"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER}]
HI = [{"role": "user", "content": "Hi"}]


def request(**fields: Any) -> MessagesRequest:
    return MessagesRequest.model_validate({"model": "m", "max_tokens": 8, "messages": HI, **fields})


def error_of(**fields: Any) -> str:
    """The Anthropic-worded 400 message for a body with `fields` over a valid one."""
    body = {"model": "m", "max_tokens": 8, "messages": HI, **fields}
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(ValidationError) as info:
        MessagesRequest.model_validate(body)
    return validation_message([{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()])


# -- validation -----------------------------------------------------------------------------------


def test_missing_max_tokens_is_named() -> None:
    assert error_of(max_tokens=None) == "max_tokens: Field required"


def test_bad_role_is_named() -> None:
    assert error_of(messages=[{"role": "system", "content": "x"}]) == "messages.0.role: Input should be 'user' or 'assistant'"


def test_unknown_fields_are_extra_inputs() -> None:
    assert error_of(frequency_penalty=1) == "frequency_penalty: Extra inputs are not permitted"
    nested = error_of(messages=[{"role": "user", "content": [{"type": "text", "text": "x", "foo": 1}]}])
    assert nested == "messages.0.content.0.foo: Extra inputs are not permitted"


def test_image_blocks_are_refused_by_type() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
    assert error_of(messages=[{"role": "user", "content": [image]}]) == "messages.0.content.0: content blocks of type 'image' are not supported by this server"
    in_result = [{"type": "tool_result", "tool_use_id": "t", "content": [image]}]
    assert "content blocks of type 'image' are not supported" in error_of(messages=[{"role": "user", "content": in_result}])


def test_unknown_block_type_lists_the_served_ones() -> None:
    message = error_of(messages=[{"role": "user", "content": [{"type": "video"}]}])
    assert message.startswith("messages.0.content.0: Input tag 'video'") and "'text', 'tool_use', 'tool_result'" in message


def test_blocks_out_of_their_turn_are_refused() -> None:
    use = {"type": "tool_use", "id": "t", "name": "get_weather", "input": {}}
    assert "tool_use blocks may only appear in assistant messages" in error_of(messages=[{"role": "user", "content": [use]}])
    result = {"type": "tool_result", "tool_use_id": "t", "content": "x"}
    assert "tool_result blocks may only appear in user messages" in error_of(messages=[*HI, {"role": "assistant", "content": [result]}, *HI])


def test_temperature_follows_anthropics_range() -> None:
    assert error_of(temperature=1.5) == "temperature: Input should be less than or equal to 1"
    assert request(temperature=1).temperature == 1


def test_tool_schema_must_be_an_object_schema() -> None:
    assert "the schema's type must be 'object'" in error_of(tools=[{"name": "f", "input_schema": {"type": "string"}}])


def test_server_tools_are_refused() -> None:
    message = error_of(tools=[{"type": "web_search_20250305", "name": "web_search"}])
    assert message.startswith("tools.0: server tools (type 'web_search_20250305') are not supported")


def test_tool_choice_tool_needs_a_name() -> None:
    assert "name is required when type is 'tool'" in error_of(tools=TOOLS, tool_choice={"type": "tool"})


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "thinking"),
        ({"mcp_servers": [{"type": "url", "url": "http://127.0.0.1:1", "name": "x"}]}, "mcp_servers"),
        ({"container": "c"}, "container"),
        ({"speed": "fast"}, "speed"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_fields_not_served_are_refused_by_name(fields: dict[str, Any], field: str) -> None:
    refused = request(**fields).refused_fields()
    assert refused and refused[0][0] == field and "not supported by this server" in refused[0][1]


def test_fields_that_ask_for_nothing_pass() -> None:
    body = request(thinking={"type": "disabled"}, service_tier="standard_only", speed="standard", cache_control={"type": "ephemeral"})
    assert body.refused_fields() == []


def test_effort_is_refused() -> None:
    assert "effort level is not supported" in error_of(output_config={"effort": "high"})


def test_malformed_json_is_worded() -> None:
    message = validation_message([{"type": "json_invalid", "loc": ("body", 3), "msg": "JSON decode error", "ctx": {"error": "Expecting value"}}])
    assert message == "The request body is not valid JSON: Expecting value"


# -- translation ------------------------------------------------------------------------------------


def test_a_conversation_with_tools_becomes_the_contracts() -> None:
    body = request(
        system=[{"type": "text", "text": "Be brief."}],
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Let me see."}, {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris", "unit": "celsius"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18C"}]},
                {"type": "text", "text": "And tomorrow?"},
            ]},
        ],
        tools=TOOLS,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        stop_sequences=["\n\n"],
        metadata={"user_id": "u-1"},
        temperature=0.5,
        top_k=5,
        stream=True,
    )  # fmt: skip
    contract, origins = to_contract(body)
    roles = [m.role for m in contract.messages]
    assert roles == ["system", "user", "assistant", "tool", "user"]
    assert origins == ["system", "messages.0", "messages.1", "messages.2.content.0", "messages.2"]
    call = contract.messages[2].tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == ("toolu_1", "get_weather", {"city": "Paris", "unit": "celsius"})
    assert contract.messages[2].text() == "Let me see."
    assert (contract.messages[3].tool_call_id, contract.messages[3].text()) == ("toolu_1", "18C")
    assert contract.tools[0].function.parameters == WEATHER and contract.tools[0].function.description == "The weather in a city"
    assert contract.tool_choice == "required" and contract.parallel_tool_calls is False
    assert contract.stop == ["\n\n"] and contract.logprobs is True  # logprobs: to tell which stop matched
    assert (contract.user, contract.temperature, contract.top_k, contract.max_tokens, contract.stream) == ("u-1", 0.5, 5, 8, True)


def test_an_error_result_says_so() -> None:
    history = [*HI, {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "no such city", "is_error": True}]}]  # fmt: skip
    contract, _ = to_contract(request(messages=history, tools=TOOLS))
    assert contract.messages[-1].role == "tool" and contract.messages[-1].text() == "Error: no such city"


@pytest.mark.parametrize(
    ("choice", "expected"),
    [({"type": "auto"}, "auto"), ({"type": "none"}, "none"), ({"type": "any"}, "required")],
)
def test_tool_choice_maps(choice: dict[str, Any], expected: str) -> None:
    contract, _ = to_contract(request(tools=TOOLS, tool_choice=choice))
    assert contract.tool_choice == expected and contract.parallel_tool_calls is None


def test_named_tool_choice_maps() -> None:
    contract, _ = to_contract(request(tools=TOOLS, tool_choice={"type": "tool", "name": "get_weather"}))
    assert contract.tool_choice.function.name == "get_weather"


def test_output_format_is_a_json_schema_response_format() -> None:
    contract, _ = to_contract(request(output_config={"format": {"type": "json_schema", "schema": WEATHER}}))
    assert contract.response_format.schema_object() == WEATHER


def test_count_tokens_asks_for_one_greedy_token() -> None:
    body = CountTokensRequest.model_validate({"model": "m", "messages": HI, "system": "S", "tools": TOOLS})
    contract, _ = to_contract(body)
    assert (contract.max_tokens, contract.temperature, contract.stream) == (1, 0.0, False)
    assert contract.messages[0].role == "system" and contract.tools


def test_prefill_is_refused() -> None:
    with pytest.raises(InvalidRequest, match=r"messages\.1: a final assistant message \(prefill\) is not supported"):
        to_contract(request(messages=[*HI, {"role": "assistant", "content": "The answer is"}]))


def test_a_result_for_no_call_is_refused() -> None:
    history = [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "nope", "content": "x"}]}]
    with pytest.raises(InvalidRequest, match=r"messages\.0\.content\.0: tool_result block's tool_use_id 'nope' does not match"):
        to_contract(request(messages=history))


@pytest.mark.parametrize(
    ("fields", "start"),
    [
        ({"stop_sequences": ["a", "b", "c", "d", "e"]}, "stop_sequences: "),
        ({"tools": [{"name": "f", "input_schema": {"type": "object", "properties": {"x": {"type": "nonsense"}}}}]}, "tools.0.input_schema: invalid JSON Schema"),
        ({"tools": TOOLS, "tool_choice": {"type": "tool", "name": "other"}}, "tool_choice: tool_choice names function 'other'"),
        ({"tool_choice": {"type": "any"}}, "tool_choice: tool_choice requires tools"),
        ({"top_p": 0}, "top_p: "),
    ],
)
def test_what_the_contract_refuses_names_anthropics_field(fields: dict[str, Any], start: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        to_contract(request(**fields))
    assert info.value.message.startswith(start), info.value.message


# -- which stop sequence ------------------------------------------------------------------------------


def _seen(stops: list[str], text: str, tokens: list[str]) -> StopSeen:
    seen = StopSeen(stops)
    seen.add(text, ChoiceLogprobs(content=[TokenLogprob(token=t, logprob=0.0) for t in tokens]))
    return seen


def test_the_stripped_stop_sequence_is_found_in_the_tokens() -> None:
    assert _seen(["5", "x"], "1, 2, 3, 4, ", ["1", ",", " 2", ",", " 3", ",", " 4", ",", " ", "5"]).matched() == "5"
    assert _seen(["END"], "ab", ["a", "bE", "ND"]).matched() == "END"  # across a token boundary


def test_an_end_of_turn_matches_nothing() -> None:
    assert _seen(["5"], "Hello!", ["Hello", "!"]).matched() is None
    assert StopSeen([]).matched() is None


# -- answers ---------------------------------------------------------------------------------------


def _completion(content: str | None, finish: str, calls: list[tuple[str, str]] = (), tokens: list[str] | None = None) -> ChatCompletion:
    tool_calls = [ResponseToolCall(id=f"call_{i}", function=ResponseFunctionCall(name=n, arguments=a)) for i, (n, a) in enumerate(calls)]
    logprobs = ChoiceLogprobs(content=[TokenLogprob(token=t, logprob=0.0) for t in tokens]) if tokens is not None else None
    message = ResponseMessage(content=content, tool_calls=tool_calls or None)
    return ChatCompletion(model="backend-name", choices=[ChatChoice(message=message, finish_reason=finish, logprobs=logprobs)],
                          usage=Usage(prompt_tokens=11, completion_tokens=3, total_tokens=14))  # fmt: skip


def test_a_message_with_text_and_a_tool_call() -> None:
    result = _completion("Sure.", "tool_calls", [("get_weather", '{"city": "Paris"}')])
    message = json.loads(MessagesDialect(model="asked", stop_sequences=[]).answer(result))
    assert message["id"].startswith("msg_") and message["type"] == "message" and message["role"] == "assistant"
    assert message["model"] == "asked"
    text, use = message["content"]
    assert text == {"type": "text", "text": "Sure."}
    assert use["type"] == "tool_use" and use["id"] == "toolu_0" and use["name"] == "get_weather" and use["input"] == {"city": "Paris"}
    assert (message["stop_reason"], message["stop_sequence"]) == ("tool_use", None)
    assert message["usage"]["input_tokens"] == 11 and message["usage"]["output_tokens"] == 3


@pytest.mark.parametrize(("finish", "reason"), [("stop", "end_turn"), ("length", "max_tokens"), ("content_filter", "refusal")])
def test_stop_reasons(finish: str, reason: str) -> None:
    message = json.loads(MessagesDialect(model="m", stop_sequences=["zz"]).answer(_completion("a", finish, tokens=["a"])))
    assert message["stop_reason"] == reason and message["stop_sequence"] is None


def test_a_matched_stop_sequence_is_named() -> None:
    message = json.loads(MessagesDialect(model="m", stop_sequences=["zz", "."]).answer(_completion("Hi", "stop", tokens=["Hi", "."])))
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", ".")


def test_arguments_that_are_not_an_object_are_a_502() -> None:
    with pytest.raises(UpstreamError, match="not a JSON object"):
        MessagesDialect(model="m", stop_sequences=[]).answer(_completion(None, "tool_calls", [("f", "[1]")]))


def test_tool_use_ids() -> None:
    assert tool_use_id("call_abc") == "toolu_abc" and tool_use_id("toolu_x") == "toolu_x" and tool_use_id(None).startswith("toolu_")


# -- streams ---------------------------------------------------------------------------------------


def _chunk(content: str | None = None, *, calls: list[ChunkToolCall] | None = None, finish: str | None = None,
           usage: Usage | None = None, tokens: list[str] | None = None) -> ChatCompletionChunk:  # fmt: skip
    logprobs = ChoiceLogprobs(content=[TokenLogprob(token=t, logprob=0.0) for t in tokens]) if tokens else None
    choices = [] if usage is not None else [ChunkChoice(delta=ChunkDelta(content=content, tool_calls=calls), finish_reason=finish, logprobs=logprobs)]
    return ChatCompletionChunk(id="c", created=0, model="b", choices=choices, usage=usage)


def _call(index: int, id: str | None = None, name: str | None = None, arguments: str | None = None) -> ChunkToolCall:
    return ChunkToolCall(index=index, id=id, type="function" if id else None, function=ChunkFunctionCall(name=name, arguments=arguments))


def _events(dialect: MessagesDialect, chunks: list[ChatCompletionChunk]) -> list[tuple[str, dict[str, Any]]]:
    async def source() -> AsyncIterator[ChatCompletionChunk]:
        for chunk in chunks:
            yield chunk

    async def collect() -> bytes:
        return b"".join([data async for data in dialect.events(source())])

    raw = asyncio.run(collect()).decode()
    out = []
    for frame in raw.split("\n\n")[:-1]:
        name_line, data_line = frame.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name_line.removeprefix("event: ")
        out.append((data["type"], data))
    return out


def test_a_streamed_text_answer() -> None:
    chunks = [_chunk(""), _chunk("Hel"), _chunk("lo"), _chunk(None, finish="length"), _chunk(usage=Usage(prompt_tokens=9, completion_tokens=2, total_tokens=11))]
    events = _events(MessagesDialect(model="asked", stop_sequences=[]), chunks)
    names = [n for n, _ in events]
    assert names == ["message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_") and start["content"] == [] and start["model"] == "asked" and start["stop_reason"] is None
    assert events[2][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert [e["delta"] for _, e in events[3:5]] == [{"type": "text_delta", "text": "Hel"}, {"type": "text_delta", "text": "lo"}]
    delta = events[6][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"] == {"input_tokens": 9, "output_tokens": 2}  # the prompt's tokens reach the client here


def test_a_streamed_answer_with_text_then_two_tool_calls() -> None:
    chunks = [
        _chunk("Checking."),
        _chunk(calls=[_call(0, "call_a", "get_weather", "")]),
        _chunk(calls=[_call(0, arguments='{"city": ')]),
        _chunk(calls=[_call(0, arguments='"Paris"}')]),
        _chunk(calls=[_call(1, "call_b", "get_weather", '{"city": "Rome"}')]),
        _chunk(None, finish="tool_calls"),
        _chunk(usage=Usage(prompt_tokens=9, completion_tokens=20, total_tokens=29)),
    ]
    events = _events(MessagesDialect(model="m", stop_sequences=[]), chunks)
    starts = [e for n, e in events if n == "content_block_start"]
    assert [s["index"] for s in starts] == [0, 1, 2]
    assert starts[1]["content_block"] == {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {}}
    assert starts[2]["content_block"]["id"] == "toolu_b"
    partial = "".join(e["delta"]["partial_json"] for n, e in events if n == "content_block_delta" and e["index"] == 1)
    assert json.loads(partial) == {"city": "Paris"}
    assert [e["index"] for n, e in events if n == "content_block_stop"] == [0, 1, 2]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_a_streamed_stop_sequence_is_named() -> None:
    # The backend held the stop's text back (empty deltas) and stripped it; its tokens still say.
    chunks = [_chunk("1, 2", tokens=["1", ",", " 2"]), _chunk("", tokens=[","]), _chunk("", tokens=[" 3"]), _chunk(None, finish="stop")]
    events = _events(MessagesDialect(model="m", stop_sequences=[", 3"]), chunks)
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": ", 3"}


def test_closing_the_events_closes_the_backend_stream() -> None:
    closed = asyncio.Event()

    async def source() -> AsyncIterator[ChatCompletionChunk]:
        try:
            while True:
                yield _chunk("x")
        finally:
            closed.set()  # a generation's stream is cancelled in its finally

    async def leave_early() -> None:
        events = MessagesDialect(model="m", stop_sequences=[]).events(source())
        for _ in range(4):
            await anext(events)
        await events.aclose()

    asyncio.run(leave_early())
    assert closed.is_set()


def test_the_in_band_error_is_anthropics() -> None:
    dialect = MessagesDialect(model="m", stop_sequences=[])
    name, data = dialect.stream_error(UpstreamError("upstream went away")).decode().split("\n")[:2]
    assert name == "event: error"
    assert json.loads(data.removeprefix("data: ")) == {"type": "error", "error": {"type": "api_error", "message": "upstream went away"}}
    unknown = json.loads(dialect.stream_error(None).decode().split("\n")[1].removeprefix("data: "))
    assert unknown["type"] == "error" and unknown["error"]["type"] == "api_error"
