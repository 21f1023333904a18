"""Ollama's native API end to end with the official `ollama` client: both local engines, both
through a remote backend pointed at a turnout node, and with API keys and limits on. The
model is SmolLM2-135M: its answers are poor, so shapes, constraints and behaviour are
asserted, not content."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import ollama
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.keys import new_key
from tests.integration.dialect_servers import *  # noqa: F403
from tests.integration.dialect_servers import LLAMA, MODELS, PAGED, REMOTE_LLAMA, AuthGateway, Served

pytestmark = pytest.mark.slow

HI = [{"role": "user", "content": "Say hello."}]
FEW = {"num_predict": 8, "temperature": 0}
DURATIONS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")


def client_for(served: Served, model: str) -> ollama.Client:
    return ollama.Client(host=served.server(model).url, timeout=120)


def assert_final(record: ollama.ChatResponse | ollama.GenerateResponse, limit: int = 8) -> None:
    assert record.done is True and record.done_reason in ("stop", "length")
    assert record.prompt_eval_count and record.prompt_eval_count > 0
    assert 0 < (record.eval_count or 0) <= limit
    assert all(isinstance(getattr(record, k), int) and getattr(record, k) >= 0 for k in DURATIONS)
    assert record.total_duration >= record.load_duration + record.prompt_eval_duration + record.eval_duration - 1_000_000


@pytest.mark.parametrize("model", MODELS)
def test_chat_whole_and_streamed(served: Served, model: str) -> None:
    client = client_for(served, model)
    whole = client.chat(model=model, messages=HI, options=FEW)
    assert whole.message.role == "assistant" and isinstance(whole.message.content, str)
    assert_final(whole)
    parts = list(client.chat(model=model + ":latest", messages=HI, options=FEW, stream=True))
    assert all(not p.done for p in parts[:-1]) and len(parts) >= 2
    assert parts[-1].model == model + ":latest"  # echoed as asked
    assert_final(parts[-1])
    assert "".join(p.message.content or "" for p in parts)


@pytest.mark.parametrize("model", MODELS)
def test_generate_templated_raw_and_streamed(served: Served, model: str) -> None:
    client = client_for(served, model)
    templated = client.generate(model=model, prompt="The sky is", system="Answer briefly.", options=FEW)
    assert isinstance(templated.response, str)
    assert_final(templated)
    raw = list(client.generate(model=model, prompt="1, 2, 3,", raw=True, options={"num_predict": 4, "temperature": 0}, stream=True))
    assert_final(raw[-1], limit=4)
    assert "".join(p.response for p in raw)


@pytest.mark.parametrize("model", MODELS)
def test_format_schema_is_followed(served: Served, model: str) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    r = client_for(served, model).chat(model=model, messages=[{"role": "user", "content": "Is water wet? Answer in JSON."}], format=schema, options={"num_predict": 32, "temperature": 0})
    jsonschema.validate(json.loads(r.message.content), schema)
    r = client_for(served, model).generate(model=model, prompt="A JSON object about a cat:", format="json", options={"num_predict": 32, "temperature": 0})
    assert r.done_reason == "length" or isinstance(json.loads(r.response), dict)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.mark.parametrize("model", MODELS)
def test_tools_and_tool_history(served: Served, model: str) -> None:
    client = client_for(served, model)
    ask = [{"role": "user", "content": "What is the weather in Paris? Use the get_weather tool."}]
    r = client.chat(model=model, messages=ask, tools=[WEATHER], options={"num_predict": 32, "temperature": 0})
    for call in r.message.tool_calls or []:  # the tiny model answers in text (the shape of calls: unit tests)
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    bare = client.chat(model=model, messages=ask, options={"num_predict": 1})
    assert r.prompt_eval_count > bare.prompt_eval_count  # the tools reached the model's template
    history = [
        *ask,
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "sunny, 21 C"},
    ]
    answered = client.chat(model=model, messages=history, tools=[WEATHER], options=FEW)
    assert answered.done and answered.prompt_eval_count > r.prompt_eval_count  # the call and its result were rendered


@pytest.mark.parametrize("model", MODELS)
def test_embed_and_legacy_embeddings(served: Served, model: str) -> None:
    client = client_for(served, model)
    r = client.embed(model=model, input=["a cat", "a dog"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) == len(r.embeddings[1]) > 0
    assert r.prompt_eval_count and r.prompt_eval_count > 0 and r.total_duration >= r.load_duration >= 0
    single = client.embeddings(model=model, prompt="a cat")
    assert len(single.embedding) == len(r.embeddings[0])


def test_model_pages(served: Served) -> None:
    node = ollama.Client(host=served.node.url)
    node.chat(model=LLAMA, messages=HI, options={"num_predict": 1})  # loaded now
    names = {m.model for m in node.list().models}
    assert {LLAMA + ":latest", PAGED + ":latest"} <= names
    local = next(m for m in node.list().models if m.model == LLAMA + ":latest")
    assert local.size > 0 and local.digest and local.details.family == "llama" and local.details.quantization_level == "Q4_1"
    assert LLAMA + ":latest" in {m.model for m in node.ps().models}
    shown = node.show(LLAMA)
    assert {"completion", "tools"} <= set(shown.capabilities) and "messages" in shown.template
    assert shown.modelinfo["general.architecture"] == "llama" and shown.details.parameter_size
    assert httpx.get(served.node.url + "/api/version").json()["version"]
    remote = {m.model for m in ollama.Client(host=served.gateway.url).list().models}
    assert REMOTE_LLAMA + ":latest" in remote


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [("/api/chat", {"model": LLAMA, "messages": HI, "options": {"num_ctx": 4096}}, 400),
     ("/api/chat", {"model": LLAMA, "messages": HI, "think": True}, 400),
     ("/api/generate", {"model": LLAMA, "prompt": "x", "suffix": "y"}, 400),
     ("/api/chat", {"model": "missing", "messages": HI}, 404),
     ("/api/embed", {"model": LLAMA}, 200),  # no input: nothing to embed
     ("/api/chat", {"model": LLAMA, "messages": "hi"}, 400)],
)  # fmt: skip
def test_bad_input_is_a_4xx_in_ollamas_shape(served: Served, path: str, body: dict, status: int) -> None:
    r = httpx.post(served.node.url + path, json=body, timeout=60)
    assert r.status_code == status
    if status >= 400:
        assert list(r.json()) == ["error"]


def test_the_client_raises_refusals_with_their_status(served: Served) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=served.node.url).chat(model=LLAMA, messages=HI, options={"mirostat": 1})
    assert caught.value.status_code == 400 and "mirostat" in caught.value.error


def test_with_keys_a_wrong_key_is_401_and_over_the_limit_429(auth_gateway: AuthGateway) -> None:
    url = auth_gateway.server.url
    good = ollama.Client(host=url, headers={"Authorization": "Bearer " + auth_gateway.secret})
    assert good.chat(model=REMOTE_LLAMA, messages=HI, options=FEW).done
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=url, headers={"Authorization": "Bearer sk-turnout-wrong"}).chat(model=REMOTE_LLAMA, messages=HI, options=FEW)
    assert caught.value.status_code == 401
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=url).list()  # no key at all
    assert caught.value.status_code == 401
    limited = auth_gateway.limited_key(rpm=2)
    headers = {"Authorization": "Bearer " + limited}
    body = {"model": REMOTE_LLAMA, "messages": HI, "options": FEW, "stream": False}
    answers = [httpx.post(url + "/api/chat", json=body, headers=headers, timeout=60) for _ in range(3)]
    assert [r.status_code for r in answers[:2]] == [200, 200]
    over = answers[2]
    assert over.status_code == 429 and list(over.json()) == ["error"]
    assert over.headers["x-ratelimit-limit-requests"] == "2" and over.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(over.headers["retry-after"]) >= 1
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=url, headers=headers).chat(model=REMOTE_LLAMA, messages=HI, options=FEW)
    assert caught.value.status_code == 429
    assert httpx.get(url + "/api/version").status_code == 200  # public, as in Ollama
    assert httpx.post(url + "/api/pull", json={"model": "smollm2-135m"}, headers={"Authorization": "Bearer " + auth_gateway.secret}).status_code == 403


def test_a_model_the_key_may_not_use_is_not_found_on_every_route(auth_gateway: AuthGateway) -> None:
    secret, record = new_key("elsewhere", models=("another-model",))
    auth_gateway.store.add(record)
    headers, url = {"Authorization": "Bearer " + secret}, auth_gateway.server.url
    asks = [
        ("/api/show", {"model": REMOTE_LLAMA}),
        ("/api/embed", {"model": REMOTE_LLAMA, "input": []}),  # an empty embed only loads the model
        ("/api/generate", {"model": REMOTE_LLAMA, "keep_alive": 0}),  # an empty prompt unloads it
        ("/api/chat", {"model": REMOTE_LLAMA, "messages": HI, "stream": False}),
    ]
    statuses = {path: httpx.post(url + path, json=body, headers=headers, timeout=60).status_code for path, body in asks}
    assert statuses == {"/api/show": 404, "/api/embed": 404, "/api/generate": 404, "/api/chat": 404}, statuses


def _aborted(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return sum(s.value for s in samples if s.name == "turnout:requests_aborted_total" and s.labels.get("backend") == "llama")


def test_a_client_that_leaves_mid_stream_cancels_the_generation(served: Served) -> None:
    url = served.node.url
    before = _aborted(url)
    body = {"model": LLAMA, "messages": [{"role": "user", "content": "Write a very long story."}], "options": {"num_predict": 1500, "temperature": 1}}
    with httpx.stream("POST", url + "/api/chat", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = r.iter_lines()
        for _ in range(3):
            assert json.loads(next(lines))["done"] is False
    deadline = time.monotonic() + 60  # a wait for the count, not a timing claim
    while _aborted(url) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _aborted(url) == before + 1


def test_an_empty_prompt_loads_and_keep_alive_0_unloads(served: Served) -> None:
    client = ollama.Client(host=served.node.url)
    loaded = client.generate(model=LLAMA, prompt="")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    assert client.chat(model=LLAMA, messages=[]).done_reason == "load"
    assert client.generate(model=LLAMA, keep_alive=0).done_reason == "unload"
    deadline = time.monotonic() + 30
    while LLAMA + ":latest" in {m.model for m in client.ps().models} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert LLAMA + ":latest" not in {m.model for m in client.ps().models}
    cold = client.chat(model=LLAMA, messages=HI, options=FEW)  # loads again: the load is timed
    assert cold.load_duration > 0
