"""Ollama's native API as a dialect (gateway/dialects/ollama*.py), without a model: the
translation of its requests onto the contract, its refusals (400s in Ollama's shape naming
the field), its records from the contract's chunks and answers, the GGUF header reader, the
model pages of a gateway with a remote backend, and /api/pull behind the admin key."""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from backends.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkDelta,
    ChunkFunctionCall,
    ChunkToolCall,
    Completion,
    CompletionChoice,
    CompletionRequest,
    InvalidRequest,
    ResponseFunctionCall,
    ResponseMessage,
    ResponseToolCall,
    UpstreamError,
    Usage,
)
from gateway.app import create_app
from gateway.dialects import ollama_translate as tr
from gateway.dialects.ollama_gguf import read_metadata
from gateway.dialects.ollama_stream import OllamaDialect, Timer, rfc3339
from gateway.dialects.ollama_types import ChatRequest, GenerateRequest
from policies.schema import Config

ADMIN_KEY = "unit-admin-key-0123456789"
HI = [{"role": "user", "content": "hi"}]


# -- translation ---------------------------------------------------------------------------------


def chat(**fields: Any) -> ChatCompletionRequest:
    return tr.chat_request(ChatRequest.model_validate({"model": "m", "messages": HI, **fields}), "m")


def test_options_map_onto_the_contracts_sampling_fields() -> None:
    options = {"num_predict": 12, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 7,
               "stop": ["\n"], "repeat_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.25}  # fmt: skip
    body = chat(options=options, keep_alive="5m")
    assert (body.max_tokens, body.temperature, body.top_p, body.top_k, body.min_p, body.seed) == (12, 0.5, 0.9, 40, 0.05, 7)
    assert (body.stop, body.repetition_penalty, body.presence_penalty, body.frequency_penalty) == (["\n"], 1.1, 0.5, 0.25)
    assert body.keep_alive == "5m" and body.stream is True  # Ollama streams by default


@pytest.mark.parametrize("num_predict", [-1, 0])
def test_num_predict_minus_one_or_zero_leaves_max_tokens_unset(num_predict: int) -> None:
    assert chat(options={"num_predict": num_predict}).max_tokens is None


def test_format_json_is_json_mode_and_a_schema_is_structured_output() -> None:
    assert chat(format="json").response_format.type == "json_object"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = chat(format=schema).response_format
    assert fmt.type == "json_schema" and fmt.schema_object() == schema
    assert chat(format="").response_format is None


def test_tool_history_gets_ids_and_results_answer_their_calls() -> None:
    history = [
        {"role": "user", "content": "weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "weather", "arguments": {"city": "Paris"}}},
            {"function": {"name": "time", "arguments": {}}},
        ]},
        {"role": "tool", "tool_name": "time", "content": "noon"},
        {"role": "tool", "content": "sunny"},
    ]  # fmt: skip
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}, {"type": "function", "function": {"name": "time"}}]
    body = chat(messages=history, tools=tools)
    calls = body.messages[1].tool_calls
    assert [c.function.name for c in calls] == ["weather", "time"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert body.messages[2].tool_call_id == calls[1].id  # by name
    assert body.messages[3].tool_call_id == calls[0].id  # the one left
    assert [t.function.name for t in body.tools] == ["weather", "time"]


def test_generate_is_a_chat_with_system_or_a_raw_completion() -> None:
    templated = tr.generate_request(GenerateRequest(model="m", prompt="hello", system="be brief"), "m")
    assert isinstance(templated, ChatCompletionRequest)
    assert [(m.role, m.content) for m in templated.messages] == [("system", "be brief"), ("user", "hello")]
    raw = tr.generate_request(GenerateRequest(model="m", prompt="<|im_start|>", raw=True, stream=False), "m")
    assert isinstance(raw, CompletionRequest) and raw.prompt == "<|im_start|>" and raw.stream is False


def test_what_the_contract_refuses_names_ollamas_field() -> None:
    with pytest.raises(InvalidRequest) as caught:
        chat(options={"repeat_penalty": 3.0})
    assert caught.value.param == "options.repeat_penalty"


# -- refusals over HTTP --------------------------------------------------------------------------


def make_app(**server: Any) -> Any:
    return create_app(
        Config.model_validate(
            {"server": server, "backends": [{"name": "up", "kind": "remote", "model": "m", "url": "http://127.0.0.1:9/v1", "metrics_url": "none"}]}
        )
    )


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(make_app(), client=("127.0.0.1", 50000)) as c:
        yield c


REFUSED_CHAT = [
    ({"think": True}, "think"),
    ({"think": "high"}, "think"),
    ({"logprobs": True}, "logprobs"),
    ({"truncate": True}, "truncate"),
    ({"options": {"num_ctx": 4096}}, "num_ctx"),
    ({"options": {"mirostat": 1}}, "mirostat"),
    ({"options": {"num_predict": -2}}, "num_predict"),
    ({"options": {"temperature": 5}}, "options.temperature"),
    ({"options": {"stop": ["a", "b", "c", "d", "e"]}}, "options.stop"),
    ({"format": "yaml"}, "format"),
    ({"format": {"type": 5}}, "format"),
    ({"messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, "images"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"tools": [{"type": "function", "function": {"name": "not a name"}}]}, "tools.0.function.name"),
    ({"keep_alive": "soon"}, "keep_alive"),
    ({"stream": "yes"}, "stream"),
]


@pytest.mark.parametrize(("extra", "named"), REFUSED_CHAT)
def test_chat_refusals_are_400s_in_ollamas_shape_naming_the_field(client: TestClient, extra: dict, named: str) -> None:
    r = client.post("/api/chat", json={"model": "m", "messages": HI, **extra})
    assert r.status_code == 400
    assert list(r.json()) == ["error"] and named in r.json()["error"]


@pytest.mark.parametrize(
    ("extra", "named"),
    [({"suffix": "}"}, "suffix"), ({"template": "{{ .Prompt }}"}, "template"), ({"images": ["aGk="]}, "images"),
     ({"context": [1, 2]}, "context"), ({"raw": True, "system": "s"}, "system"), ({"raw": True, "format": "json"}, "format"),
     ({"width": 64}, "width")],
)  # fmt: skip
def test_generate_refusals_name_the_field(client: TestClient, extra: dict, named: str) -> None:
    r = client.post("/api/generate", json={"model": "m", "prompt": "x", **extra})
    assert r.status_code == 400 and named in r.json()["error"]


def test_empty_suffix_and_template_are_not_refused() -> None:
    # The official client sends neither when unset, other clients send "": both mean none.
    body = GenerateRequest.model_validate({"model": "m", "prompt": "x", "suffix": "", "template": ""})
    assert body.suffix == "" and body.template == ""


@pytest.mark.parametrize(
    ("path", "body"),
    [("/api/chat", {"model": "nope", "messages": HI}), ("/api/generate", {"model": "nope", "prompt": "x"}),
     ("/api/embed", {"model": "nope", "input": "x"}), ("/api/show", {"model": "nope"})],
)  # fmt: skip
def test_an_unknown_model_is_ollamas_404(client: TestClient, path: str, body: dict) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 404 and r.json() == {"error": "model 'nope' not found"}


def test_bad_json_and_missing_fields_are_400s_in_ollamas_shape(client: TestClient) -> None:
    r = client.post("/api/chat", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 400 and list(r.json()) == ["error"]
    r = client.post("/api/chat", json={"messages": HI})
    assert r.status_code == 400 and "model" in r.json()["error"]
    r = client.post("/api/embed", json={"model": "m", "input": 5})
    assert r.status_code == 400 and "input" in r.json()["error"]
    r = client.post("/api/embed", json={"model": "m", "input": "x", "options": {"temperature": 1}})
    assert r.status_code == 400 and "temperature" in r.json()["error"]


def test_an_empty_embed_input_embeds_nothing(client: TestClient) -> None:
    assert client.post("/api/embed", json={"model": "m", "input": []}).json() == {"model": "m", "embeddings": []}
    assert client.post("/api/embeddings", json={"model": "m", "prompt": ""}).json() == {"embedding": []}


# -- model pages ---------------------------------------------------------------------------------


def test_version_root_tags_show_and_ps(client: TestClient) -> None:
    assert client.get("/api/version").json() == {"version": "0.8.0"}
    assert client.get("/").text == "Ollama is running"
    (listed,) = client.get("/api/tags").json()["models"]
    assert listed["name"] == listed["model"] == "m:latest" and listed["size"] == 0  # a remote model: no file here
    shown = client.post("/api/show", json={"model": "m:latest"}).json()
    assert shown["capabilities"] == ["completion", "tools", "embedding"]
    assert client.post("/api/show", json={"name": "m"}).status_code == 200  # older clients' field
    assert client.get("/api/ps").json() == {"models": []}  # nothing local


# -- records --------------------------------------------------------------------------------------


def chunk(delta: ChunkDelta | None = None, finish: str | None = None, usage: Usage | None = None) -> ChatCompletionChunk:
    choices = [ChunkChoice(delta=delta or ChunkDelta(), finish_reason=finish)] if usage is None else []
    return ChatCompletionChunk(id="c", created=0, model="m", choices=choices, usage=usage)


async def feed(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


async def records(dialect: OllamaDialect, items: list[Any]) -> list[dict]:
    return [json.loads(line) async for line in dialect.events(feed(items))]


async def test_a_chat_stream_is_ndjson_records_then_the_final_one() -> None:
    dialect = OllamaDialect("ollama.chat", "chat", "m:latest", Timer(), streamed=True)
    out = await records(dialect, [
        chunk(ChunkDelta(role="assistant", content="")), chunk(ChunkDelta(content="Hel")), chunk(ChunkDelta(content="lo")),
        chunk(finish="length"), chunk(usage=Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7)),
    ])  # fmt: skip
    assert dialect.media_type == "application/x-ndjson"
    assert [r["message"]["content"] for r in out] == ["Hel", "lo", ""]
    assert all(r["model"] == "m:latest" and r["created_at"].endswith("Z") and not r["done"] for r in out[:-1])
    final = out[-1]
    assert final["done"] is True and final["done_reason"] == "length"
    assert (final["prompt_eval_count"], final["eval_count"]) == (5, 2)
    durations = [final[k] for k in ("load_duration", "prompt_eval_duration", "eval_duration")]
    assert all(isinstance(d, int) and d >= 0 for d in durations) and sum(durations) <= final["total_duration"]


async def test_streamed_tool_calls_come_whole_with_object_arguments() -> None:
    head = ChunkToolCall(index=0, id="call_1", type="function", function=ChunkFunctionCall(name="weather", arguments=""))
    parts = [ChunkToolCall(index=0, function=ChunkFunctionCall(arguments=a)) for a in ('{"city": ', '"Paris"}')]
    items = [chunk(ChunkDelta(tool_calls=[head])), *(chunk(ChunkDelta(tool_calls=[p])) for p in parts), chunk(finish="tool_calls")]
    out = await records(OllamaDialect("ollama.chat", "chat", "m", Timer(), streamed=True), items)
    assert out[0]["message"]["tool_calls"] == [{"function": {"name": "weather", "arguments": {"city": "Paris"}}}]
    assert out[-1]["done"] and out[-1]["done_reason"] == "stop"


async def test_a_raw_generate_stream_is_response_records() -> None:
    items = [Completion(model="m", choices=[CompletionChoice(text="abc")]), Completion(model="m", choices=[CompletionChoice(text="", finish_reason="stop")])]
    out = await records(OllamaDialect("ollama.generate", "generate", "m", Timer(), streamed=True), items)
    assert [r["response"] for r in out] == ["abc", ""] and out[-1]["done"]


def test_whole_answers_are_one_record() -> None:
    call = ResponseToolCall(id="c", function=ResponseFunctionCall(name="f", arguments='{"x": 1}'))
    result = ChatCompletion(
        model="m", choices=[ChatChoice(message=ResponseMessage(content="", tool_calls=[call]), finish_reason="tool_calls")],
        usage=Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7),
    )  # fmt: skip
    record = json.loads(OllamaDialect("ollama.chat", "chat", "m", Timer()).answer(result))
    assert record["message"] == {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]}
    assert record["done"] and record["eval_count"] == 4 and record["prompt_eval_duration"] == 0  # not seen from the edge
    text = ChatCompletion(model="m", choices=[ChatChoice(message=ResponseMessage(content="hey"), finish_reason="stop")])
    assert json.loads(OllamaDialect("ollama.generate", "generate", "m", Timer()).answer(text))["response"] == "hey"
    load = json.loads(OllamaDialect("ollama.generate", "generate", "m", Timer(), load="load").answer(text))
    assert load["response"] == "" and load["done_reason"] == "load"


def test_arguments_that_are_not_an_object_are_an_error_not_a_guess() -> None:
    bad = ResponseToolCall(id="c", function=ResponseFunctionCall(name="f", arguments="[1]"))
    result = ChatCompletion(model="m", choices=[ChatChoice(message=ResponseMessage(tool_calls=[bad]), finish_reason="tool_calls")])
    with pytest.raises(UpstreamError):
        OllamaDialect("ollama.chat", "chat", "m", Timer()).answer(result)


def test_in_band_errors_and_times() -> None:
    dialect = OllamaDialect("ollama.chat", "chat", "m", Timer(), streamed=True)
    assert json.loads(dialect.stream_error(UpstreamError("boom"))) == {"error": "boom"}
    assert "error" in json.loads(dialect.stream_error(None))
    assert rfc3339(0) == "1970-01-01T00:00:00.000000Z"


# -- GGUF ------------------------------------------------------------------------------------------


def _string(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def test_the_gguf_reader_reads_the_header_and_counts_parameters(tmp_path: Path) -> None:
    pairs = [
        _string("general.architecture") + struct.pack("<I", 8) + _string("llama"),
        _string("general.file_type") + struct.pack("<I", 4) + struct.pack("<I", 3),
        _string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 20) + b"".join(_string(f"t{i}") for i in range(20)),
        _string("llama.context_length") + struct.pack("<I", 4) + struct.pack("<I", 2048),
    ]
    tensors = [_string("a") + struct.pack("<I", 2) + struct.pack("<QQ", 4, 8) + struct.pack("<IQ", 0, 0), _string("b") + struct.pack("<I", 1) + struct.pack("<Q", 3) + struct.pack("<IQ", 0, 0)]
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(pairs)) + b"".join(pairs) + b"".join(tensors))
    meta = read_metadata(path)
    assert meta.fields["general.architecture"] == "llama" and meta.fields["llama.context_length"] == 2048
    assert meta.fields["tokenizer.ggml.tokens"] == []  # a long array, skipped
    assert read_metadata(path, keep_arrays=True).fields["tokenizer.ggml.tokens"][19] == "t19"
    assert meta.parameter_count == 4 * 8 + 3
    (tmp_path / "bad.gguf").write_bytes(b"nope" * 8)
    with pytest.raises(ValueError):
        read_metadata(tmp_path / "bad.gguf")


# -- pull --------------------------------------------------------------------------------------------


def test_pull_needs_the_admin_key(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    r = client.post("/api/pull", json={"model": "smollm2-135m"})
    assert r.status_code == 403 and list(r.json()) == ["error"]  # no admin key configured
    monkeypatch.setenv("UNIT_ADMIN_KEY", ADMIN_KEY)
    with TestClient(make_app(admin_key_env="UNIT_ADMIN_KEY")) as admin:
        r = admin.post("/api/pull", json={"model": "smollm2-135m"}, headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json() == {"error": "Invalid admin key."}


def test_pull_streams_progress_then_success(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from backends import models

    pulled: list[str] = []
    target = tmp_path / "model.gguf"
    target.write_bytes(b"x" * 10)
    monkeypatch.setattr(models, "pull", lambda name: pulled.append(name) or target)
    monkeypatch.setenv("UNIT_ADMIN_KEY", ADMIN_KEY)
    auth = {"authorization": f"Bearer {ADMIN_KEY}"}
    with TestClient(make_app(admin_key_env="UNIT_ADMIN_KEY")) as admin:
        r = admin.post("/api/pull", json={"model": "smollm2-135m:latest"}, headers=auth)
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.text.splitlines()]
        assert lines[0] == {"status": "pulling manifest"} and lines[-1] == {"status": "success"}
        assert lines[1]["total"] == lines[1]["completed"] == 10
        assert admin.post("/api/pull", json={"name": "smollm2-135m", "stream": False}, headers=auth).json() == {"status": "success"}
        r = admin.post("/api/pull", json={"model": "no-such-model"}, headers=auth)
        assert r.status_code == 404 and "no-such-model" in r.json()["error"]
    assert pulled == ["smollm2-135m", "smollm2-135m"]
