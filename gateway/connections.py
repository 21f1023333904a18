"""The connection guard: a header read timeout and a cap on open connections, for uvicorn.

uvicorn alone keeps a connection that never finishes its request headers open for good (its
`timeout_keep_alive` runs only between requests, and is cancelled by the first byte), and
its `limit_concurrency` is not a connection cap: it counts connections plus tasks when a
request's headers are complete, so a full server refuses requests on connections it had
already taken, while idle connections past the limit are never refused at all. nginx in
front bounds both (client_header_timeout, worker_connections); this module does the same in
the gateway, so that it is safe without nginx:

- `header_timeout_s`: from the moment a connection opens, and again from the first byte of
  each further request on a keep-alive connection, its request headers must be complete
  within this many seconds, or the connection is closed (silently, as nginx does).
- `max_connections`: a connection accepted while this many are already admitted (in this
  worker process) is answered `503` with OpenAI's error body and `Retry-After: 1` once its
  headers arrive, then closed; while twice as many are open in all, a new one is closed at
  once, unanswered, so that refused connections cannot pile up either.

The guard is a mixin over uvicorn's own protocol classes (`HttpToolsProtocol`,
`H11Protocol`), handed to uvicorn as its `http=` option by `connection_protocol()`: a
`functools.partial` of a module-level class and the limits, so that it pickles into the
processes `--workers N` spawns.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools not installed: h11 only
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

from backends.protocol import error_body

log = logging.getLogger("turnout.connections")

REFUSAL_LOG_INTERVAL_S = 10.0  # at most one "refused" warning per interval (floods stay quiet)


@dataclass(frozen=True)
class ConnectionLimits:
    """`server.header_timeout_s` and `server.max_connections`, read at startup."""

    header_timeout_s: float
    max_connections: int


# Connections admitted under the cap, per uvicorn server (one per worker process).
_admitted: weakref.WeakKeyDictionary[ServerState, set[asyncio.Protocol]] = weakref.WeakKeyDictionary()
_last_refusal_log = [0.0, 0]  # monotonic time of the last warning; refusals since


def _log_refusal(limits: ConnectionLimits, open_now: int) -> None:
    now = time.monotonic()
    _last_refusal_log[1] += 1
    if now - _last_refusal_log[0] >= REFUSAL_LOG_INTERVAL_S:
        log.warning(
            "refused %d connection(s): %d open, server.max_connections is %d",
            _last_refusal_log[1], open_now, limits.max_connections,
        )  # fmt: skip
        _last_refusal_log[0], _last_refusal_log[1] = now, 0


_REFUSAL = json.dumps(
    error_body(
        "The server has too many open connections; please retry shortly.", "server_error", code="too_many_connections"
    )
).encode()


async def _refuse(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    """The ASGI app a connection over the cap gets instead of the gateway: one 503, then
    the connection closes (`connection: close`). No middleware runs, so it sets its own
    x-request-id (every response carries one)."""
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(_REFUSAL)).encode()),
                (b"retry-after", b"1"),
                (b"x-request-id", uuid.uuid4().hex.encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": _REFUSAL, "more_body": False})


class _Guard:
    """The mixin over a uvicorn HTTP protocol class (`HttpToolsProtocol`, `H11Protocol`):
    both keep `transport`, `loop`, `app`, `cycle` (the latest request's cycle) and
    `server_state`, and feed every byte through `data_received`, which is all it uses."""

    # What the uvicorn base class provides (declared for type checkers).
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    app: Any
    cycle: Any
    server_state: ServerState

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._header_timer: asyncio.TimerHandle | None = None
        self._admitted: set[asyncio.Protocol] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        admitted = _admitted.setdefault(self.server_state, set())
        if len(admitted) < self.limits.max_connections:
            admitted.add(self)  # type: ignore[arg-type]
            self._admitted = admitted
        else:
            open_now = len(self.server_state.connections)
            _log_refusal(self.limits, open_now)
            if open_now > 2 * self.limits.max_connections:
                transport.close()
                return
            self.app = _refuse  # read by the base class when this connection's headers complete
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        if self.transport.is_closing() or self._request_in_flight():
            self._disarm()  # headers complete (or the connection is done): the deadline is met
        elif self._header_timer is None:
            self._arm()  # the first byte of a further request on a kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._admitted is not None:
            self._admitted.discard(self)  # type: ignore[arg-type]
            self._admitted = None
        super().connection_lost(exc)  # type: ignore[misc]

    # -- the header timer ---------------------------------------------------------------------

    def _request_in_flight(self) -> bool:
        """Whether a request's headers are complete and its response is not yet done."""
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return  # closed meanwhile, or upgraded to another protocol (a WebSocket)
        if self._request_in_flight():
            return  # bytes of a pipelined request while one is answered: not a stalled header
        self.transport.close()


class GuardedH11Protocol(_Guard, H11Protocol):
    """uvicorn's h11 protocol with the header timeout and the connection cap."""


if HttpToolsProtocol is not None:

    class GuardedHttpToolsProtocol(_Guard, HttpToolsProtocol):
        """uvicorn's httptools protocol with the header timeout and the connection cap."""


def connection_protocol(limits: ConnectionLimits, *, parser: str = "httptools") -> Callable[..., asyncio.Protocol]:
    """uvicorn's `http=` option: the guarded protocol over `parser` (httptools, a dependency
    through uvicorn[standard]; h11 where httptools is not installed)."""
    if parser == "httptools" and HttpToolsProtocol is not None:
        return functools.partial(GuardedHttpToolsProtocol, limits=limits)
    return functools.partial(GuardedH11Protocol, limits=limits)
