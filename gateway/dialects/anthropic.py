"""Anthropic's Messages API onto the contract: `POST /v1/messages` and
`POST /v1/messages/count_tokens` become ChatCompletionRequests through the one request path
(gateway.generate), so auth (`x-api-key`), limits, routing, metrics and logs apply unchanged.
The answer and the stream are written by gateway.dialects.anthropic_stream; errors take
Anthropic's shape from gateway.errors (by URL).

What the contract cannot serve is a 400 naming Anthropic's field (anthropic_types); what the
contract then refuses (a fifth stop sequence, a schema that is not JSON Schema) is a 400
naming the Anthropic field it came from, not the contract's.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from backends.protocol import ChatCompletionRequest, InvalidRequest
from gateway.body import parse_body
from gateway.dialects.anthropic_stream import CountTokensDialect, MessagesDialect
from gateway.dialects.anthropic_types import (
    CountTokensRequest,
    MessagesRequest,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
    Prompt,
)
from gateway.generate import generate, unless_disconnected

router = APIRouter()

# Parts of a validation error's location that name a union's member, not a field.
_UNION_TAGS = frozenset({"str", "list", "body"})


@router.post("/v1/messages", response_model=None)
async def messages(request: Request) -> Response:
    """Create a Message (Anthropic's `messages.create` / `messages.stream`)."""
    body, raw = await _parse(request, MessagesRequest)
    contract, _ = to_contract(body)
    dialect = MessagesDialect(model=body.model, stop_sequences=body.stop_sequences or [])
    return await unless_disconnected(request, generate("chat", contract, raw, request, dialect))


@router.post("/v1/messages/count_tokens", response_model=None)
async def count_tokens(request: Request) -> Response:
    """The prompt's tokens, system and tools included: a one-token generation through the
    one request path, whose usage.prompt_tokens is the count (backends have no tokenize
    call; the prompt is rendered by the model's own template, so the count is exact)."""
    body, raw = await _parse(request, CountTokensRequest)
    contract, _ = to_contract(body)
    return await unless_disconnected(request, generate("chat", contract, raw, request, CountTokensDialect()))


# -- parsing ------------------------------------------------------------------------------------


async def _parse(request: Request, model: type[Prompt]) -> tuple[Any, bytes]:
    """The body as `model`, its validation errors worded as Anthropic's (`field: message`),
    and the fields Anthropic defines that are not served refused by name."""
    try:
        body, raw = await parse_body(request, model)
    except RequestValidationError as exc:
        raise InvalidRequest(validation_message(list(exc.errors()))) from None
    refused = body.refused_fields()
    if refused:
        field, why = refused[0]
        raise InvalidRequest(f"{field}: {why}", param=field)
    return body, raw


def validation_message(errors: list[dict[str, Any]]) -> str:
    """Anthropic's wording of the first validation error: `messages.0.role: Input should be
    'user' or 'assistant'`, `max_tokens: Field required`."""
    err = errors[0]
    kind = err.get("type")
    if kind == "json_invalid":
        return f"The request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}"
    loc = [str(p) for p in err.get("loc", ()) if p not in _UNION_TAGS and not str(p).startswith("block:")]
    if kind == "missing" and not loc:
        return "The request body is empty: expected a JSON object."
    message = str(err["msg"]).removeprefix("Value error, ")
    return f"{'.'.join(loc)}: {message}" if loc else message


# -- translation --------------------------------------------------------------------------------


def to_contract(body: MessagesRequest | CountTokensRequest) -> tuple[ChatCompletionRequest, list[str]]:
    """The contract's request for `body`, and for each of its messages the Anthropic field
    it came from (for error messages). count_tokens asks for one token, greedily."""
    msgs, origins = contract_messages(body)
    data: dict[str, Any] = {"model": body.model, "messages": msgs}
    if body.tools:
        data["tools"] = [
            {"type": "function", "function": _drop_none({"name": t.name, "description": t.description, "parameters": t.input_schema, "strict": t.strict})}
            for t in body.tools
        ]
    if body.tool_choice is not None:
        choice = body.tool_choice
        data["tool_choice"] = (
            {"type": "function", "function": {"name": choice.name}}
            if choice.type == "tool"
            else {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        )
        if choice.disable_parallel_tool_use is not None:
            data["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    if body.output_config is not None and body.output_config.format is not None:
        data["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": body.output_config.format.schema_}}
    if isinstance(body, MessagesRequest):
        data.update(
            _drop_none(
                {
                    "max_tokens": body.max_tokens,
                    "temperature": body.temperature,
                    "top_p": body.top_p,
                    "top_k": body.top_k,
                    "stop": body.stop_sequences or None,
                    "user": body.metadata.user_id if body.metadata else None,
                    "stream": bool(body.stream),
                }
            )
        )
        if body.stop_sequences:
            # The backends strip a stop sequence from the text; the sampled tokens (logprobs)
            # still hold it, which is how the answer tells which one matched (anthropic_stream).
            data["logprobs"] = True
    else:
        data.update(max_tokens=1, temperature=0.0)
    return contract(data, origins), origins


def contract_messages(body: MessagesRequest | CountTokensRequest) -> tuple[list[dict[str, Any]], list[str]]:
    """Anthropic's system prompt and turns as the contract's messages: text blocks as text
    parts; an assistant's tool_use blocks as its `tool_calls` (input as JSON text); a user's
    tool_result blocks as `tool` messages (in place, the user's text around them in user
    messages; an error result's text is prefixed "Error: ", the contract having no flag).
    Refused: a final assistant message (prefill: the answer would continue it, which chat
    templates cannot do), and a tool_result answering no tool_use of the turn before."""
    out: list[dict[str, Any]] = []
    origins: list[str] = []
    system = body.system_text()
    if system:
        out.append({"role": "system", "content": _parts(system)})
        origins.append("system")
    called: set[str] = set()  # the tool_use ids of the previous assistant turn
    for i, message in enumerate(body.messages):
        where = f"messages.{i}"
        blocks = message.blocks()
        if message.role == "assistant":
            texts = [b for b in blocks if isinstance(b, TextBlock)]
            calls = [b for b in blocks if isinstance(b, ToolUseBlock)]
            item: dict[str, Any] = {"role": "assistant", "content": _parts(texts) if texts else (None if calls else "")}
            if calls:
                item["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.input, ensure_ascii=False)}} for c in calls
                ]
            out.append(item)
            origins.append(where)
            called = {c.id for c in calls}
            continue
        pending: list[TextBlock] = []
        for j, block in enumerate(blocks):
            if isinstance(block, ToolResultBlock):
                if block.tool_use_id not in called:
                    raise InvalidRequest(
                        f"{where}.content.{j}: tool_result block's tool_use_id {block.tool_use_id!r} does not match "
                        "any tool_use block in the previous assistant message",
                        param=f"{where}.content.{j}.tool_use_id",
                    )
                if pending:
                    out.append({"role": "user", "content": _parts(pending)})
                    origins.append(where)
                    pending = []
                text = block.text()
                out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": f"Error: {text}" if block.is_error else text})
                origins.append(f"{where}.content.{j}")
            elif isinstance(block, TextBlock):
                pending.append(block)
        if pending or not any(isinstance(b, ToolResultBlock) for b in blocks):
            out.append({"role": "user", "content": _parts(pending)})
            origins.append(where)
        called = set()
    if body.messages[-1].role == "assistant":
        raise InvalidRequest(
            f"messages.{len(body.messages) - 1}: a final assistant message (prefill) is not supported by this server; "
            "the last message must be a user message",
            param="messages",
        )
    return out, origins


def _parts(blocks: list[TextBlock]) -> list[dict[str, str]]:
    return [{"type": "text", "text": b.text} for b in blocks]


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


# The contract's fields -> Anthropic's, for its validation errors.
_ANTHROPIC_NAME = {
    "stop": "stop_sequences",
    "user": "metadata.user_id",
    "response_format": "output_config.format",
    "parallel_tool_calls": "tool_choice.disable_parallel_tool_use",
}


def contract(data: dict[str, Any], origins: list[str]) -> ChatCompletionRequest:
    """`data` as the contract's request; its first validation error as a 400 naming the
    Anthropic field it came from."""
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(_contract_message(exc, origins)) from None


def _contract_message(exc: ValidationError, origins: list[str]) -> str:
    err = exc.errors()[0]
    loc = [p for p in err.get("loc", ()) if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p or "-" in p))]
    message = str(err["msg"]).removeprefix("Value error, ")
    if not loc:
        return message
    head, rest = loc[0], loc[1:]
    if head == "messages" and rest and isinstance(rest[0], int) and rest[0] < len(origins):
        field = origins[rest[0]]  # the turn the contract's message came from; its own path differs
    elif head == "tools" and len(rest) >= 2 and rest[1:3] == ["function", "parameters"]:
        field = f"tools.{rest[0]}.input_schema"
    elif head == "tool_choice":
        field = "tool_choice"
    else:
        field = ".".join([_ANTHROPIC_NAME.get(str(head), str(head)), *map(str, rest)])
    return f"{field}: {message}"
