"""Anthropic's Messages API end to end, with the official `anthropic` client, against SmolLM2
on both local engines and through remote backends (tests.integration.dialect_servers): text,
streams, stop sequences, tool use and its results, count_tokens, errors in Anthropic's shape,
API keys and limits, and a stream the client leaves."""

from __future__ import annotations

import time
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server
from tests.integration.dialect_servers import *  # noqa: F403
from tests.integration.dialect_servers import MODELS, PAGED, REMOTE_LLAMA, REMOTE_PAGED, AuthGateway, Served

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [{"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
COUNT = [{"role": "user", "content": "Count from 1 to 10, one number per line."}]
GREEDY = {"extra_body": {"temperature": 0}}  # this SDK no longer types temperature; the API takes it


def client(server: Server, **options: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=options.pop("api_key", "unused"), base_url=server.url, max_retries=0, timeout=120, **options)


@pytest.fixture(params=MODELS)
def model(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def api(served: Served, model: str) -> anthropic.Anthropic:
    return client(served.server(model))


# -- answers --------------------------------------------------------------------------------------


def test_create_answers_a_message(api: anthropic.Anthropic, model: str) -> None:
    message = api.messages.create(model=model, max_tokens=8, system="You are terse.", messages=[{"role": "user", "content": "Say hi."}])
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == model
    assert message.content and message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 8


def test_max_tokens_stops_with_max_tokens(api: anthropic.Anthropic, model: str) -> None:
    message = api.messages.create(model=model, max_tokens=3, messages=COUNT, **GREEDY)
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3


def test_a_stop_sequence_is_named(api: anthropic.Anthropic, model: str) -> None:
    message = api.messages.create(model=model, max_tokens=32, messages=COUNT, stop_sequences=["zzz", "5"], **GREEDY)
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "5"
    assert "4" in message.content[0].text and "5" not in message.content[0].text


def test_stream_text_and_final_message(api: anthropic.Anthropic, model: str) -> None:
    with api.messages.stream(model=model, max_tokens=8, messages=COUNT, **GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text
    assert final.id.startswith("msg_") and final.model == model and final.stop_reason in ("end_turn", "max_tokens")
    # message_start cannot know the prompt's tokens; message_delta brings them and the SDK keeps them.
    assert final.usage.input_tokens > 0 and 0 < final.usage.output_tokens <= 8
    whole = api.messages.create(model=model, max_tokens=8, messages=COUNT, **GREEDY)
    assert whole.usage.input_tokens == final.usage.input_tokens


def test_a_streamed_stop_sequence_is_named(api: anthropic.Anthropic, model: str) -> None:
    with api.messages.stream(model=model, max_tokens=32, messages=COUNT, stop_sequences=["5"], **GREEDY) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "5"


def test_raw_events_are_anthropics(served: Served, model: str) -> None:
    body = {"model": model, "max_tokens": 6, "messages": COUNT, "stream": True, "temperature": 0}
    with httpx.stream("POST", served.server(model).url + "/v1/messages", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        names = [line.removeprefix("event: ") for line in r.iter_lines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}


# -- tools ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("choice", [{"type": "any", "disable_parallel_tool_use": True}, {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}])
def test_tool_use(api: anthropic.Anthropic, model: str, choice: dict[str, Any]) -> None:
    message = api.messages.create(model=model, max_tokens=40, messages=ASK, tools=TOOLS, tool_choice=choice, **GREEDY)
    uses = [b for b in message.content if b.type == "tool_use"]
    assert uses and message.stop_reason == "tool_use"
    for use in uses:
        assert use.id.startswith("toolu_") and use.name == "get_weather"
        jsonschema.validate(use.input, WEATHER)
    assert len(uses) == 1  # disable_parallel_tool_use


def test_streamed_tool_use(api: anthropic.Anthropic, model: str) -> None:
    with api.messages.stream(model=model, max_tokens=40, messages=ASK, tools=TOOLS, tool_choice={"type": "any"}, **GREEDY) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds  # the SDK's event for an input_json_delta
    uses = [b for b in final.content if b.type == "tool_use"]
    assert uses and final.stop_reason == "tool_use"
    jsonschema.validate(uses[0].input, WEATHER)


def test_a_tool_result_reaches_the_model(api: anthropic.Anthropic, model: str) -> None:
    first = api.messages.create(model=model, max_tokens=40, messages=ASK, tools=TOOLS, tool_choice={"type": "tool", "name": "get_weather"}, **GREEDY)
    use = next(b for b in first.content if b.type == "tool_use")
    result = "It is 18 degrees celsius and sunny in Paris."
    history = [
        *ASK,
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": [{"type": "text", "text": result}]}]},
    ]
    second = api.messages.create(model=model, max_tokens=8, messages=history, tools=TOOLS, **GREEDY)
    assert second.stop_reason in ("end_turn", "max_tokens", "tool_use") and second.content
    # The call and its result are in the second prompt: it is the first one's and more.
    assert second.usage.input_tokens > first.usage.input_tokens + 10


# -- count_tokens ---------------------------------------------------------------------------------


def test_count_tokens_counts_what_create_prompts(api: anthropic.Anthropic, model: str) -> None:
    plain = api.messages.count_tokens(model=model, messages=ASK).input_tokens
    assert plain == api.messages.create(model=model, max_tokens=1, messages=ASK).usage.input_tokens
    # (without a system prompt, SmolLM2's template adds its own: compare two system prompts)
    short = api.messages.count_tokens(model=model, messages=ASK, system="Be brief.").input_tokens
    long = api.messages.count_tokens(model=model, messages=ASK, system=[{"type": "text", "text": "Be brief. " * 10}]).input_tokens
    with_tools = api.messages.count_tokens(model=model, messages=ASK, tools=TOOLS).input_tokens
    assert long >= short + 20 and with_tools > plain + 20
    assert with_tools == api.messages.create(model=model, max_tokens=1, messages=ASK, tools=TOOLS).usage.input_tokens


# -- errors ----------------------------------------------------------------------------------------


def _error(served: Served, body: Any, *, path: str = "/v1/messages", status: int = 400, **kwargs: Any) -> dict[str, Any]:
    content = body if isinstance(body, bytes) else None
    r = httpx.post(served.node.url + path, json=None if content is not None else body, content=content,
                   headers={"content-type": "application/json"}, timeout=60)  # fmt: skip
    assert r.status_code == status, r.text
    data = r.json()
    assert set(data) == {"type", "error"} and data["type"] == "error" and set(data["error"]) == {"type", "message"}
    return data["error"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": PAGED, "messages": ASK}, "max_tokens: Field required"),
        ({"model": PAGED, "max_tokens": 8, "messages": [{"role": "bot", "content": "hi"}]}, "messages.0.role: Input should be 'user' or 'assistant'"),
        ({"model": PAGED, "max_tokens": 8, "messages": ASK, "n": 2}, "n: Extra inputs are not permitted"),
        ({"model": PAGED, "max_tokens": 8, "messages": ASK, "tools": [{"name": "f", "input_schema": {"type": "object", "properties": {"x": {"type": 5}}}}]},
         "tools.0.input_schema: invalid JSON Schema"),
        ({"model": PAGED, "max_tokens": 8, "messages": ASK, "thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking: extended thinking is not supported"),
        ({"model": PAGED, "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
         "messages.0.content.0: content blocks of type 'document' are not supported"),
        ({"model": PAGED, "max_tokens": 8, "messages": ASK, "stop_sequences": ["a", "b", "c", "d", "e"]}, "stop_sequences: "),
        ({"model": PAGED, "max_tokens": 8, "messages": ASK, "temperature": 1.5}, "temperature: Input should be less than or equal to 1"),
        ({"model": PAGED, "max_tokens": 8, "messages": [*ASK, {"role": "assistant", "content": "It is"}]}, "messages.1: a final assistant message (prefill)"),
    ],
)  # fmt: skip
def test_bad_requests_are_anthropic_400s(served: Served, body: dict[str, Any], message: str) -> None:
    error = _error(served, body)
    assert error["type"] == "invalid_request_error" and error["message"].startswith(message), error


def test_malformed_json_is_a_400(served: Served) -> None:
    error = _error(served, b'{"model": ')
    assert error["type"] == "invalid_request_error" and error["message"].startswith("The request body is not valid JSON")


def test_count_tokens_errors_are_anthropics(served: Served) -> None:
    error = _error(served, {"model": PAGED, "messages": ASK, "max_tokens": 5}, path="/v1/messages/count_tokens")
    assert error["message"] == "max_tokens: Extra inputs are not permitted"


def test_unknown_model_is_a_not_found_error(served: Served) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        client(served.node).messages.create(model="no-such-model", max_tokens=8, messages=ASK)
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "not_found_error"


def test_bad_request_through_the_sdk(served: Served) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client(served.gateway).messages.create(model=REMOTE_PAGED, max_tokens=8, messages=ASK, tools=TOOLS, tool_choice={"type": "tool", "name": "other"})
    assert info.value.body["error"]["type"] == "invalid_request_error" and "tool_choice" in info.value.body["error"]["message"]


# -- keys and limits --------------------------------------------------------------------------------


def test_an_api_key_in_x_api_key_is_accepted(auth_gateway: AuthGateway) -> None:
    message = client(auth_gateway.server, api_key=auth_gateway.secret).messages.create(model=REMOTE_LLAMA, max_tokens=4, messages=ASK)
    assert message.content and message.usage.input_tokens > 0
    assert client(auth_gateway.server, api_key=auth_gateway.secret).messages.count_tokens(model=REMOTE_LLAMA, messages=ASK).input_tokens > 0


def test_a_wrong_key_is_an_authentication_error(auth_gateway: AuthGateway) -> None:
    with pytest.raises(anthropic.AuthenticationError) as info:
        client(auth_gateway.server, api_key="sk-wrong").messages.create(model=REMOTE_LLAMA, max_tokens=4, messages=ASK)
    assert info.value.status_code == 401 and info.value.body["error"]["type"] == "authentication_error"


def test_over_the_limit_is_a_rate_limit_error(auth_gateway: AuthGateway) -> None:
    api = client(auth_gateway.server, api_key=auth_gateway.limited_key(rpm=2))
    for _ in range(2):
        api.messages.create(model=REMOTE_LLAMA, max_tokens=1, messages=ASK)
    with pytest.raises(anthropic.RateLimitError) as info:
        api.messages.create(model=REMOTE_LLAMA, max_tokens=1, messages=ASK)
    headers = info.value.response.headers
    assert info.value.body["error"]["type"] == "rate_limit_error"
    assert headers["x-ratelimit-limit-requests"] == "2" and headers["x-ratelimit-remaining-requests"] == "0"
    assert int(headers["retry-after"]) >= 1


# -- a client that leaves -------------------------------------------------------------------------


def _samples(server: Server) -> dict[tuple[str, str], float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {(s.name, s.labels.get("backend", "")): s.value for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.parametrize("model", [PAGED, REMOTE_PAGED])
def test_leaving_a_stream_cancels_the_generation(served: Served, model: str) -> None:
    node = served.node
    aborted = _samples(node).get(("turnout:requests_aborted_total", "paged"), 0.0)
    long = [{"role": "user", "content": "Count from 1 to 1000, one number per line."}]
    with client(served.server(model)).messages.stream(model=model, max_tokens=1000, messages=long, **GREEDY) as stream:
        for _, _ in zip(range(4), stream.text_stream):
            pass
        assert _samples(node)[("vllm:num_requests_running", "paged")] == 1
    # 1000 tokens take far longer than this on this CPU: only an abort ends it this soon.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        m = _samples(node)
        if m[("vllm:num_requests_running", "paged")] == 0 and m.get(("turnout:requests_aborted_total", "paged"), 0.0) == aborted + 1:
            return
        time.sleep(0.05)
    raise AssertionError(f"the generation went on after the client left: {m}")
