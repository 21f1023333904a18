"""OpenAI's Responses API as a dialect (gateway/dialects/responses*.py), without a model: the
translation of its requests onto the contract, its refusals (400s in OpenAI's shape naming
the field), the Response object and the `response.*` events (validated with the official
`openai` package's own types and folded by its stream accumulator), and the whole path over
HTTP with the official client against a scripted OpenAI-shaped upstream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response as SDKResponse
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from backends.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkDelta,
    ChunkFunctionCall,
    ChunkToolCall,
    ContextLengthExceeded,
    InvalidRequest,
    NamedToolChoice,
    ResponseFunctionCall,
    ResponseMessage,
    ResponseToolCall,
    UpstreamError,
    Usage,
)
from gateway.app import create_app
from gateway.dialects.responses_stream import ResponsesDialect
from gateway.dialects.responses_translate import chat_request, renamed, template, to_chat
from gateway.dialects.responses_types import ResponsesRequest
from policies.schema import Config, ServerConfig
from tests.conftest import asgi_in_thread, read_body

EVENT = TypeAdapter(ResponseStreamEvent)
ADD = {"type": "function", "name": "add", "description": "Add two integers",
       "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}  # fmt: skip


def parse(**fields: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", "input": "hi", **fields})


def chat(**fields: Any) -> ChatCompletionRequest:
    return chat_request(parse(**fields), ServerConfig())


# -- translation ---------------------------------------------------------------------------------


def test_string_input_and_instructions_become_a_system_then_a_user_message() -> None:
    body = chat(instructions="Be brief.", max_output_tokens=12, temperature=0.5, top_p=0.9, user="u1", stream=True)
    assert [(m.role, m.content) for m in body.messages] == [("system", "Be brief."), ("user", "hi")]
    assert (body.max_completion_tokens, body.output_limit(), body.temperature, body.top_p, body.user, body.stream) == (12, 12, 0.5, 0.9, "u1", True)
    assert chat(safety_identifier="s1").user == "s1"


def test_items_become_the_chats_messages_with_calls_and_results() -> None:
    items = [
        {"role": "developer", "content": "Use tools."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Add "}, {"type": "input_text", "text": "2 and 3."}]},
        {"type": "function_call", "call_id": "call_a", "name": "add", "arguments": '{"a": 2, "b": 3}', "id": "fc_1", "status": "completed"},
        {"type": "function_call", "call_id": "call_b", "name": "add", "arguments": '{"a": 1, "b": 1}'},
        {"type": "function_call_output", "call_id": "call_a", "output": "5"},
        {"type": "function_call_output", "call_id": "call_b", "output": [{"type": "input_text", "text": "2"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "5 and 2.", "annotations": []}]},
    ]  # fmt: skip
    body = chat(input=items, tools=[ADD])
    roles = [m.role for m in body.messages]
    assert roles == ["developer", "user", "assistant", "tool", "tool", "assistant"]
    assert body.messages[1].text() == "Add 2 and 3."
    calls = body.messages[2].tool_calls
    assert [(c.id, c.function.name, c.function.parsed_arguments()) for c in calls] == [("call_a", "add", {"a": 2, "b": 3}), ("call_b", "add", {"a": 1, "b": 1})]
    assert body.messages[2].content is None
    assert [(m.tool_call_id, m.text(), m.name) for m in body.messages[3:5]] == [("call_a", "5", "add"), ("call_b", "2", "add")]
    assert body.messages[5].text() == "5 and 2."


def test_an_assistant_message_and_its_calls_are_one_turn() -> None:
    items = [{"role": "user", "content": "Add."}, {"role": "assistant", "content": "Adding."},
             {"type": "function_call", "call_id": "c1", "name": "add", "arguments": "{}"}]  # fmt: skip
    body = chat(input=items, tools=[ADD])
    assert [m.role for m in body.messages] == ["user", "assistant"]
    assert body.messages[1].content == "Adding." and body.messages[1].tool_calls[0].id == "c1"


def test_function_tools_tool_choice_and_text_format_map_onto_the_contract() -> None:
    body = chat(tools=[{**ADD, "strict": True}], tool_choice={"type": "function", "name": "add"}, parallel_tool_calls=False)
    fn = body.tools[0].function
    assert (fn.name, fn.description, fn.parameters, fn.strict) == ("add", "Add two integers", ADD["parameters"], True)
    assert isinstance(body.tool_choice, NamedToolChoice) and body.tool_choice.function.name == "add"
    assert body.parallel_tool_calls is False
    assert chat(tools=[ADD], tool_choice="required").tool_choice == "required"
    assert chat(tools=[ADD], tool_choice="none").tools_in_use() == []
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    fmt = chat(text={"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}}).response_format
    assert fmt.type == "json_schema" and fmt.json_schema.name == "thing" and fmt.schema_object() == schema and fmt.json_schema.strict
    assert chat(text={"format": {"type": "json_object"}}).response_format.type == "json_object"
    assert chat(text={"format": {"type": "text"}, "verbosity": "medium"}).response_format is None


def test_what_turnout_serves_by_doing_nothing_is_accepted() -> None:
    body = chat(store=False, truncation="disabled", background=False, include=[], reasoning={"effort": None}, service_tier="auto",
                metadata={"team": "a"}, prompt_cache_key="k", top_logprobs=0)  # fmt: skip
    assert body.messages[0].content == "hi"


REFUSED = [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "stateless"),
    ({"conversation": "conv_1"}, "conversation", "stateless"),
    ({"store": True}, "store", "keeps no responses"),
    ({"include": ["message.output_text.logprobs"]}, "include", "not supported"),
    ({"reasoning": {"effort": "high"}}, "reasoning", "not reasoning models"),
    ({"background": True}, "background", "foreground"),
    ({"truncation": "auto"}, "truncation", "never cut"),
    ({"top_logprobs": 3}, "top_logprobs", "not supported"),
    ({"max_tool_calls": 2}, "max_tool_calls", "not supported"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt", "not supported"),
    ({"service_tier": "flex"}, "service_tier", "one service tier"),
    ({"text": {"verbosity": "low"}}, "text.verbosity", "not supported"),
    ({"stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation", "not supported"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type", "'web_search' are not supported"),
    ({"tools": [ADD, {"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools.1.type", "'file_search' are not supported"),
    ({"tools": [{**ADD, "defer_loading": True}]}, "tools.0.defer_loading", "not supported"),
    ({"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}}, "tool_choice", "'allowed_tools' is not supported"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/a.png"}]}]}, "input.0.content.0.type", "'input_image' is not supported"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}]}, "input.0.content.0.type", "'input_file' is not supported"),
    ({"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}, "input.0.type", "'reasoning' are not supported"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type", "'item_reference' are not supported"),
    ({"input": [{"role": "user", "content": "x", "cache": True}]}, "input.0.cache", "not supported"),
    ({"frequency_penalty": 1}, "frequency_penalty", "Unknown parameter"),
]


@pytest.mark.parametrize(("fields", "param", "words"), REFUSED, ids=[r[1] + "-" + str(i) for i, r in enumerate(REFUSED)])
def test_what_turnout_does_not_serve_is_a_400_naming_it(fields: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        chat(**fields)
    assert caught.value.status == 400 and caught.value.param == param
    assert words in caught.value.message and param.split(".")[0] in caught.value.message.lower()


def test_what_the_contract_refuses_names_the_responses_field() -> None:
    cases = [
        ({"tools": [{**ADD, "parameters": {"type": "objekt"}}]}, "tools.0.parameters"),
        ({"tools": [ADD], "tool_choice": {"type": "function", "name": "sub"}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [ADD, ADD]}, "tools"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 5}}}}, "text.format.schema"),
        ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
        ({"input": []}, "input"),
    ]
    for fields, param in cases:
        with pytest.raises(InvalidRequest) as caught:
            chat(**fields)
        assert caught.value.param == param, (fields, caught.value.message)
        assert f"'{param}'" in caught.value.message


def test_the_policys_request_bounds_hold_for_input_items() -> None:
    server = ServerConfig(max_messages=2, max_message_bytes=64)
    with pytest.raises(InvalidRequest) as caught:
        chat_request(parse(input=[{"role": "user", "content": "a"}] * 3), server)
    assert caught.value.param == "input" and "'input'" in caught.value.message
    with pytest.raises(InvalidRequest) as caught:
        chat_request(parse(input=[{"role": "user", "content": "a"}, {"role": "user", "content": "b" * 100}]), server)
    assert caught.value.param == "input.1.content" and "'input.1.content'" in caught.value.message


def test_a_backends_400_names_the_responses_field() -> None:
    _, origin = to_chat(parse(instructions="Be brief.", input=[{"role": "user", "content": "a"}]), ServerConfig())
    exc = renamed(ContextLengthExceeded("Invalid 'messages.1.content': too long.", param="messages.1.content"), origin)
    assert isinstance(exc, ContextLengthExceeded) and exc.param == "input.0.content" and exc.message == "Invalid 'input.0.content': too long."
    strict = renamed(InvalidRequest("strict function tools are not supported", param="tools.0.function.strict"), origin)
    assert strict.param == "tools.0.strict"
    assert renamed(InvalidRequest("too long", param="messages"), origin).param == "input"


# -- the Response object -------------------------------------------------------------------------


def completion(content: str | None, calls: list[tuple[str, str]] = (), finish: str = "stop") -> ChatCompletion:  # type: ignore[assignment]
    tool_calls = [ResponseToolCall(id=f"call_{i}", function=ResponseFunctionCall(name=n, arguments=a)) for i, (n, a) in enumerate(calls)]
    message = ResponseMessage(content=content, tool_calls=tool_calls or None)
    return ChatCompletion(model="m", choices=[ChatChoice(message=message, finish_reason=finish)], usage=Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8))


def answer(result: ChatCompletion, **fields: Any) -> SDKResponse:
    body = ResponsesDialect(template(parse(**fields)), streamed=False).answer(result)
    return SDKResponse.model_validate_json(body)  # the official client's own type


def test_a_whole_answer_is_the_response_object_with_settings_echoed() -> None:
    fields = {"instructions": "Be brief.", "max_output_tokens": 9, "temperature": 0.2, "top_p": 0.5, "metadata": {"k": "v"}, "tools": [ADD],
              "tool_choice": "auto", "parallel_tool_calls": False, "text": {"format": {"type": "json_object"}}, "user": "u"}  # fmt: skip
    r = answer(completion("Hello."), **fields)
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed" and r.completed_at
    assert r.incomplete_details is None and r.error is None
    [message] = r.output
    assert message.type == "message" and message.id.startswith("msg_") and message.role == "assistant" and message.status == "completed"
    assert message.content[0].type == "output_text" and message.content[0].annotations == [] and r.output_text == "Hello."
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (5, 3, 8)
    assert r.usage.input_tokens_details.cached_tokens == 0 and r.usage.output_tokens_details.reasoning_tokens == 0
    assert (r.instructions, r.max_output_tokens, r.temperature, r.top_p, r.metadata, r.user) == ("Be brief.", 9, 0.2, 0.5, {"k": "v"}, "u")
    assert r.tools[0].name == "add" and r.tool_choice == "auto" and r.parallel_tool_calls is False
    assert r.text.format.type == "json_object" and r.model_extra["store"] is False and r.truncation == "disabled"


def test_tool_calls_are_function_call_items_and_a_cut_answer_is_incomplete() -> None:
    r = answer(completion(None, [("add", '{"a": 1, "b": 2}'), ("add", '{"a": 3, "b": 4}')], "tool_calls"), tools=[ADD])
    assert [o.type for o in r.output] == ["function_call", "function_call"] and r.status == "completed"
    assert all(o.id.startswith("fc_") and o.call_id.startswith("call_") and o.name == "add" and o.status == "completed" for o in r.output)
    assert json.loads(r.output[1].arguments) == {"a": 3, "b": 4}
    cut = answer(completion("Once upon", finish="length"), max_output_tokens=2)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens" and cut.completed_at is None
    assert cut.output[0].status == "incomplete" and cut.output_text == "Once upon"
    empty = answer(completion(None))
    assert [o.type for o in empty.output] == ["message"] and empty.output_text == ""


# -- the stream ----------------------------------------------------------------------------------


def chunk(content: str | None = None, call: tuple[int, str | None, str | None, str] | None = None, finish: str | None = None) -> ChatCompletionChunk:
    calls = None
    if call is not None:
        index, call_id, name, args = call
        calls = [ChunkToolCall(index=index, id=call_id, type="function" if call_id else None, function=ChunkFunctionCall(name=name, arguments=args))]
    return ChatCompletionChunk(id="c", created=1, model="m", choices=[ChunkChoice(delta=ChunkDelta(content=content, tool_calls=calls), finish_reason=finish)])


USAGE = ChatCompletionChunk(id="c", created=1, model="m", choices=[], usage=Usage(prompt_tokens=4, completion_tokens=6, total_tokens=10))


async def _events(dialect: ResponsesDialect, chunks: list[ChatCompletionChunk]) -> bytes:
    async def source() -> AsyncIterator[ChatCompletionChunk]:
        for c in chunks:
            yield c

    return b"".join([data async for data in dialect.events(source())])


def events_of(raw: bytes) -> list[dict[str, Any]]:
    """The SSE events, each checked: `event:` is the data's type, sequence numbers count from 0,
    and the data validates as the official client's event type."""
    out = []
    for block in raw.decode().split("\n\n")[:-1]:
        head, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert head == f"event: {event['type']}"
        EVENT.validate_python(event)
        out.append(event)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


def stream(chunks: list[ChatCompletionChunk], **fields: Any) -> tuple[list[dict[str, Any]], Any]:
    """The events of `chunks`, and the final response the official client's accumulator makes of them."""
    events = events_of(asyncio.run(_events(ResponsesDialect(template(parse(**fields)), streamed=True), chunks)))
    state = ResponseStreamState(input_tools=fields.get("tools", []), text_format=openai.omit)
    for event in events:
        state.handle_event(EVENT.validate_python(event))
    return events, state._completed_response


def test_a_text_stream_is_the_response_events_in_order() -> None:
    events, final = stream([chunk("Hel"), chunk("lo"), chunk(finish="stop"), USAGE])
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == "Hello" == events[6]["text"] == final.output_text
    item_id = events[2]["item"]["id"]
    assert all(e["item_id"] == item_id for e in events[3:8]) and events[8]["item"]["status"] == "completed"
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["usage"]["input_tokens"] == 4 and done["usage"]["output_tokens"] == 6
    assert final.id == events[0]["response"]["id"]


def test_streamed_calls_are_function_call_items_with_argument_deltas() -> None:
    chunks = [chunk(call=(0, "call_x", "add", "")), chunk(call=(0, None, None, '{"a": 2,')), chunk(call=(0, None, None, ' "b": 3}')),
              chunk(call=(1, "call_y", "add", '{"a": 1, "b": 1}')), chunk(finish="tool_calls"), USAGE]  # fmt: skip
    events, final = stream(chunks, tools=[ADD])
    kinds = [e["type"] for e in events]
    assert kinds[2:] == [
        "response.output_item.added", "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    assert events[2]["item"]["call_id"] == "call_x" and events[2]["item"]["arguments"] == "" and events[2]["output_index"] == 0
    assert events[5]["arguments"] == '{"a": 2, "b": 3}' and events[7]["output_index"] == 1
    assert [(o.type, o.call_id, json.loads(o.arguments)) for o in final.output] == [
        ("function_call", "call_x", {"a": 2, "b": 3}), ("function_call", "call_y", {"a": 1, "b": 1})
    ]  # fmt: skip
    assert final.output[0].parsed_arguments is None  # not strict: the client leaves them as text


def test_a_stream_cut_at_max_output_tokens_ends_incomplete() -> None:
    events, _ = stream([chunk("Once"), chunk(" upon", finish="length"), USAGE], max_output_tokens=2)
    last = events[-1]
    assert last["type"] == "response.incomplete" and last["response"]["status"] == "incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["output"][0]["status"] == "incomplete" and last["response"]["output"][0]["content"][0]["text"] == "Once upon"


def test_a_stream_with_no_text_still_has_its_message() -> None:
    events, final = stream([chunk(finish="stop"), USAGE])
    assert [o.type for o in final.output] == ["message"] and final.output_text == ""
    assert "response.output_text.delta" not in [e["type"] for e in events]


def test_a_failure_mid_stream_is_an_error_event_then_response_failed() -> None:
    dialect = ResponsesDialect(template(parse()), streamed=True)
    head = asyncio.run(_events_until_failure(dialect))
    events = events_of(head + dialect.stream_error(UpstreamError("the backend went away")))
    error, failed = events[-2], events[-1]
    assert error["type"] == "error" and error["message"] == "the backend went away" and error["code"] == "server_error"
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    assert failed["response"]["error"] == {"code": "server_error", "message": "the backend went away"}
    assert failed["response"]["output"][0]["status"] == "incomplete"  # the text so far, cut
    assert events_of(ResponsesDialect(template(parse()), streamed=True).stream_error(None))[-1]["response"]["error"]["code"] == "server_error"


async def _events_until_failure(dialect: ResponsesDialect) -> bytes:
    """The events of a stream whose backend fails after one piece of text (as ChunkStream
    runs it: the error is caught outside the dialect's events, which are closed)."""

    async def source() -> AsyncIterator[ChatCompletionChunk]:
        yield chunk("Hel")
        raise UpstreamError("the backend went away")

    out = b""
    try:
        async for data in dialect.events(source()):
            out += data
    except UpstreamError:
        pass
    return out


# -- over HTTP -----------------------------------------------------------------------------------


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class ScriptedUpstream:
    """An OpenAI-shaped upstream answering chat completions from a script chosen by the last
    user message; records the bodies it got (the translation, as a remote receives it)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        raw = await read_body(receive)
        if scope["method"] == "GET":
            await self._send(send, 200, json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode())
            return
        body = json.loads(raw)
        self.bodies.append(body)
        ask = body["messages"][-1]["content"]
        base = {"id": "chatcmpl-1", "created": 1, "model": "m"}
        usage = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": "Hi there."}
            if ask == "call":
                message = {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a":1,"b":2}'}}]}
            finish = "tool_calls" if ask == "call" else "stop"
            answer = {**base, "object": "chat.completion", "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage}
            await self._send(send, 200, json.dumps(answer).encode())
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        chunk = {**base, "object": "chat.completion.chunk"}
        for text in ("Hi", " there", "."):
            await send({"type": "http.response.body", "body": _sse({**chunk, "choices": [{"index": 0, "delta": {"content": text}}]}), "more_body": True})
        if ask == "fail":  # the upstream breaks mid-stream: a chunk that is not JSON
            await send({"type": "http.response.body", "body": b"data: {not json\n\n", "more_body": True})
        else:
            await send({"type": "http.response.body", "body": _sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}), "more_body": True})
            await send({"type": "http.response.body", "body": _sse({**chunk, "choices": [], "usage": usage}) + b"data: [DONE]\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def _send(self, send: Any, status: int, payload: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, ScriptedUpstream]]:
    script = ScriptedUpstream()
    with asgi_in_thread(script) as url:
        yield url, script


@pytest.fixture
def http(upstream: tuple[str, ScriptedUpstream]) -> Iterator[TestClient]:
    config = {"backends": [{"name": "up", "kind": "remote", "model": "m", "url": upstream[0] + "/v1", "metrics_url": "none"}]}
    with TestClient(create_app(Config.model_validate(config)), client=("127.0.0.1", 50000)) as c:
        yield c


@pytest.fixture
def client(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


def assert_openai_error(r: Any, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def test_the_official_client_gets_a_response_and_the_upstream_the_translation(client: openai.OpenAI, upstream: tuple[str, ScriptedUpstream]) -> None:
    r = client.responses.create(model="m", input="hello", instructions="Be kind.", max_output_tokens=16, metadata={"k": "v"})
    assert r.status == "completed" and r.output_text == "Hi there." and r.usage.total_tokens == 9 and r.metadata == {"k": "v"}
    sent = upstream[1].bodies[-1]
    assert sent["messages"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hello"}]
    assert sent["max_completion_tokens"] == 16 and "input" not in sent and "instructions" not in sent
    called = client.responses.create(model="m", input="call", tools=[ADD], tool_choice="required")
    [call] = called.output
    assert call.type == "function_call" and call.call_id == "call_1" and json.loads(call.arguments) == {"a": 1, "b": 2}
    assert upstream[1].bodies[-1]["tools"][0]["function"]["name"] == "add" and upstream[1].bodies[-1]["tool_choice"] == "required"


def test_the_official_clients_stream_helper_folds_the_events(client: openai.OpenAI) -> None:
    with client.responses.stream(model="m", input="hello") as s:
        deltas = "".join(e.delta for e in s if e.type == "response.output_text.delta")
        final = s.get_final_response()
    assert deltas == final.output_text == "Hi there." and final.status == "completed" and final.usage.output_tokens == 2


def test_a_failure_mid_stream_reaches_the_client_as_error_and_response_failed(client: openai.OpenAI) -> None:
    kinds = [e.type for e in client.responses.create(model="m", input="fail", stream=True)]
    assert kinds[:2] == ["response.created", "response.in_progress"] and "response.output_text.delta" in kinds
    assert kinds[-2:] == ["error", "response.failed"] and "response.completed" not in kinds


BAD = [
    (b'{"model": "m", "input": ', None),
    (b'{"model": "m"}', "input"),
    (b'{"input": "hi"}', "model"),
    (b'{"model": "m", "input": 5}', "input"),
    (b'{"model": "m", "input": [{"role": "robot", "content": "hi"}]}', "input.0.role"),
    (b'{"model": "m", "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]}', "input.0.arguments"),
    (b'{"model": "m", "input": [{"type": "function_call_output", "output": "x"}]}', "input.0.call_id"),
    (b'{"model": "m", "input": "hi", "temperature": "hot"}', "temperature"),
    (b'{"model": "m", "input": "hi", "max_output_tokens": 0}', "max_output_tokens"),
    (b'{"model": "m", "input": "hi", "tools": [{"type": "function"}]}', "tools.0.name"),
    (b'{"model": "m", "input": "hi", "metadata": {"k": 1}}', "metadata.k"),
    (b'{"model": "m", "input": "hi", "previous_response_id": "resp_1"}', "previous_response_id"),
    (b'{"model": "m", "input": "hi", "store": true}', "store"),
    (b'{"model": "m", "input": "hi", "tools": [{"type": "web_search_preview"}]}', "tools.0.type"),
    (b'{"model": "m", "input": [{"type": "computer_call_output", "call_id": "c"}]}', "input.0.type"),
]


@pytest.mark.parametrize(("raw", "param"), BAD)
def test_bad_input_is_an_openai_400(http: TestClient, raw: bytes, param: str | None) -> None:
    r = http.post("/v1/responses", content=raw, headers={"content-type": "application/json"})
    error = assert_openai_error(r, 400, param)
    assert error["type"] == "invalid_request_error"


def test_an_unknown_model_is_an_openai_404(http: TestClient) -> None:
    error = assert_openai_error(http.post("/v1/responses", json={"model": "nope", "input": "hi"}), 404, "model")
    assert error["code"] == "model_not_found"


def test_refusals_reach_the_official_client_as_bad_request_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="m", input="hi", previous_response_id="resp_123")
    assert caught.value.body["param"] == "previous_response_id" and "stateless" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="m", input="hi", tools=[{"type": "web_search"}])
    assert "'web_search'" in caught.value.message
