"""Authentication on /v1/*, and the per-request admission that routes call (model
permission, then the rate-limit decision).

The key comes in `Authorization: Bearer sk-turnout-...` or, as Azure-style clients send
it, `api-key: sk-turnout-...`. It is hashed and looked up in the key store:
- file store: a dict lookup after one stat() of the file (reloaded when it changes);
- Redis store: the record is cached for RECORD_TTL_S (its fields never change), but its
  `revoked` flag is read by the rate-limit script in the same round trip as the limit
  decision, on every request, so a revocation holds at the next request on every replica.

With `auth: none` (loopback only) every request is one anonymous principal, limited by
the `limits` defaults when they set any.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backends.protocol import ChatCompletionRequest, CompletionRequest
from gateway.errors import error_response
from gateway.keys import FileKeyStore, KeyRecord, RedisKeyStore, hash_secret
from gateway.ratelimit import (
    NO_TICKET,
    Bucket,
    KeyRevoked,
    Limiter,
    LimiterUnavailable,
    NoTicket,
    RateLimited,
    StoreError,
    Ticket,
    buckets_for,
)
from policies.schema import Config, LimitSpec

log = logging.getLogger("turnout.auth")

RECORD_TTL_S = 30.0  # Redis store: how long a key's (immutable) record is cached


@dataclass(frozen=True)
class Principal:
    """Who is calling, and what applies to them."""

    key_id: str
    tenant: str
    models: frozenset[str] | None  # None: every model
    priority: str
    buckets: tuple[Bucket, ...]
    expires: float | None
    record_key: str | None  # Redis store: checked for revocation with each decision

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


class AuthError(Exception):
    """401 invalid_api_key."""


class ModelForbidden(Exception):
    """403: the key may not use this model."""


class Authenticator:
    """Secret -> Principal, from the configured key store."""

    def __init__(self, config: Config, store: FileKeyStore | RedisKeyStore | None, fail_open: bool = True) -> None:
        self.config = config
        self.store = store
        self.fail_open = fail_open
        self._cache: dict[str, tuple[KeyRecord, Principal, float]] = {}
        limits = config.limits
        self.anonymous = Principal(
            "anonymous", "default", None, "interactive", self._buckets("anonymous", "default", limits.key), None, None
        )

    def _buckets(self, key_id: str, tenant: str, key: LimitSpec) -> tuple[Bucket, ...]:
        limits = self.config.limits
        prefix = self.config.redis.prefix if self.config.redis else ""
        tenant_spec = limits.tenants.get(tenant, limits.tenant)
        return buckets_for(prefix, key_id, tenant, key, tenant_spec, limits.burst_seconds)

    def _principal(self, record: KeyRecord) -> Principal:
        default = self.config.limits.key
        spec = LimitSpec(
            rpm=record.rpm if record.rpm is not None else default.rpm,
            tpm=record.tpm if record.tpm is not None else default.tpm,
        )
        return Principal(
            key_id=record.id,
            tenant=record.tenant,
            models=frozenset(record.models) if record.models else None,
            priority=record.priority,
            buckets=self._buckets(record.id, record.tenant, spec),
            expires=record.expires,
            record_key=self.store.record_key(record.hash) if isinstance(self.store, RedisKeyStore) else None,
        )

    async def authenticate(self, headers: Iterable[tuple[bytes, bytes]]) -> Principal:
        if self.store is None:
            return self.anonymous
        secret = _secret(headers)
        if not secret:
            raise AuthError(
                "You didn't provide an API key. You need to provide your API key in an Authorization "
                "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or in an api-key header."
            )
        digest = hash_secret(secret)
        record = await self._lookup(digest)
        if record is None or record.revoked:
            raise AuthError(f"Incorrect API key provided: {_redact(secret)}.")
        cached = self._cache.get(digest)
        if cached is not None and cached[0] is record:
            principal = cached[1]
        else:
            principal = self._principal(record)
            self._cache[digest] = (record, principal, time.monotonic())
        if principal.expires is not None and time.time() >= principal.expires:
            raise AuthError(f"The API key {_redact(secret)} has expired.")
        return principal

    async def _lookup(self, digest: str) -> KeyRecord | None:
        if isinstance(self.store, FileKeyStore):
            return self.store.lookup(digest)
        cached = self._cache.get(digest)
        if cached is not None and time.monotonic() - cached[2] < RECORD_TTL_S:
            return cached[0]
        try:
            record = await self.store.alookup(digest)  # type: ignore[union-attr]
        except Exception as exc:  # redis errors: the store is down or slow
            if cached is not None and self.fail_open:
                return cached[0]  # a key verified before; the limiter applies the fail mode
            log.error("key store unavailable: %s", exc)
            raise LimiterUnavailable("The API key store is unavailable; please retry shortly.") from exc
        if record is None:
            self._cache.pop(digest, None)
        return record

    def forget(self, principal: Principal) -> None:
        """Drop a key revoked since it was cached."""
        for digest, (_, cached, _) in list(self._cache.items()):
            if cached is principal:
                del self._cache[digest]


def _secret(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    api_key = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"api-key":
            api_key = value.decode("latin-1").strip()
    return api_key


def _redact(secret: str) -> str:
    return f"{secret[:11]}...{secret[-4:]}" if len(secret) > 20 else "****"


# -- the ASGI middleware ------------------------------------------------------------------------


class AuthMiddleware:
    """On /v1/*: authenticate (401 here, before the body is parsed), put the principal in
    `scope["state"]`, and add the request's x-ratelimit-* headers (which the route's
    rate-limit decision leaves in `scope["state"]`) to whatever response goes out."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator) -> None:
        self.app = app
        self.auth = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        started = time.time_ns()
        try:
            state["principal"] = await self.auth.authenticate(scope["headers"])
            state["auth_span_ns"] = (started, time.time_ns())  # for the request's trace
        except AuthError as exc:
            await _send(send, _invalid_key(str(exc)))
            return
        except LimiterUnavailable as exc:
            await _send(send, _unavailable(exc))
            return

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = state.get("ratelimit_headers")
                if extra:
                    message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_limits)


async def _send(send: Send, response: JSONResponse) -> None:
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def _invalid_key(message: str) -> JSONResponse:
    return error_response(401, message, type="invalid_request_error", code="invalid_api_key")


def _unavailable(exc: LimiterUnavailable) -> JSONResponse:
    return error_response(
        503, str(exc), type="server_error", code="service_unavailable", headers={"Retry-After": str(math.ceil(exc.retry_after))}
    )


# -- admission, called by the routes ------------------------------------------------------------


async def admit(request: Request, body: ChatCompletionRequest | CompletionRequest | None) -> Ticket | NoTicket:
    """Check the model against the key, then take the request and its tokens from the
    limits. `body=None`: a request that generates nothing (model listing): a peek that
    reports the headers (and checks revocation) but takes nothing."""
    state = request.scope.get("state", {})
    principal: Principal | None = state.get("principal")
    if principal is None:
        return NO_TICKET
    if body is not None and not principal.may_use(body.model):
        raise ModelForbidden(body.model)
    if not principal.buckets and principal.record_key is None:
        return NO_TICKET
    prompt_estimate, tokens = 0, 0
    if body is not None:
        prompt_estimate = await _prompt_estimate(request)
        tokens = prompt_estimate + (body.output_limit() or request.app.state.config.limits.assumed_max_tokens)
    limiter: Limiter = request.app.state.limiter
    try:
        ticket = await limiter.acquire(principal.buckets, tokens, prompt_estimate, principal.record_key, peek=body is None)
    except RateLimited as exc:
        state["ratelimit_headers"] = exc.headers
        raise
    except KeyRevoked:
        request.app.state.authenticator.forget(principal)
        raise AuthError("This API key has been revoked.") from None
    if ticket is None:
        return NO_TICKET
    state["ratelimit_headers"] = ticket.headers
    return ticket


async def _prompt_estimate(request: Request) -> int:
    """Prompt tokens, estimated as body bytes / 4: no tokenizer on the request path (a
    tokenizer pass costs more than the whole limiter); reconciliation corrects it."""
    length = request.headers.get("content-length")
    size = int(length) if length and length.isdigit() else len(await request.body())
    return (size + 3) // 4


def install_auth_handlers(app: FastAPI) -> None:
    """Error bodies for admission failures: 401, 403, 429, 503."""

    @app.exception_handler(AuthError)
    async def _auth(_: Request, exc: AuthError) -> JSONResponse:
        return _invalid_key(str(exc))

    @app.exception_handler(ModelForbidden)
    async def _forbidden(_: Request, exc: ModelForbidden) -> JSONResponse:
        return error_response(
            403, f"This API key may not use the model '{exc}'.", param="model", code="model_not_allowed"
        )

    @app.exception_handler(RateLimited)
    async def _limited(_: Request, exc: RateLimited) -> JSONResponse:
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after))), "retry-after-ms": str(math.ceil(exc.retry_after * 1000))}
        return error_response(429, str(exc), type=exc.kind, code="rate_limit_exceeded", headers=headers)

    @app.exception_handler(LimiterUnavailable)
    async def _unavailable_handler(_: Request, exc: LimiterUnavailable) -> JSONResponse:
        return _unavailable(exc)
