"""The grammar that makes a model call a tool: tool_choice "required" (one or more calls of
any offered function, one when parallel_tool_calls is false) or a named function (one call
of it), written in the template family's format, each call's arguments valid against its
function's parameters schema."""

from __future__ import annotations

import json
from typing import Any

from backends.grammar import lark_grammar, lark_json
from backends.protocol import ToolDefinition
from backends.tools.formats import ToolFormat


def _call_schema(fmt: ToolFormat, tool: ToolDefinition) -> dict[str, Any]:
    key = fmt.arguments_key
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, key: tool.function.parameters_schema()},
        "required": ["name", key],
        "additionalProperties": False,
    }


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a Lark string literal


def tool_call_grammar(
    fmt: ToolFormat, tools: list[ToolDefinition], *, named: str | None, parallel: bool, or_json: dict[str, Any] | None = None
) -> str:
    """Grammar text for `fmt`'s calls of `tools` (only `named`, once, when given); with
    `or_json`, the alternative of an answer in JSON valid against that schema instead
    (tool_choice auto with a response_format)."""
    options = [_call_schema(fmt, t) for t in tools if named is None or t.function.name == named]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    many = parallel and named is None
    if fmt.array:
        array = {"type": "array", "items": schema, "minItems": 1, **({} if many else {"maxItems": 1})}
        rules = f"calls: {_literal(fmt.start)} body\nbody: {lark_json(array)}\n"
    elif fmt.end is not None:
        opening, closing = _literal(fmt.start + "\n"), _literal("\n" + fmt.end)
        repeat = ' ("\\n" call)*' if many else ""
        rules = f"calls: call{repeat}\ncall: {opening} body {closing}\nbody: {lark_json(schema)}\n"
    else:
        repeat = ' ("; " body)*' if many else ""  # bare JSON calls (Llama 3.1), separated as it separates them
        rules = f"calls: body{repeat}\nbody: {lark_json(schema)}\n"
    start = "start: calls | answer\nanswer: " + lark_json(or_json) + "\n" if or_json is not None else "start: calls\n"
    return lark_grammar(start + rules)
