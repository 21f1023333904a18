"""ASGI middleware on every request: a request id, the client's address, and a cap on the
request body's size."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.client_address import NO_PROXIES, TrustedProxies, client_address, forwarded_for
from gateway.errors import dialect_of, error_response
from gateway.fastpath import route_path

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def _no_proxies() -> Sequence[str]:
    return ()


class RequestContextMiddleware:
    """Sets `scope["state"]["request_id"]` (the client's X-Request-Id when sane, else a new
    one), echoes it on every response, and refuses bodies over `max_body_bytes()` (the
    current policy's `server.max_body_bytes`) with 413.

    Sets `scope["state"]["client_ip"]`: the socket peer, or, when the peer is one of
    `trusted_proxies()` (the current policy's `server.trusted_proxies`), the client that
    X-Forwarded-For names (gateway.client_address). Decided here, once, so that every sink
    records the same address. `scope["client"]` stays the peer.

    The body is read up front, bounded, and replayed: a chunked upload cannot slip past the
    limit, and what follows the body (a disconnect) still reaches the app.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: Callable[[], int],
        trusted_proxies: Callable[[], Sequence[str]] = _no_proxies,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.trusted_proxies = trusted_proxies
        self._proxy_entries: Sequence[str] = ()
        self._proxies: TrustedProxies = NO_PROXIES

    def _trusted(self) -> TrustedProxies:
        """The parsed networks of the current policy, parsed again only when a reload brought
        a new list (the list object is kept, so identity cannot be reused by another)."""
        entries = self.trusted_proxies()
        if entries is not self._proxy_entries:
            self._proxies = TrustedProxies(entries) if entries else NO_PROXIES
            self._proxy_entries = entries
        return self._proxies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        peer = scope["client"][0] if scope.get("client") else None
        proxies = self._trusted()
        # The headers are scanned only for a trusted peer: the common case (no proxies, or a
        # direct caller) costs one lookup.
        xff = forwarded_for(scope["headers"]) if peer is not None and proxies and proxies.trusts_peer(peer) else ""
        state["client_ip"] = client_address(peer, xff, proxies)
        id_header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), id_header]
            await send(message)

        limit = self.max_body_bytes()
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._too_large(limit, scope, receive, send_with_id)
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send_with_id)
            return

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await self._too_large(limit, scope, receive, send_with_id)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send_with_id)

    async def _too_large(self, limit: int, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"Request body too large: the limit is {limit} bytes."
        response = error_response(413, message, code="request_too_large", dialect=dialect_of(route_path(scope)))
        await response(scope, receive, send)
