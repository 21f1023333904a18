"""Who may use the admin API (/admin/*, the console, Ollama's /api/pull): the holder of the
admin key (`server.admin_key_env`); with no admin key configured, read-only pages still
answer callers on this machine (a dev laptop)."""

from __future__ import annotations

import hmac

from fastapi import Request
from fastapi.responses import JSONResponse

from gateway.errors import Dialect, error_response

ADMIN_OFF = "The admin API is off: set server.admin_key_env to the name of an environment variable holding the admin key."


def on_this_machine(request: Request) -> bool:
    """Whether the caller is on this machine: its address (gateway.middleware's, which takes
    X-Forwarded-For from `server.trusted_proxies` only) is loopback, and no proxy forwarded
    the request (a proxy on loopback, nginx, fronts remote callers)."""
    client = request.scope.get("state", {}).get("client_ip") or (request.client.host if request.client else "")
    forwarded = "x-forwarded-for" in request.headers or "forwarded" in request.headers
    return client in ("127.0.0.1", "::1") and not forwarded


def admin_refusal(request: Request, *, read_only: bool = False, dialect: Dialect = "openai") -> JSONResponse | None:
    """None when the caller holds the admin key (or, `read_only`, is on this machine while no
    admin key is configured); else the 401/403 to answer, in `dialect`."""
    key = request.app.state.runtime.admin_key()
    if key is None:
        if read_only and on_this_machine(request):
            return None
        return error_response(403, ADMIN_OFF, dialect=dialect)
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), key.encode()):
        return error_response(401, "Invalid admin key.", code="invalid_api_key", dialect=dialect)
    return None
