"""A chat request's messages and tools as a chat template reads them (Hugging Face's
conventions: `tools` as a list of {"type": "function", "function": {...}}, an assistant's
`tool_calls` with their arguments as objects, `tool` messages with `tool_call_id`), or, for a
template without tool support, turnout's fallback: the tools described in a system message,
calls and results written into the text in the Hermes format."""

from __future__ import annotations

import json
from typing import Any

from backends.protocol import ChatMessage, ToolDefinition
from backends.tools.formats import HERMES

FALLBACK_INSTRUCTIONS = (
    "You may call functions to answer. They are described here, as JSON Schema:\n"
    "<tools>\n{tools}\n</tools>\n"
    "To call functions, answer with one block per call and nothing else:\n"
    "<tool_call>\n"
    '{{"name": <function name>, "arguments": <arguments as a JSON object>}}\n'
    "</tool_call>"
)


def _call_text(name: str, arguments: dict[str, Any]) -> str:
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{HERMES.start}\n{body}\n{HERMES.end}"


def fallback_instructions(tools: list[ToolDefinition]) -> str:
    """The system prompt that offers `tools` to a model whose template cannot."""
    listed = "\n".join(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False) for t in tools)
    return FALLBACK_INSTRUCTIONS.format(tools=listed)


def template_messages(
    messages: list[ChatMessage], tools: list[ToolDefinition], *, native: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(the messages, the tools or None) to render with a chat template; `native`: the
    template renders tools and calls itself."""
    names: dict[str, str] = {}  # tool_call_id -> function name, for the results
    out: list[dict[str, Any]] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role  # OpenAI's newer name for system
        item: dict[str, Any] = {"role": role, "content": m.text()}
        if m.tool_calls:
            calls = [(c.id, c.function.name, c.function.parsed_arguments()) for c in m.tool_calls]
            names.update((cid, name) for cid, name, _ in calls)
            if native:
                item["tool_calls"] = [{"id": cid, "type": "function", "function": {"name": n, "arguments": a}} for cid, n, a in calls]
            else:
                item["content"] = "\n".join(([item["content"]] if item["content"] else []) + [_call_text(n, a) for _, n, a in calls])
        if role == "tool":
            name = names.get(m.tool_call_id or "", m.name or "")
            if native:
                item.update(tool_call_id=m.tool_call_id, name=name)
            else:
                result = f"<tool_response>\n{item['content']}\n</tool_response>"
                if out and out[-1].get("_results"):  # consecutive results: one user turn
                    out[-1]["content"] += "\n" + result
                    continue
                item = {"role": "user", "content": result, "_results": True}
        out.append(item)
    for item in out:
        item.pop("_results", None)
    if not tools:
        return out, None
    if native:
        return out, [t.model_dump(exclude_none=True) for t in tools]
    instructions = fallback_instructions(tools)
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{instructions}" if out[0]["content"] else instructions
    else:
        out.insert(0, {"role": "system", "content": instructions})
    return out, None
