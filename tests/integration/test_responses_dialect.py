"""OpenAI's Responses API end to end with the official `openai` client: both local engines,
both through a remote backend pointed at a turnout node, and with API keys and limits on.
The model is SmolLM2-135M: its answers are poor, so shapes, constraints and behaviour are
asserted, not content."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.dialect_servers import *  # noqa: F403
from tests.integration.dialect_servers import LLAMA, MODELS, REMOTE_LLAMA, REMOTE_PAGED, AuthGateway, Served

pytestmark = pytest.mark.slow

WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD_PARAMS = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": WEATHER_PARAMS, "strict": True},
    {"type": "function", "name": "add", "description": "Add two integers", "parameters": ADD_PARAMS, "strict": True},
]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "add": ADD_PARAMS}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
ASK = "What is the weather in Paris?"


def client_for(served: Served, model: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.server(model).base_url, api_key="unused", max_retries=0, timeout=300)


def assert_response(r: Any, model: str) -> None:
    """The Response object's shape, as the official client parsed it."""
    assert r.id.startswith("resp_") and r.object == "response" and r.model == model and r.created_at > 0
    assert r.status in ("completed", "incomplete") and r.error is None
    assert r.usage.input_tokens > 0 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens_details.cached_tokens >= 0 and r.usage.output_tokens_details.reasoning_tokens == 0
    for item in r.output:
        if item.type == "message":
            assert item.id.startswith("msg_") and item.role == "assistant" and item.content[0].type == "output_text"
        else:
            assert item.type == "function_call" and item.id.startswith("fc_") and item.call_id and item.name in SCHEMAS


def check_calls(items: list[Any], only: str | None = None) -> None:
    calls = [i for i in items if i.type == "function_call"]
    assert calls, items
    for call in calls:
        assert call.name in SCHEMAS and (only is None or call.name == only) and call.status == "completed"
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


@pytest.mark.parametrize("model", MODELS)
def test_string_input_with_instructions(served: Served, model: str) -> None:
    client = client_for(served, model)
    plain = client.responses.create(model=model, input="Say hello.", max_output_tokens=8, temperature=0)
    assert_response(plain, model)
    assert [o.type for o in plain.output] == ["message"] and isinstance(plain.output_text, str)
    pirate = "You are a pirate. Answer in one short sentence."
    told = client.responses.create(model=model, input="Say hello.", instructions=pirate, max_output_tokens=8, temperature=0, metadata={"team": "dialects"})
    assert_response(told, model)
    assert told.instructions == pirate and told.metadata == {"team": "dialects"} and told.max_output_tokens == 8
    # The instructions are the system message, first: the same prompt as that message sent as an item.
    as_item = client.responses.create(model=model, input=[{"role": "system", "content": pirate}, {"role": "user", "content": "Say hello."}], max_output_tokens=1)
    assert told.usage.input_tokens == as_item.usage.input_tokens != plain.usage.input_tokens


@pytest.mark.parametrize("model", MODELS)
def test_items_input_and_max_output_tokens_make_it_incomplete(served: Served, model: str) -> None:
    items = [
        {"role": "developer", "content": "Tell long stories."},
        {"role": "user", "content": [{"type": "input_text", "text": "Tell me a long story about a dragon."}]},
    ]
    r = client_for(served, model).responses.create(model=model, input=items, max_output_tokens=8, temperature=0)
    assert_response(r, model)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens" and r.usage.output_tokens == 8
    assert r.output[0].status == "incomplete" and r.output_text


@pytest.mark.parametrize("model", MODELS)
def test_stream_helper_final_text_is_the_deltas(served: Served, model: str) -> None:
    with client_for(served, model).responses.stream(model=model, input="Say hi.", max_output_tokens=16, temperature=0) as stream:
        kinds, deltas = [], ""
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas += event.delta
        last = event.response  # the terminal event's Response (completed or incomplete)
        final = stream.get_final_response() if last.status == "completed" else last  # the helper folds completed ones
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == f"response.{last.status}"
    assert deltas and deltas == final.output_text == last.output_text
    assert_response(final, model)


@pytest.mark.parametrize("model", MODELS)
def test_create_stream_true_ends_incomplete_at_max_output_tokens(served: Served, model: str) -> None:
    events = list(client_for(served, model).responses.create(model=model, input="Tell me a long story.", max_output_tokens=8, temperature=0, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.incomplete"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    last = events[-1].response
    assert last.status == "incomplete" and last.output_text == text == events[-4].text and last.usage.output_tokens == 8


@pytest.mark.parametrize("model", MODELS)
def test_required_tool_choice_returns_valid_function_calls(served: Served, model: str) -> None:
    r = client_for(served, model).responses.create(model=model, input=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_output_tokens=120)
    assert_response(r, model)
    assert r.status == "completed" and r.tool_choice == "required"
    check_calls(r.output)


@pytest.mark.parametrize("model", MODELS)
def test_named_function_streams_argument_deltas(served: Served, model: str) -> None:
    with client_for(served, model).responses.stream(
        model=model, input="Add 2 and 3.", tools=TOOLS, tool_choice={"type": "function", "name": "add"}, temperature=0, max_output_tokens=80
    ) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.function_call_arguments.delta")
        final = stream.get_final_response()
    [call] = [o for o in final.output if o.type == "function_call"]
    assert call.name == "add" and call.arguments == deltas
    assert call.parsed_arguments == json.loads(deltas)  # strict: the official client parsed them
    check_calls(final.output, only="add")


@pytest.mark.parametrize("model", MODELS)
def test_a_second_turn_with_the_function_call_and_its_output(served: Served, model: str) -> None:
    client = client_for(served, model)
    first = client.responses.create(
        model=model, input=ASK, tools=TOOLS, tool_choice={"type": "function", "name": "get_weather"}, temperature=0, max_output_tokens=80
    )
    [call] = [o for o in first.output if o.type == "function_call"]
    history = [
        {"role": "user", "content": ASK},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "It is 18 degrees celsius and sunny in Paris."},
    ]
    second = client.responses.create(model=model, input=history, tools=TOOLS, temperature=0, max_output_tokens=16)
    assert_response(second, model)
    assert second.output_text or any(o.type == "function_call" for o in second.output)
    assert second.usage.input_tokens > first.usage.input_tokens + 10  # the call and its result reached the model


# Streamed on one model per engine, one of them through the remote: each case costs a constrained generation.
@pytest.mark.parametrize(("model", "stream"), [*((m, False) for m in MODELS), (LLAMA, True), (REMOTE_PAGED, True)])
def test_json_schema_text_format_validates(served: Served, model: str, stream: bool) -> None:
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    client = client_for(served, model)
    if stream:
        with client.responses.stream(model=model, input="Invent a person, as JSON.", text=fmt, temperature=0, max_output_tokens=64) as s:
            r = s.get_final_response()
    else:
        r = client.responses.create(model=model, input="Invent a person, as JSON.", text=fmt, temperature=0, max_output_tokens=64)
    assert r.status == "completed", r.output_text
    assert r.text.format.type == "json_schema" and r.text.format.name == "person"
    jsonschema.validate(json.loads(r.output_text), PERSON)


def test_bad_input_is_an_openai_4xx_on_every_server(served: Served) -> None:
    for server in (served.node, served.gateway):
        r = httpx.post(server.base_url + "/responses", json={"model": LLAMA if server is served.node else REMOTE_LLAMA, "input": "hi", "store": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "store"
        r = httpx.post(server.base_url + "/responses", json={"model": "no-such-model", "input": "hi"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(served, LLAMA).responses.create(model=LLAMA, input="hi", previous_response_id="resp_0123")
    assert caught.value.body["param"] == "previous_response_id"


def _aborted(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return sum(s.value for s in samples if s.name == "turnout:requests_aborted_total" and s.labels.get("backend") == "llama")


@pytest.mark.parametrize("model", [LLAMA, REMOTE_LLAMA])
def test_a_client_that_closes_the_stream_cancels_the_generation(served: Served, model: str) -> None:
    node = served.node.url  # the engine worker that generates, directly or behind the remote
    before = _aborted(node)
    stream = client_for(served, model).responses.create(
        model=model, input="Write a very long story about the sea.", max_output_tokens=1500, temperature=1, stream=True
    )
    deltas = 0
    for event in stream:
        deltas += event.type == "response.output_text.delta"
        if deltas == 3:
            break
    stream.close()
    deadline = time.monotonic() + 60  # a wait for the count, not a timing claim
    while _aborted(node) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _aborted(node) == before + 1


def test_with_keys_a_wrong_key_is_401_and_over_the_limit_429(auth_gateway: AuthGateway) -> None:
    base = auth_gateway.server.base_url
    ask = {"model": REMOTE_LLAMA, "input": "Hi.", "max_output_tokens": 4}
    good = openai.OpenAI(base_url=base, api_key=auth_gateway.secret, max_retries=0)
    assert good.responses.create(**ask).status in ("completed", "incomplete")
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=base, api_key="sk-wrong", max_retries=0).responses.create(**ask)
    assert caught.value.status_code == 401 and set(caught.value.body) == {"message", "type", "param", "code"}
    r = httpx.post(base + "/responses", json=ask, headers={"x-api-key": "sk-wrong"})
    assert r.status_code == 401 and list(r.json()) == ["error"]
    limited = auth_gateway.limited_key(rpm=2)
    for _ in range(2):
        assert httpx.post(base + "/responses", json=ask, headers={"Authorization": "Bearer " + limited}, timeout=60).status_code == 200
    over = httpx.post(base + "/responses", json=ask, headers={"Authorization": "Bearer " + limited})
    error = over.json()["error"]
    assert over.status_code == 429 and error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert int(over.headers["retry-after"]) >= 1 and over.headers["x-ratelimit-remaining-requests"] == "0"
    assert over.headers["x-ratelimit-limit-requests"] == "2" and "x-ratelimit-reset-requests" in over.headers
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=base, api_key=limited, max_retries=0).responses.create(**ask)
