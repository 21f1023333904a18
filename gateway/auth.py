"""Authentication on /v1/*, and the per-request admission that routes call (model
permission, then the rate-limit decision).

Authentication covers /v1/* and Ollama's /api/* (less /api/pull and /api/version: the
first takes the admin key, the second is public, as in Ollama). The key comes in
`Authorization: Bearer sk-turnout-...`, or as Azure-style clients send it,
`api-key: sk-turnout-...`, or as Anthropic's clients send it, `x-api-key: sk-turnout-...`. It is hashed and looked up in the key store:
- file store: a dict lookup after one stat() of the file (reloaded when it changes);
- Redis store: the record is cached for RECORD_TTL_S (its fields never change), but its
  `revoked` flag is read by the rate-limit script in the same round trip as the limit
  decision, on every request, so a revocation holds at the next request on every replica.

With `auth: none` (loopback only) every request is one anonymous principal, limited by
the `limits` defaults when they set any.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backends.protocol import APIError, ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from gateway.errors import api_error_response, dialect_of
from gateway.keys import FileKeyStore, KeyRecord, RedisKeyStore, hash_secret
from gateway.ratelimit import (
    NO_RESERVATION,
    Bucket,
    KeyRevoked,
    LimiterUnavailable,
    NoReservation,
    RateLimited,
    TokenReservation,
    buckets_for,
)
from policies.schema import Config, LimitSpec

if TYPE_CHECKING:
    from gateway.snapshot import Snapshot

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

    def check_model(self, model: str) -> None:
        """Raise ModelForbidden unless this key may use `model`."""
        if not self.may_use(model):
            raise ModelForbidden(model)


class AuthError(APIError):
    """401 invalid_api_key."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ModelForbidden(APIError):
    """403: the key may not use this model."""

    status = 403
    type = "permission_error"
    code = "model_not_allowed"

    def __init__(self, model: str) -> None:
        super().__init__(f"This API key may not use the model '{model}'.", param="model")


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

    @property
    def active(self) -> bool:
        """Whether there is anything to check: a key store, or limits on anonymous callers."""
        return self.store is not None or bool(self.anonymous.buckets)

    def _buckets(self, key_id: str, tenant: str, key: LimitSpec) -> tuple[Bucket, ...]:
        limits = self.config.limits
        prefix = self.config.redis.prefix if self.config.redis else ""
        tenant_spec = limits.tenants.get(tenant, limits.tenant)
        return buckets_for(prefix, key_id, tenant, key, tenant_spec, limits.burst_seconds)

    def principal(self, record: KeyRecord) -> Principal:
        """What a key may do: its tenant, models, priority and rate-limit buckets."""
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
                "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or in an x-api-key or api-key header."
            )
        digest = hash_secret(secret)
        record = await self._lookup(digest)
        if record is None or record.revoked:
            raise AuthError(f"Incorrect API key provided: {_redact(secret)}.")
        cached = self._cache.get(digest)
        if cached is not None and cached[0] is record:
            principal = cached[1]
        else:
            principal = self.principal(record)
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
        elif name in (b"api-key", b"x-api-key"):
            api_key = value.decode("latin-1").strip()
    return api_key


def _redact(secret: str) -> str:
    return f"{secret[:11]}...{secret[-4:]}" if len(secret) > 20 else "****"


# -- the ASGI middleware ------------------------------------------------------------------------

_UNAUTHENTICATED = ("/api/version", "/api/pull")  # public, and admin-key only (gateway.dialects.ollama)


def _authenticated_path(path: str) -> bool:
    return path.startswith("/v1/") or (path.startswith("/api/") and path not in _UNAUTHENTICATED)



class AuthMiddleware:
    """On /v1/*: hand the request the current policy snapshot (it keeps it to the end, even
    if a reload lands meanwhile); authenticate with that snapshot's authenticator (401 here,
    before the body is parsed), put the principal in `scope["state"]`, and add the request's
    x-ratelimit-* headers (which the rate-limit step leaves in `scope["state"]`) to whatever
    response goes out. Installed whatever the startup policy: a reload may turn auth on."""

    def __init__(self, app: ASGIApp, current: Callable[[], Snapshot]) -> None:
        self.app = app
        self.current = current

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _authenticated_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        snapshot = self.current()
        state = scope.setdefault("state", {})
        state["snapshot"] = snapshot
        if not snapshot.authenticator.active:
            await self.app(scope, receive, send)
            return
        started = time.time_ns()
        try:
            state["principal"] = await snapshot.authenticator.authenticate(scope["headers"])
            state["auth_span_ns"] = (started, time.time_ns())  # for the request's trace
        except (AuthError, LimiterUnavailable) as exc:
            await api_error_response(exc, dialect_of(scope["path"]))(scope, receive, send)
            return

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = state.get("ratelimit_headers")
                if extra:
                    message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_limits)


# -- the rate-limit step, called by the routes ---------------------------------------------------


async def rate_limit(
    request: Request, body: ChatCompletionRequest | CompletionRequest | EmbeddingRequest | None, prompt_estimate: int = 0
) -> TokenReservation | NoReservation:
    """Take the request and its tokens (`prompt_estimate` plus its output limit) from the
    caller's limits, in the request's policy snapshot. `body=None`: a request that generates
    nothing (model listing): a peek that reports the headers (and checks revocation) but
    takes nothing."""
    state = request.scope.get("state", {})
    principal: Principal | None = state.get("principal")
    if principal is None or (not principal.buckets and principal.record_key is None):
        return NO_RESERVATION
    snapshot: Snapshot = state["snapshot"]
    tokens = 0
    if body is not None:
        # Every choice generates up to the limit (an embedding's is 0: its input counts alone).
        limit = body.output_limit()
        tokens = prompt_estimate + (snapshot.config.limits.assumed_max_tokens if limit is None else limit) * body.choices()
    try:
        reservation = await snapshot.limiter.acquire(
            principal.buckets, tokens, prompt_estimate, principal.record_key, peek=body is None
        )
    except RateLimited as exc:
        state["ratelimit_headers"] = exc.headers
        raise
    except KeyRevoked:
        snapshot.authenticator.forget(principal)
        raise AuthError("This API key has been revoked.") from None
    if reservation is None:
        return NO_RESERVATION
    state["ratelimit_headers"] = reservation.headers
    return reservation
