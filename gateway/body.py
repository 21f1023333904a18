"""Request bodies of the generation routes, parsed and validated the way FastAPI would (the
same errors, so the same OpenAI 400s), without FastAPI's per-request dependency solving.

FastAPI's rules, kept: an empty body is a missing body; a body is read as JSON only when
its content type is `application/json` or `application/*+json` (no content type: raw bytes,
which then fail validation: FastAPI's strict content type, against CSRF); JSON errors are
`json_invalid`; validation errors are located under `body`.

Before validation, the policy's request bounds (`server.max_messages`, `max_message_bytes`,
`max_tools`, `max_schema_bytes`) are checked on the parsed JSON: a 400 naming the param past
each. A large body is parsed and validated in a thread, a long message list one message at a
time (`validate_in_pieces`): one pydantic call holds the GIL throughout, so only short calls
let the event loop run in between.
"""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any, TypeVar

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from backends.protocol import ChatCompletionRequest, ChatMessage, InvalidRequest, TextContentPart
from policies.schema import ServerConfig

M = TypeVar("M", bound=BaseModel)

# Bodies above this are parsed in a thread; below, inline (a thread hop costs ~50 us, and
# validating 64 KiB costs well under a millisecond).
LARGE_BODY_BYTES = 64 * 1024
PIECEWISE_ITEMS = 64  # in a large body, lists longer than this are validated item by item
_DEFAULT_SERVER = ServerConfig()


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    maintype, _, subtype = media.partition("/")
    return maintype == "application" and (subtype == "json" or subtype.endswith("+json"))


def prompt_token_estimate(raw: bytes) -> int:
    """Prompt tokens, estimated as body bytes / 4 (rounded up): no tokenizer on the request
    path (a tokenizer pass costs more than the whole limiter). The rate limiter reserves
    with it and reconciles with the backend's usage; routers weigh requests by it."""
    return (len(raw) + 3) // 4


async def parse_body(request: Request, model: type[M]) -> tuple[M, bytes]:
    """The request's body as `model`, and the bytes as the client sent them (remote
    backends forward those); RequestValidationError (a 400) when it is not one, and
    InvalidRequest (a 400 naming the param) past one of the policy's request bounds."""
    raw = await request.body()
    if not raw:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    content_type = request.headers.get("content-type")
    is_json = bool(content_type and _is_json(content_type))
    snapshot = request.scope.get("state", {}).get("snapshot")
    server = snapshot.config.server if snapshot is not None else _DEFAULT_SERVER
    if len(raw) <= LARGE_BODY_BYTES:
        return parse_raw(raw, is_json, model, server), raw
    return await asyncio.to_thread(_parse_large, raw, is_json, model, server), raw


def _parse_large(raw: bytes, is_json: bool, model: type[M], server: ServerConfig) -> M:
    """parse_raw in pieces, with the cyclic GC paused: the parse's own allocations (several
    objects per message) set off full collections, each walking the whole heap with the GIL
    held; /healthz took up to 94 ms during a 20,000-message parse with them, 7 ms without.
    Reference counting still frees what is acyclic; the collector runs again right after."""
    paused = gc.isenabled()  # a parse already running may have paused it: leave it to that one
    if paused:
        gc.disable()
    try:
        return parse_raw(raw, is_json, model, server, pieces=True)
    finally:
        if paused:
            gc.enable()


def parse_raw(raw: bytes, is_json: bool, model: type[M], server: ServerConfig, *, pieces: bool = False) -> M:
    """`raw` as `model`: JSON-decoded when `is_json`, bounds checked, validated (with `pieces`,
    by `validate_in_pieces`). CPU work proportional to the body: large ones run in a thread."""
    data: object = raw
    if is_json:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise RequestValidationError(
                [{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error", "input": {}, "ctx": {"error": exc.msg}}],
                body=exc.doc,
            ) from exc
        except Exception as exc:  # undecodable bytes: FastAPI's answer
            raise HTTPException(status_code=400, detail="There was an error parsing the body") from exc
        check_bounds(data, server, len(raw))
    try:
        return validate_in_pieces(model, data) if pieces else model.model_validate(data)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
        raise RequestValidationError(errors, body=data) from None


# -- bounds -------------------------------------------------------------------------------------


def check_bounds(data: object, server: ServerConfig, body_bytes: int | None = None) -> None:
    """InvalidRequest (400, OpenAI's wording and codes) when the parsed body has more messages
    than `max_messages`, a message whose text is over `max_message_bytes` (UTF-8), more tools
    than `max_tools`, or `tools` / `response_format` over `max_schema_bytes` as JSON. Cheap:
    counts and lengths, before any validation (malformed parts are left to it). No part of a
    body is bigger than the body (`body_bytes`, its JSON): below a bound, that bound's
    per-item sizes are not computed, so small bodies cost a few lookups."""
    if not isinstance(data, dict):
        return
    size_of_body = float("inf") if body_bytes is None else body_bytes
    messages = data.get("messages")
    if isinstance(messages, list):
        _check_array("messages", len(messages), server.max_messages)
        for i, message in enumerate(messages if size_of_body > server.max_message_bytes else ()):
            size = _bytes_over(message.get("content") if isinstance(message, dict) else None, server.max_message_bytes)
            if size is not None:
                raise InvalidRequest(
                    f"Invalid 'messages.{i}.content': string too long. Expected a string with maximum length "
                    f"{server.max_message_bytes} bytes, but got a string with length {size} bytes instead.",
                    param=f"messages.{i}.content",
                    code="string_above_max_length",
                )
    tools = data.get("tools")
    if isinstance(tools, list):
        _check_array("tools", len(tools), server.max_tools)
    for field in ("tools", "response_format") if size_of_body > server.max_schema_bytes else ():
        value = data.get(field)
        if value is not None and (size := json_bytes(value)) > server.max_schema_bytes:
            raise InvalidRequest(
                f"Invalid '{field}': {size} bytes of JSON; the maximum is {server.max_schema_bytes} bytes.",
                param=field,
                code="schema_too_large",
            )


def _check_array(param: str, length: int, limit: int) -> None:
    if length > limit:
        raise InvalidRequest(
            f"Invalid '{param}': array too long. Expected an array with maximum length {limit}, "
            f"but got an array with length {length} instead.",
            param=param,
            code="array_above_max_length",
        )


def _bytes_over(content: object, limit: int) -> int | None:
    """The UTF-8 bytes of a message's text (a string, or the text of its parts) when they are
    over `limit`, else None. A string of n characters has n to 4n bytes: only one that may be
    over is encoded."""
    if isinstance(content, str):
        texts = [content]
    elif isinstance(content, list):
        texts = [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    else:
        return None
    if 4 * sum(len(t) for t in texts) <= limit:
        return None
    # surrogatepass: a lone surrogate counts 3 bytes here; validation answers it later.
    size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    return size if size > limit else None


def json_bytes(value: Any) -> int:
    """The size of `value` as compact JSON, UTF-8."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass"))


# -- validation in pieces ------------------------------------------------------------------------------


def validate_in_pieces(model: type[M], data: object) -> M:
    """`model.model_validate(data)`, with a chat's messages (and a long content list's parts)
    validated one at a time first, so that no single call is long: run in a thread, it lets
    the event loop take the GIL between calls (one call for 100,000 messages held it 0.3 s).
    The result is the same model (validated items pass through as instances); an error is
    the same first error: validation stops at the first bad item, which the whole validation
    then reports where it would have."""
    if model is not ChatCompletionRequest or not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        return model.model_validate(data)
    messages: list[object] = []
    for item in data["messages"]:
        validated, ok = _message_in_pieces(item)
        messages.append(validated)
        if not ok:
            break  # the messages after a bad one are not looked at: it is the first error
    return model.model_validate({**data, "messages": messages})


def _message_in_pieces(item: object) -> tuple[object, bool]:
    """(ChatMessage, True), or (the item cut after its first bad part, False)."""
    if isinstance(item, dict) and isinstance(item.get("content"), list) and len(item["content"]) > PIECEWISE_ITEMS:
        parts: list[object] = []
        for part in item["content"]:
            try:
                parts.append(TextContentPart.model_validate(part))
            except ValidationError:
                parts.append(part)
                return {**item, "content": parts}, False
        item = {**item, "content": parts}
    try:
        return ChatMessage.model_validate(item), True
    except ValidationError:
        return item, False
