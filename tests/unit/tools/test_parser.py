"""Tool-call parsing per template family, whole and streamed in every cut."""

from __future__ import annotations

import json

import pytest

from backends.tools.formats import HERMES, LLAMA3_JSON, MISTRAL, ToolFormat, template_format
from backends.tools.parser import ParsedCall, ToolCallParser


def _parse(fmt: ToolFormat, pieces: list[str]) -> tuple[str, list[ParsedCall]]:
    parser = ToolCallParser(fmt)
    content, calls = "", []
    for piece in pieces:
        text, new = parser.feed(piece)
        content, calls = content + text, calls + new
    text, new = parser.finish()
    return content + text, calls + new


def _every_split(text: str) -> list[list[str]]:
    return [[text]] + [[text[:i], text[i:]] for i in range(1, len(text))] + [list(text)]


CASES = [
    (
        HERMES,
        'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>',
        "Let me look.",
        [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})],
    ),
    (MISTRAL, '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}, {"name": "f", "arguments": {}}]', "", [("add", {"a": 1}), ("f", {})]),
    (LLAMA3_JSON, '  {"name": "get_weather", "parameters": {"city": "Oslo"}}', "", [("get_weather", {"city": "Oslo"})]),
    (LLAMA3_JSON, '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}', "", [("a", {}), ("b", {"x": 1})]),
    (HERMES, 'Hermes with arguments as text <tool_call>{"name": "f", "arguments": "{\\"x\\": 2}"}</tool_call>', "Hermes with arguments as text ", [("f", {"x": 2})]),
]


@pytest.mark.parametrize(("fmt", "text", "content", "expected"), CASES)
def test_calls_are_parsed_whatever_the_chunking(fmt: ToolFormat, text: str, content: str, expected: list) -> None:
    for pieces in _every_split(text):
        got_content, calls = _parse(fmt, pieces)
        assert got_content.strip() == content.strip(), pieces
        assert [(c.name, json.loads(c.arguments)) for c in calls] == expected, pieces
        assert [c.index for c in calls] == list(range(len(expected)))
        assert all(c.id.startswith("call_") for c in calls) and len({c.id for c in calls}) == len(calls)


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        (HERMES, "No calls here, just < and <tool and a <b>tag</b>."),
        (HERMES, "<tool_call>not json</tool_call> after"),
        (HERMES, '<tool_call>{"name": "f", "arguments": {"x": 1}'),  # cut off by the length limit
        (HERMES, '<tool_call>{"arguments": {}}</tool_call>'),  # no name
        (MISTRAL, "[TOOL_CALLS] oops"),
        (LLAMA3_JSON, "The answer is {not a call}"),
        (LLAMA3_JSON, '{"name": "f", "parameters": '),
    ],
)
def test_text_that_is_not_a_call_stays_content(fmt: ToolFormat, text: str) -> None:
    for pieces in _every_split(text):
        content, calls = _parse(fmt, pieces)
        assert calls == [] and content == text, pieces


def test_content_is_streamed_before_the_call_ends() -> None:
    parser = ToolCallParser(HERMES)
    assert parser.feed("Hello <tool") == ("Hello ", [])  # a possible marker start is held back
    assert parser.feed("bar> there") == ("<toolbar> there", [])
    assert parser.feed('<tool_call>{"name": "f", ') == ("", [])
    text, calls = parser.feed('"arguments": {}}</tool_call>')
    assert text == "" and [c.name for c in calls] == ["f"] and parser.calls == 1


def test_template_families_are_recognised() -> None:
    assert template_format(None) is None
    assert template_format("{% for m in messages %}{{ m.content }}{% endfor %}") is None  # no tool support
    assert template_format("{% if tools %}<tool_call>{% endif %}") is HERMES
    assert template_format("{% if tools %}[TOOL_CALLS]{% endif %}") is MISTRAL
    assert template_format("{% if tools %}<|python_tag|>{% endif %}") is LLAMA3_JSON
