"""Request bodies of the generation routes, parsed and validated the way FastAPI would (the
same errors, so the same OpenAI 400s), without FastAPI's per-request dependency solving.

FastAPI's rules, kept: an empty body is a missing body; a body is read as JSON only when
its content type is `application/json` or `application/*+json` (no content type: raw bytes,
which then fail validation: FastAPI's strict content type, against CSRF); JSON errors are
`json_invalid`; validation errors are located under `body`.
"""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


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
    backends forward those); RequestValidationError (a 400) when it is not one."""
    raw = await request.body()
    if not raw:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    content_type = request.headers.get("content-type")
    data: object = raw
    if content_type and _is_json(content_type):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise RequestValidationError(
                [{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error", "input": {}, "ctx": {"error": exc.msg}}],
                body=exc.doc,
            ) from exc
        except Exception as exc:  # undecodable bytes: FastAPI's answer
            raise HTTPException(status_code=400, detail="There was an error parsing the body") from exc
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
        raise RequestValidationError(errors, body=data) from None
    return body, raw
