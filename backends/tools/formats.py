"""The tool-call formats of the chat-template families, and which one a template speaks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ToolFormat:
    """How a family writes a call: `start` (and `end`, when calls are delimited one by one)
    around JSON objects `{"name": ..., <arguments_key>: {...}}`; `array`: one JSON array of
    such objects after `start` (Mistral)."""

    name: str
    start: str
    end: str | None
    arguments_key: str = "arguments"
    array: bool = False
    # Whether the output may open with a bare call object, without `start` (Llama 3.1's
    # JSON calls; its <|python_tag|> is a special token that detokenizing may drop).
    bare: bool = False


HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>")  # Hermes, Qwen 2.5/3, and turnout's fallback
LLAMA3_JSON = ToolFormat("llama3_json", "<|python_tag|>", None, arguments_key="parameters", bare=True)
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", None, array=True)
FORMATS = {f.name: f for f in (HERMES, LLAMA3_JSON, MISTRAL)}


def template_format(template: str | None) -> ToolFormat | None:
    """The family of a chat template that renders tools itself; None when it has no tool
    support (or writes calls in a format turnout does not parse): the fallback prompt then
    describes the tools in the Hermes format."""
    if not template or "tools" not in template:
        return None
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3_JSON
    return None
