"""Tools rendered through the model's template (or the fallback prompt), and the grammars
that make a model call them: every walk a grammar allows parses back into valid calls."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from backends.chat_template import render_chat
from backends.grammar import GrammarCompiler, allowed_tokens, bitmask_width
from backends.protocol import ChatCompletionRequest, ChatMessage, ToolDefinition
from backends.tools.formats import HERMES, LLAMA3_JSON, MISTRAL, ToolFormat
from backends.tools.grammar import tool_call_grammar
from backends.tools.parser import ToolCallParser

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]},
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [ToolDefinition.model_validate(t) for t in (WEATHER, ADD)]
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
]
# A template in the Hermes family's manner (written for this test): tools as JSON in the system
# turn, calls as <tool_call> blocks, results as <tool_response> in a user turn.
HERMES_STYLE = (
    "{% if tools %}<|system|>Tools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}\nCall with <tool_call>.\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<|user|><tool_response>{{ m.name }}: {{ m.content }}</tool_response>\n"
    "{% elif m.tool_calls %}<|assistant|>{% for c in m.tool_calls %}<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}\n"
    "{% else %}<|{{ m.role }}|>{{ m.content }}\n{% endif %}{% endfor %}<|assistant|>"
)


def _messages(raw: list[dict]) -> list[ChatMessage]:
    return [ChatMessage.model_validate(m) for m in raw]


def test_a_template_with_tool_support_renders_tools_calls_and_results_itself() -> None:
    text = render_chat(HERMES_STYLE, _messages(HISTORY), tools=TOOLS)
    assert '"name": "get_weather"' in text and '"description": "Current weather"' in text  # the tools, as the template writes them
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text  # arguments as an object
    assert "<tool_response>get_weather: 18C, sunny</tool_response>" in text  # the result, named after its call
    assert "You may call functions" not in text  # no fallback prompt


def test_a_template_without_tool_support_gets_the_fallback_prompt() -> None:
    text = render_chat(None, _messages(HISTORY), tools=TOOLS)  # ChatML, which knows nothing of tools
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nYou may call functions") and '"name": "add"' in system
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in text
    assert "<|im_start|>user\n<tool_response>\n18C, sunny\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_tool_choice_none_offers_no_tools() -> None:
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": HISTORY, "tools": [WEATHER], "tool_choice": "none"})
    text = render_chat(None, req.messages, tools=req.tools_in_use())
    assert "You may call functions" not in text and "<tool_call>" in text  # the history still renders


BYTES = [b"", b"", b""] + [bytes([i]) for i in range(256)]  # 0 pad, 1 BOS, 2 EOS, then the bytes


def _walk(grammar: str, seed: int, steps: int = 2000) -> str:
    """Text a random walk through what the grammar allows produces, up to its end."""
    compiler = GrammarCompiler.from_token_bytes(BYTES, 2, 1, [0, 1, 2])
    constraint = compiler.compile(grammar, what="test", param="tools")
    mask = np.zeros((1, bitmask_width(compiler.vocab_size)), dtype=np.int32)
    rng, out = np.random.default_rng(seed), bytearray()
    for _ in range(steps):
        constraint.fill(mask, 0)
        allowed = np.flatnonzero(allowed_tokens(mask[0], compiler.vocab_size))
        if 2 in allowed and (len(allowed) == 1 or rng.random() < 0.3):
            return out.decode()
        choices = [t for t in allowed if t != 2]
        closing = [t for t in choices if bytes([t - 3]) in b'"}],']  # keeps strings and objects short
        plain = [t for t in choices if bytes([t - 3]).isalnum()]  # and readable
        pick = rng.random()
        token = int(rng.choice(closing if closing and pick < 0.3 else plain if plain and pick < 0.9 else choices))
        assert constraint.accept(token)
        out.append(token - 3)
    raise AssertionError(f"the grammar did not end within {steps} tokens: {out!r}")


def _calls(fmt: ToolFormat, text: str) -> list[tuple[str, dict]]:
    parser = ToolCallParser(fmt)
    content, calls = parser.feed(text)
    rest, more = parser.finish()
    assert (content + rest).strip() == "", text
    return [(c.name, json.loads(c.arguments)) for c in calls + more]


@pytest.mark.parametrize("fmt", [HERMES, MISTRAL, LLAMA3_JSON], ids=lambda f: f.name)
@pytest.mark.parametrize("seed", range(4))
def test_required_calls_parse_and_validate(fmt: ToolFormat, seed: int) -> None:
    text = _walk(tool_call_grammar(fmt, TOOLS, named=None, parallel=True), seed)
    calls = _calls(fmt, text)
    assert calls, text
    schemas = {t.function.name: t.function.parameters_schema() for t in TOOLS}
    for name, arguments in calls:
        jsonschema.validate(arguments, schemas[name])


@pytest.mark.parametrize("fmt", [HERMES, MISTRAL, LLAMA3_JSON], ids=lambda f: f.name)
def test_a_named_choice_is_one_call_of_that_function(fmt: ToolFormat) -> None:
    for seed in range(3):
        calls = _calls(fmt, _walk(tool_call_grammar(fmt, TOOLS, named="add", parallel=True), seed))
        assert [name for name, _ in calls] == ["add"]
        jsonschema.validate(calls[0][1], ADD["function"]["parameters"])


def test_auto_with_a_response_format_is_a_call_or_the_formatted_answer() -> None:
    answer = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    grammar = tool_call_grammar(HERMES, TOOLS, named=None, parallel=False, or_json=answer)
    kinds = set()
    for seed in range(12):
        text = _walk(grammar, seed)
        if text.startswith(HERMES.start):
            assert len(_calls(HERMES, text)) == 1  # parallel_tool_calls false: one call
            kinds.add("call")
        else:
            jsonschema.validate(json.loads(text), answer)
            kinds.add("answer")
    assert kinds == {"call", "answer"}
