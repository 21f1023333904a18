"""The agent contract with the official `openai` client, on every backend kind: the llama.cpp
runner, the paged engine (both on the real SmolLM2-135M, CPU), and a remote backend pointed at
a turnout node serving them. Tool calls (required, named, streamed, a two-turn conversation
with a tool result), JSON-schema outputs, and n > 1; the JSON is checked with jsonschema."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

from tests.integration.dialect_servers import *  # noqa: F403
from tests.integration.dialect_servers import LLAMA, MODELS, PAGED, REMOTE_LLAMA, REMOTE_PAGED, Served

pytestmark = pytest.mark.slow

WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER_PARAMS}},
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def clients(served: Served) -> dict[str, openai.OpenAI]:
    """The node serving both local engines, and the gateway reaching them as remotes (the
    dialect tests' session servers)."""
    local = openai.OpenAI(base_url=served.node.base_url, api_key="unused", max_retries=0, timeout=300)
    remote = openai.OpenAI(base_url=served.gateway.base_url, api_key="unused", max_retries=0, timeout=300)
    return {LLAMA: local, PAGED: local, REMOTE_LLAMA: remote, REMOTE_PAGED: remote}


def _check_calls(calls: list[Any], only: str | None = None) -> None:
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in SCHEMAS and (only is None or call.function.name == only)
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _streamed_calls(stream: Any) -> tuple[list[dict[str, Any]], str | None]:
    """Tool calls rebuilt from OpenAI's deltas, checking their shape as they come."""
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for tc in choice.delta.tool_calls or []:
                if tc.index not in calls:  # the first delta of a call: id, type and name
                    assert tc.id and tc.type == "function" and tc.function.name
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments or ""}
                else:
                    assert tc.id is None and not tc.function.name
                    calls[tc.index]["arguments"] += tc.function.arguments or ""
    assert sorted(calls) == list(range(len(calls)))
    return [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("model", MODELS)
def test_required_tool_choice_returns_valid_calls(clients: dict[str, openai.OpenAI], model: str) -> None:
    r = clients[model].chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=120)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    _check_calls(choice.message.tool_calls)


@pytest.mark.parametrize("model", MODELS)
def test_named_tool_choice_streams_in_openai_shape(clients: dict[str, openai.OpenAI], model: str) -> None:
    stream = clients[model].chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Add 2 and 3."}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}}, temperature=0, max_tokens=80, stream=True,
    )  # fmt: skip
    calls, finish = _streamed_calls(stream)
    assert finish == "tool_calls" and [c["name"] for c in calls] == ["add"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS["add"])


@pytest.mark.parametrize("model", MODELS)
def test_two_turns_with_a_tool_result(clients: dict[str, openai.OpenAI], model: str) -> None:
    client = clients[model]
    first = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, max_tokens=80
    )
    call = first.choices[0].message.tool_calls[0]
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "It is 18 degrees celsius and sunny in Paris."},
    ]  # fmt: skip
    second = client.chat.completions.create(model=model, messages=history, tools=TOOLS, temperature=0, max_tokens=40)
    answer = second.choices[0]
    assert answer.finish_reason in ("stop", "length", "tool_calls")
    assert answer.message.content or answer.message.tool_calls
    # The result reached the model: the second prompt holds the first turn, the call and its result.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 10


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_validates(clients: dict[str, openai.OpenAI], model: str, stream: bool) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    messages = [{"role": "user", "content": "Invent a person, as JSON."}]
    r = clients[model].chat.completions.create(model=model, messages=messages, response_format=fmt, temperature=0, max_tokens=80, stream=stream)
    if stream:
        text, finish = "", None
        for chunk in r:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
    else:
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("model", MODELS)
def test_n_choices_each_counted(clients: dict[str, openai.OpenAI], model: str) -> None:
    r = clients[model].chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say something."}], n=3, max_tokens=6, temperature=1.0, seed=7,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 18  # every choice counts
    assert len({c.message.content for c in r.choices}) > 1  # seeds s, s+1, s+2 differ


@pytest.mark.parametrize("model", MODELS)
def test_n_choices_streamed_and_with_json_schema(clients: dict[str, openai.OpenAI], model: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    stream = clients[model].chat.completions.create(
        model=model, messages=[{"role": "user", "content": "A person, as JSON."}], n=2, response_format=fmt, max_tokens=80,
        temperature=0.8, seed=3, stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    texts, finishes, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert finishes == {0: "stop", 1: "stop"}
    for text in texts.values():
        jsonschema.validate(json.loads(text), PERSON)
    assert usage is not None and usage.completion_tokens >= 2 * 8


@pytest.mark.parametrize("model", [LLAMA, REMOTE_PAGED])
@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]}, "tools.0.function.parameters"),
        ({"tools": [{"type": "function"}]}, "tools.0.function"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_tool_definitions_are_400s(clients: dict[str, openai.OpenAI], model: str, extra: dict, param: str, stream: bool) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        clients[model].chat.completions.create(model=model, messages=ASK, max_tokens=5, stream=stream, **extra)
    assert err.value.status_code == 400
    body = err.value.body
    assert isinstance(body, dict) and str(body.get("param", "")).startswith(param), body


def test_a_schema_llguidance_cannot_serve_is_a_400_naming_the_keyword(clients: dict[str, openai.OpenAI]) -> None:
    schema = {"type": "object", "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}}
    for model in (LLAMA, PAGED):
        with pytest.raises(openai.BadRequestError) as err:
            clients[model].chat.completions.create(
                model=model, messages=ASK, max_tokens=5, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
            )
        assert "if" in str(err.value.body) and err.value.body.get("param") == "response_format"
