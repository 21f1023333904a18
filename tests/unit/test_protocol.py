"""The wire types validate what OpenAI validates, and ignore what OpenAI ignores."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from backends.protocol import ChatCompletionRequest, CompletionRequest, LoadReport

BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_unknown_fields_are_ignored() -> None:
    req = ChatCompletionRequest.model_validate({**BASE, "parallel_tool_calls": True, "store": False})
    assert req.model == "m" and not hasattr(req, "store")


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": "0.5"},  # strings are not numbers
        {"stream": "yes"},
        {"max_tokens": 0},
        {"max_tokens": 2.5},
        {"max_completion_tokens": -1},
        {"n": 0},
        {"n": 129},
        # tool definitions and choices
        {"tools": [{"type": "function"}]},
        {"tools": [{"type": "retrieval", "function": {"name": "f"}}]},
        {"tools": [{"type": "function", "function": {"name": "has space"}}]},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
        {"tools": [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]},
        {"tool_choice": "required"},
        {"tool_choice": "sometimes", "tools": [{"type": "function", "function": {"name": "f"}}]},
        {"tool_choice": {"type": "function", "function": {"name": "g"}}, "tools": [{"type": "function", "function": {"name": "f"}}]},
        {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]},
        {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]}]},
        {"top_p": 1.5},
        {"presence_penalty": 2.5},
        {"stop": ["a"] * 5},
        {"logit_bias": {"abc": 1}},
        {"logit_bias": {"5": 101}},
        {"top_logprobs": 21},
        {"response_format": {"type": "json_schema"}},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
        {"messages": []},
        {"model": ""},
    ],
)
def test_invalid_fields_are_rejected(extra: dict) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({**BASE, **extra})


def test_content_parts_join_and_limits() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            **BASE,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "max_tokens": 7,
            "max_completion_tokens": 9,
            "stop": "x",
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert req.messages[0].text() == "ab"
    assert req.output_limit() == 9  # max_completion_tokens wins
    assert req.stop_list() == ["x"] and req.wants_usage_chunk()


@pytest.mark.parametrize("prompt", ["hi", [1, 2, 3], ["hi"], [[1, 2]]])
def test_completion_prompt_forms(prompt: object) -> None:
    req = CompletionRequest.model_validate({"model": "m", "prompt": prompt})
    assert req.single_prompt() in ("hi", [1, 2, 3], [1, 2])


@pytest.mark.parametrize("prompt", [["a", "b"], [], [[1], [2]]])
def test_completion_rejects_batches_and_empty(prompt: object) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": prompt})


def test_load_report_header_round_trip() -> None:
    report = LoadReport(kv_usage=0.25, kv_free_blocks=120, block_size=16, running=3, waiting=2, max_running=8,
                        prefix_cache_hit_rate=0.5, healthy=False)
    header = report.to_header()
    assert header.startswith("TEXT named_metrics.kv_usage=0.25")
    back = LoadReport.from_header(header)
    for name in ("kv_usage", "kv_free_blocks", "block_size", "running", "waiting", "max_running",
                 "prefix_cache_hit_rate", "healthy"):
        assert getattr(back, name) == getattr(report, name)


def test_load_report_ignores_unknown_metrics() -> None:
    back = LoadReport.from_header("TEXT cpu_utilization=0.3, named_metrics.running=4, named_metrics.other=1")
    assert back.running == 4 and back.waiting == 0


# -- hostile input (issue 17) ------------------------------------------------------------------

LONE = "\ud800"  # what JSON's "\ud800" decodes to: not encodable as UTF-8


@pytest.mark.parametrize(
    ("cls", "data", "loc"),
    [
        (ChatCompletionRequest, {**BASE, "messages": [{"role": "user", "content": f"a{LONE}"}]}, ("messages", 0, "content")),
        (ChatCompletionRequest, {**BASE, "messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]}, ("messages", 0, "content")),
        (ChatCompletionRequest, {**BASE, "messages": [{"role": "user", "content": "hi", "name": LONE}]}, ("messages", 0, "name")),
        (ChatCompletionRequest, {**BASE, "stop": LONE}, ("stop",)),
        (ChatCompletionRequest, {**BASE, "user": LONE}, ("user",)),
        (CompletionRequest, {"model": "m", "prompt": LONE}, ("prompt",)),
        (CompletionRequest, {"model": "m", "prompt": [LONE]}, ("prompt",)),
    ],
)  # fmt: skip
def test_lone_surrogates_are_rejected_where_they_are(cls: type, data: dict, loc: tuple) -> None:
    with pytest.raises(ValidationError) as info:
        cls.model_validate(data)
    assert any(e["loc"][: len(loc)] == loc and "surrogate" in e["msg"] for e in info.value.errors())


def test_surrogate_pairs_and_other_unicode_pass() -> None:
    req = ChatCompletionRequest.model_validate({**BASE, "messages": [{"role": "user", "content": "héllo \U0001f600 ✓"}]})
    assert req.messages[0].text().encode() == "héllo 😀 ✓".encode()


def test_find_surrogate_names_the_path() -> None:
    from backends.protocol import find_surrogate

    assert find_surrogate({"tools": [{"function": {"name": "ok"}}, {"function": {"description": LONE}}]}) == "tools.1.function.description"
    assert find_surrogate({LONE: 1}) == LONE and find_surrogate({"a": ["fine", 3, None]}) is None


@pytest.mark.parametrize("role", ["system", "developer", "user", "tool"])
def test_content_is_required_but_for_the_assistant(role: str) -> None:
    for message in ({"role": role, "content": None}, {"role": role}):
        with pytest.raises(ValidationError) as info:
            ChatCompletionRequest.model_validate({**BASE, "messages": [message]})
        assert info.value.errors()[0]["loc"] == ("messages", 0, "content")
    for message in ({"role": "assistant", "content": None}, {"role": "assistant"}):
        ChatCompletionRequest.model_validate({**BASE, "messages": [message]})


@pytest.mark.parametrize("prompt", [[-1], [3, -7], [[0, -1]]])
def test_negative_token_ids_are_rejected(prompt: object) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": prompt})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({**BASE, "logit_bias": {"-5": 1}})
    assert CompletionRequest.model_validate({"model": "m", "prompt": [0, 5]}).single_prompt() == [0, 5]


# -- response_format json_schema ----------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def _json_schema(**fields: object) -> dict:
    return {**BASE, "response_format": {"type": "json_schema", "json_schema": fields}}


def test_json_schema_response_format_is_accepted_and_round_trips() -> None:
    req = ChatCompletionRequest.model_validate(_json_schema(name="person", schema=PERSON, strict=True, description="who"))
    fmt = req.response_format
    assert fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None
    assert (fmt.json_schema.name, fmt.json_schema.strict, fmt.json_schema.description) == ("person", True, "who")
    assert fmt.schema_object() == PERSON
    # The worker pipe and remote backends without a raw body see it as the client sent it.
    import json

    dumped = json.loads(req.model_dump_json(exclude_unset=True))
    assert dumped["response_format"]["json_schema"] == {"name": "person", "schema": PERSON, "strict": True, "description": "who"}
    assert ChatCompletionRequest.model_validate(dumped) == req
    plain = ChatCompletionRequest.model_validate({**BASE, "response_format": {"type": "json_object"}})
    assert plain.response_format is not None and plain.response_format.schema_object() is None


@pytest.mark.parametrize(
    ("fields", "loc", "words"),
    [
        ({"schema": PERSON}, ("response_format", "json_schema", "name"), "required"),
        ({"name": "bad name", "schema": PERSON}, ("response_format", "json_schema", "name"), "pattern"),
        ({"name": "x" * 65, "schema": PERSON}, ("response_format", "json_schema", "name"), "pattern"),
        ({"name": "p"}, ("response_format", "json_schema", "schema"), "required"),
        ({"name": "p", "schema": [1]}, ("response_format", "json_schema", "schema"), "dictionary"),
        ({"name": "p", "schema": {"type": "object", "properties": 5}}, ("response_format", "json_schema", "schema"), "'properties'"),
        ({"name": "p", "schema": {"type": "objekt"}}, ("response_format", "json_schema", "schema"), "'type'"),
        ({"name": "p", "schema": {"type": "object", "required": "name"}}, ("response_format", "json_schema", "schema"), "'required'"),
    ],
)
def test_bad_json_schema_formats_are_rejected(fields: dict, loc: tuple, words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(_json_schema(**fields))
    errors = caught.value.errors()
    assert errors[0]["loc"] == loc
    assert words in errors[0]["msg"]


def test_json_schema_type_needs_its_json_schema() -> None:
    with pytest.raises(ValidationError, match="json_schema is required"):
        ChatCompletionRequest.model_validate({**BASE, "response_format": {"type": "json_schema"}})


def test_continue_final_message_needs_a_final_assistant_message_and_no_generation_prompt() -> None:
    user = {"role": "user", "content": "hi"}
    ok = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [user, {"role": "assistant", "content": "Hel"}], "continue_final_message": True}
    )
    assert ok.continue_final_message and not ok.generation_prompt()
    assert ChatCompletionRequest.model_validate({"model": "m", "messages": [user]}).generation_prompt()
    assert not ChatCompletionRequest.model_validate({"model": "m", "messages": [user], "add_generation_prompt": False}).generation_prompt()
    with pytest.raises(ValidationError, match="last message to be the assistant"):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [user], "continue_final_message": True})
    with pytest.raises(ValidationError, match="cannot both be true"):
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [user, {"role": "assistant", "content": "x"}], "continue_final_message": True, "add_generation_prompt": True}
        )
