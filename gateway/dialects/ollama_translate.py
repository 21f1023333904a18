"""Ollama's requests onto the contract (backends.protocol): /api/chat and /api/generate
become a ChatCompletionRequest or, for `raw: true`, a CompletionRequest; /api/embed and
/api/embeddings an EmbeddingRequest. What the contract then refuses (a temperature over 2,
five stop strings) is a 400 naming Ollama's own field."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from backends.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, InvalidRequest
from gateway.dialects.ollama_types import ChatRequest, EmbeddingsRequest, EmbedRequest, Format, GenerateRequest, Message, Options

M = TypeVar("M", bound=BaseModel)

# The contract's field -> Ollama's, for error messages.
_OLLAMA_NAME = {
    "max_tokens": "options.num_predict",
    "temperature": "options.temperature",
    "top_p": "options.top_p",
    "top_k": "options.top_k",
    "min_p": "options.min_p",
    "seed": "options.seed",
    "stop": "options.stop",
    "repetition_penalty": "options.repeat_penalty",
    "presence_penalty": "options.presence_penalty",
    "frequency_penalty": "options.frequency_penalty",
    "response_format": "format",
    "input": "input",
}


def contract(model: type[M], data: dict[str, Any]) -> M:
    """`data` as the contract's `model`; its first validation error as a 400 naming the
    Ollama field it came from."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        # pydantic names a union's member in the location (`str`, `list[...]`): not a field
        loc = [str(p) for p in error.get("loc", ()) if not (isinstance(p, str) and ("[" in p or "-" in p or p in ("str", "int", "float", "list")))]
        field = ".".join([_OLLAMA_NAME.get(loc[0], loc[0]), *loc[1:]]) if loc else "body"
        message = str(error["msg"]).removeprefix("Value error, ")
        raise InvalidRequest(f"Invalid value for '{field}': {message}", param=field) from None


def sampling(options: Options | None) -> dict[str, Any]:
    """Ollama's `options` as the contract's sampling fields. num_predict -1 (and 0, which
    Ollama reads the same way) leaves max_tokens unset: no limit but the context."""
    if options is None:
        return {}
    fields = {
        "max_tokens": options.num_predict if options.num_predict and options.num_predict > 0 else None,
        "temperature": options.temperature,
        "top_p": options.top_p,
        "top_k": options.top_k,
        "min_p": options.min_p,
        "seed": options.seed,
        "stop": options.stop,
        "repetition_penalty": options.repeat_penalty,
        "presence_penalty": options.presence_penalty,
        "frequency_penalty": options.frequency_penalty,
    }
    return {k: v for k, v in fields.items() if v is not None}


def response_format(fmt: Format | None) -> dict[str, Any] | None:
    """`format`: "json" is JSON mode, a schema is structured output, "" or none is text."""
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    return None


def messages(items: list[Message]) -> list[dict[str, Any]]:
    """Ollama's messages as the contract's. Ollama's calls have no ids: each gets one, and a
    tool result answers the earliest unanswered call of its `tool_name` (without one, the
    earliest unanswered call)."""
    out: list[dict[str, Any]] = []
    unanswered: list[tuple[str, str]] = []  # (id, function name)
    for i, m in enumerate(items):
        if m.role == "assistant" and m.tool_calls:
            calls = []
            for j, call in enumerate(m.tool_calls):
                call_id = call.id or f"call_{i}_{j}"
                calls.append({"id": call_id, "type": "function", "function": {"name": call.function.name, "arguments": json.dumps(call.function.arguments)}})
                unanswered.append((call_id, call.function.name))
            out.append({"role": "assistant", "content": m.content or None, "tool_calls": calls})
        elif m.role == "tool":
            match = next((c for c in unanswered if m.tool_name is None or c[1] == m.tool_name), None)
            if match is not None:
                unanswered.remove(match)
            message: dict[str, Any] = {"role": "tool", "content": m.content or ""}
            if match is not None:
                message["tool_call_id"] = match[0]
            if m.tool_name:
                message["name"] = m.tool_name
            out.append(message)
        else:
            out.append({"role": m.role, "content": m.content or ""})
    return out


def _common(req: ChatRequest | GenerateRequest, model: str) -> dict[str, Any]:
    data: dict[str, Any] = {"model": model, "stream": req.streamed(), **sampling(req.options)}
    if req.keep_alive is not None:
        data["keep_alive"] = req.keep_alive
    return data


def chat_request(req: ChatRequest, model: str) -> ChatCompletionRequest:
    """/api/chat as a chat completion of the route's model `model`."""
    data = _common(req, model)
    data["messages"] = messages(req.messages)
    if req.tools:
        data["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
    fmt = response_format(req.format)
    if fmt is not None:
        data["response_format"] = fmt
    return contract(ChatCompletionRequest, data)


def generate_request(req: GenerateRequest, model: str) -> ChatCompletionRequest | CompletionRequest:
    """/api/generate: with `raw`, a text completion of the prompt as is; otherwise a chat of
    one user message (after the `system` message, when given), rendered by the model's template."""
    data = _common(req, model)
    if req.raw:
        return contract(CompletionRequest, {**data, "prompt": req.prompt or ""})
    turns = [{"role": "system", "content": req.system}] if req.system else []
    data["messages"] = [*turns, {"role": "user", "content": req.prompt or ""}]
    fmt = response_format(req.format)
    if fmt is not None:
        data["response_format"] = fmt
    return contract(ChatCompletionRequest, data)


def load_request(model: str, keep_alive: float | str | None) -> CompletionRequest:
    """What loads a model through the one request path (so auth, limits, routing and
    metrics apply): a one-token text completion, its answer dropped. Its keep_alive holds
    as any request's: 0 unloads the model once it is done."""
    data: dict[str, Any] = {"model": model, "prompt": " ", "max_tokens": 1, "stream": False}
    if keep_alive is not None:
        data["keep_alive"] = keep_alive
    return contract(CompletionRequest, data)


def embed_request(req: EmbedRequest | EmbeddingsRequest, model: str) -> EmbeddingRequest:
    """/api/embed (`input`, `truncate`, `dimensions`) or /api/embeddings (`prompt`) as an
    embedding request."""
    data: dict[str, Any] = {"model": model, "encoding_format": "float"}
    if isinstance(req, EmbedRequest):
        data.update(input=req.input, truncate=req.truncate)
        if req.dimensions is not None:
            data["dimensions"] = req.dimensions
    else:
        data["input"] = req.prompt
    if req.keep_alive is not None:
        data["keep_alive"] = req.keep_alive
    return contract(EmbeddingRequest, data)
