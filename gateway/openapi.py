"""The served OpenAPI schema: request bodies, responses and the error shape, from the same
pydantic models the gateway validates and answers with.

FastAPI cannot see these on its own: the generation routes parse their bodies themselves
(gateway.body) and are served past FastAPI's routing layer (gateway.fastpath), so its schema
had no request bodies, and no route declares its errors (gateway.errors writes them). Here
FastAPI's schema (paths, operation ids, path parameters) is completed from one table,
OPERATIONS, and the components are the pydantic models' own JSON schemas
(`models_json_schema`: request models in validation mode, answers in serialization mode).

Served at `GET /openapi.json` only with `server.api_docs: true`, behind the admin key
(gateway.routes); there is no HTML docs page (they load their assets from a CDN).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

from backends.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
)

REF = "#/components/schemas/{model}"
JSON = "application/json"


# -- models only the schema needs ------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """OpenAI's error fields (backends.protocol.error_body writes them; all four always present)."""

    model_config = ConfigDict(extra="allow")

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every error answer of the OpenAI routes: `{"error": {message, type, param, code}}`."""

    model_config = ConfigDict(extra="allow")

    error: ErrorDetail


class Status(BaseModel):
    """`/healthz`, `/readyz` and `/admin/reload`'s answer."""

    status: str


class Residents(BaseModel):
    """`/admin/ps`: one row per local backend (name, model, state, pid, memory_bytes,
    expires_at, in_flight, restarts, last_exit, load_error)."""

    models: list[dict[str, Any]]


# (model, mode): requests as they are validated, answers as they are written.
MODELS: list[tuple[type[BaseModel], str]] = [
    (ChatCompletionRequest, "validation"),
    (CompletionRequest, "validation"),
    (EmbeddingRequest, "validation"),
    (ChatCompletion, "serialization"),
    (EmbeddingResponse, "serialization"),
    (ChatCompletionChunk, "serialization"),
    (Completion, "serialization"),
    (ModelList, "serialization"),
    (ModelCard, "serialization"),
    (ErrorBody, "serialization"),
    (Status, "serialization"),
    (Residents, "serialization"),
]


def ref(model: type[BaseModel]) -> dict[str, str]:
    """A reference to `model`'s component schema."""
    return {"$ref": REF.format(model=model.__name__)}


# -- the operations ---------------------------------------------------------------------------------

ERROR_DESCRIPTIONS = {
    400: "Invalid request: the body or a parameter (`param` names it)",
    401: "Missing, invalid, expired or revoked API key (admin routes: the admin key)",
    403: "The key may not use this model (admin routes: the admin API is off)",
    404: "Unknown model (`model_not_found`) or unknown URL",
    413: "Request body over `server.max_body_bytes`",
    429: "The caller is over its own rate limit (Retry-After)",
    500: "Unexpected server error",
    502: "The backend failed (`upstream_error`)",
    503: "Saturated, overloaded or a shared store is unreachable (Retry-After)",
    504: "The backend did not answer in time",
}
RETRY_AFTER_STATUSES = (429, 503)
GENERATION_ERRORS = (400, 401, 403, 404, 413, 429, 500, 502, 503, 504)
STREAM_DESCRIPTION = (
    "With `stream: true`: server-sent events, each `data: {{JSON}}` holding one `{chunk}`, ending "
    "with `data: [DONE]`. An error after the first byte comes in-band as `data: {{\"error\": ...}}`."
)


def _examples(fields: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A generation request's examples: whole, and streamed with a usage chunk."""
    whole = {"model": "smollm2-135m", **fields, "max_tokens": 16}
    return {"whole": whole, "stream": {**whole, "stream": True, "stream_options": {"include_usage": True}}}


@dataclass(frozen=True)
class Operation:
    """What FastAPI cannot infer about one operation."""

    summary: str
    ok: type[BaseModel] | None  # the 200 JSON answer (None: `ok_media` below)
    errors: tuple[int, ...]
    request: type[BaseModel] | None = None
    stream: type[BaseModel] | None = None  # the chunk of a `stream: true` answer
    ok_media: dict[str, Any] = field(default_factory=dict)
    also_ok: dict[int, str] = field(default_factory=dict)  # other statuses answered with `ok`: description
    security: str | None = "apiKey"  # apiKey | adminKey | None (open)
    examples: dict[str, dict[str, Any]] = field(default_factory=dict)  # request bodies, by name
    tag: str = "openai"


OPERATIONS: dict[tuple[str, str], Operation] = {
    ("post", "/v1/chat/completions"): Operation(
        "Create a chat completion",
        ChatCompletion,
        GENERATION_ERRORS,
        ChatCompletionRequest,
        ChatCompletionChunk,
        examples=_examples({"messages": [{"role": "user", "content": "Say hello."}]}),
    ),
    ("post", "/v1/completions"): Operation(
        "Create a text completion",
        Completion,
        GENERATION_ERRORS,
        CompletionRequest,
        Completion,
        examples=_examples({"prompt": "Once upon a time"}),
    ),
    ("post", "/v1/embeddings"): Operation(
        "Create embeddings",
        EmbeddingResponse,
        GENERATION_ERRORS,
        EmbeddingRequest,
        examples={"batch": {"model": "smollm2-135m", "input": ["The cat sat on the mat.", "A kitten rested on the rug."]}},
    ),
    ("get", "/v1/models"): Operation("List the models this key may use", ModelList, (401, 429, 500, 503)),
    ("get", "/v1/models/{model_id}"): Operation("Retrieve a model", ModelCard, (401, 404, 429, 500, 503)),
    ("get", "/metrics"): Operation(
        "Prometheus metrics (backend load under vLLM's names)",
        None,
        (500,),
        ok_media={"text/plain": {"schema": {"type": "string"}}},
        security=None,
        tag="operations",
    ),
    ("get", "/healthz"): Operation("Liveness", Status, (500,), security=None, tag="operations"),
    ("get", "/readyz"): Operation(
        "Readiness (503 until every model has a backend up)", Status, (500,), also_ok={503: "Not ready"}, security=None, tag="operations"
    ),
    ("post", "/admin/reload"): Operation(
        "Re-read the policy file", Status, (400, 401, 403, 413, 500), security="adminKey", tag="admin"
    ),
    ("get", "/admin/ps"): Operation(
        "Local models: loaded or not, process, memory, expiry", Residents, (401, 403, 500), security="adminKey", tag="admin"
    ),
}

SECURITY_SCHEMES = {
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key (`turnout keys create`) as `Authorization: Bearer sk-turnout-...`; "
        "not needed with `auth: none` (loopback only).",
    },
    "azureApiKey": {"type": "apiKey", "in": "header", "name": "api-key", "description": "The same key, Azure-style."},
    "adminKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "The admin key (the environment variable `server.admin_key_env` names).",
    },
}
HEADERS = {
    "RequestId": {
        "description": "The request's id (the client's X-Request-Id when sane, else a new one).",
        "required": True,
        "schema": {"type": "string"},
    },
    "RetryAfter": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}},
}


def sse_event(chunk: type[BaseModel]) -> dict[str, Any]:
    """One event of a `stream: true` answer. OpenAPI 3.1 has no word for a stream's items
    (3.2's `itemSchema`), so `schema` describes each event, as OpenAPI 3.2 describes an
    event and as schemathesis reads a 3.1 event stream: its `data` is a `chunk` or an in-band
    error as JSON, or the final `[DONE]`."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {
                        "type": "string",
                        "contentMediaType": JSON,
                        "contentSchema": {"anyOf": [ref(chunk), ref(ErrorBody)]},
                    },
                ]
            },
            "event": {"type": "string"},
        },
    }


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {JSON: {"schema": schema}}


def _responses(op: Operation) -> dict[str, Any]:
    request_id = {"x-request-id": {"$ref": "#/components/headers/RequestId"}}
    content = dict(op.ok_media) if op.ok is None else _json(ref(op.ok))
    if op.stream is not None:
        content["text/event-stream"] = {"schema": sse_event(op.stream)}
    description = "OK" if op.stream is None else "OK. " + STREAM_DESCRIPTION.format(chunk=op.stream.__name__)
    responses: dict[str, Any] = {"200": {"description": description, "headers": request_id, "content": content}}
    for status, meaning in op.also_ok.items():
        responses[str(status)] = {"description": meaning, "headers": request_id, "content": content}
    for status in op.errors:
        headers = dict(request_id)
        if status in RETRY_AFTER_STATUSES:
            headers["retry-after"] = {"$ref": "#/components/headers/RetryAfter"}
        responses[str(status)] = {
            "description": ERROR_DESCRIPTIONS[status],
            "headers": headers,
            "content": _json(ref(ErrorBody)),
        }
    return responses


def _security(op: Operation) -> list[dict[str, list[str]]]:
    if op.security is None:
        return []
    if op.security == "apiKey":
        return [{"apiKey": []}, {"azureApiKey": []}, {}]  # {}: `auth: none` needs no key
    return [{op.security: []}]


def _complete(operation: dict[str, Any], op: Operation) -> None:
    """Fill one FastAPI-made operation from its table entry."""
    operation["summary"] = op.summary
    operation["tags"] = [op.tag]
    operation["responses"] = _responses(op)  # replaces FastAPI's (its 422 is a 400 here)
    operation["security"] = _security(op)
    if op.request is not None:
        body: dict[str, Any] = {"schema": ref(op.request)}
        if op.examples:
            body["examples"] = {name: {"value": value} for name, value in op.examples.items()}
        operation["requestBody"] = {"required": True, "content": {JSON: body}}


def component_schemas() -> dict[str, Any]:
    """The components: MODELS' JSON schemas and everything they reference."""
    _, top = models_json_schema(MODELS, ref_template=REF)
    return top.get("$defs", {})


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """The whole schema (cached on the app: its routes and models never change)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description="An OpenAI-shaped LLM gateway: the OpenAI API over pluggable backends.",
        routes=app.routes,
    )
    for path, methods in schema.get("paths", {}).items():
        for method, operation in methods.items():
            op = OPERATIONS.get((method, path))
            if op is not None:
                _complete(operation, op)
            elif "422" in operation.get("responses", {}):
                # A route the table does not know yet: FastAPI's 422 is a 400 in this gateway.
                del operation["responses"]["422"]
                operation["responses"]["400"] = {"description": ERROR_DESCRIPTIONS[400], "content": _json(ref(ErrorBody))}
    components = schema.setdefault("components", {})
    schemas = {**components.get("schemas", {}), **component_schemas()}
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body: never sent here
        schemas.pop(name, None)
    components.update(schemas=schemas, securitySchemes=SECURITY_SCHEMES, headers=HEADERS)
    app.openapi_schema = schema
    return schema
