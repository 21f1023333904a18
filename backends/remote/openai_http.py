"""`kind: remote`: any OpenAI-compatible server (a `turnout serve` node, vLLM, Ollama's /v1)
reached over HTTP with a keep-alive pool.

The client's body is forwarded as sent, with only `model` (and `stream` where it must
differ) rewritten, so fields this gateway does not model (tools, vendor extensions) reach the
upstream intact. Errors: an upstream 4xx is the client's fault and passes through with its
status and OpenAI error fields, except 401/403 (the gateway's own key was refused: a 502)
and 429 (the upstream throttles the gateway: a 503, like an upstream 503, Retry-After kept);
everything else (connect errors, other 5xx, unparsable answers, timeouts) is a 502
`UpstreamError` whose `failure` says what happened, for the retry and circuit policies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from opentelemetry import propagate
from pydantic import BaseModel, ValidationError

from backends.protocol import (
    BackendError,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    InvalidRequest,
    LoadReport,
    ModelCard,
    Overloaded,
    UpstreamError,
)

log = logging.getLogger("turnout.remote")

LOAD_HEADER = "endpoint-load-metrics"
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class RemoteFailure(UpstreamError):
    """A 502: the upstream could not give an answer. `failure` is one of
    connect | timeout | server | protocol (see policies.retry.classify)."""

    def __init__(self, message: str, *, failure: str, upstream_status: int | None = None) -> None:
        super().__init__(message)
        self.failure = failure
        self.upstream_status = upstream_status


class UpstreamClientError(InvalidRequest):
    """An upstream 4xx passed through: the same status and OpenAI error fields."""

    def __init__(
        self, status: int, message: str, *, type: str | None, code: str | None, param: str | None
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.status = status
        self.type = type or _TYPE_BY_STATUS.get(status, "invalid_request_error")


class UpstreamOverloaded(Overloaded):
    """The upstream answered 503: it is shedding load. Kept a 503 with its Retry-After."""


def _base_url(url: str) -> str:
    """The OpenAI base URL: `http://host:port` gets `/v1`; a URL with a path is kept."""
    url = url.rstrip("/")
    return url if urlsplit(url).path not in ("", "/") else url + "/v1"


async def _before(deadline: float, work: Awaitable[T]) -> T:
    """Await `work`, raising TimeoutError at loop time `deadline`."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout_at(deadline):
            return await work
    return await asyncio.wait_for(work, max(0.0, deadline - asyncio.get_running_loop().time()))  # pragma: no cover


class RemoteBackend:
    """A Backend whose tokens come from an OpenAI-compatible server."""

    def __init__(
        self,
        name: str,
        model: str,
        *,
        url: str,
        model_id: str | None = None,
        api_key_env: str | None = None,
        connect_timeout_s: float = 5,
        first_token_timeout_s: float = 60,
        total_timeout_s: float = 600,
        max_connections: int = 100,
    ) -> None:
        """`model` is the upstream's model name; `model_id` the id clients use (default:
        `model`). The API key is read from the environment variable `api_key_env` now, so a
        missing secret fails the config load, not the first request."""
        self.name = name
        self.model = model
        self.model_id = model_id or model
        self.base_url = _base_url(url)
        self.api_key: str | None = None
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise ValueError(f"backend {name!r}: environment variable {api_key_env} (api_key_env) is not set")
        self.connect_timeout_s = connect_timeout_s
        self.first_token_timeout_s = first_token_timeout_s
        self.total_timeout_s = total_timeout_s
        self.max_connections = max_connections
        self._http: httpx.AsyncClient | None = None
        self._in_flight = 0
        self._last_load: LoadReport | None = None
        # Called with each load report an upstream piggybacks on a response (the gateway's
        # load tracker subscribes here).
        self.on_load_report: Callable[[LoadReport], None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the connection pool (connections are made on first use)."""
        self._client()

    async def close(self) -> None:
        """Close the pool; streams still open are cut."""
        if self._http is not None:
            http, self._http = self._http, None
            await http.aclose()

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            headers = {"accept": "application/json"}
            if self.api_key:
                headers["authorization"] = f"Bearer {self.api_key}"
            self._http = httpx.AsyncClient(
                base_url=self.base_url,
                headers=headers,
                # Reads are bounded by our own first-token / total deadlines (below); httpx's
                # read timeout is only a backstop.
                timeout=httpx.Timeout(
                    connect=self.connect_timeout_s,
                    read=self.total_timeout_s,
                    write=self.total_timeout_s,
                    pool=self.first_token_timeout_s,
                ),
                limits=httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections),
                follow_redirects=False,
            )
        return self._http

    # -- what routers read ---------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests this client has open to the upstream (for least_load's ReplicaState)."""
        return self._in_flight

    def models(self) -> list[ModelCard]:
        return [ModelCard(id=self.model_id)]

    def load(self) -> LoadReport:
        """The upstream's last `endpoint-load-metrics` report (its timestamp says when we got
        it); before any, one built from our own in-flight count. Connect failures do not
        mark it unhealthy: the gateway's circuit breaker ejects it and later probes it."""
        if self._last_load is None:
            return LoadReport(running=self._in_flight, max_running=self.max_connections)
        return self._last_load

    # -- the Backend protocol ------------------------------------------------------------------

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion:
        data = await self._post("/chat/completions", self._body(request, stream=False))
        return self._parse(ChatCompletion, data, request.model)

    def chat_stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        body = self._body(request, stream=True)
        return self._stream("/chat/completions", body, lambda d: self._parse(ChatCompletionChunk, d, request.model))

    async def completion(self, request: CompletionRequest) -> Completion:
        data = await self._post("/completions", self._body(request, stream=False))
        return self._parse(Completion, data, request.model)

    def completion_stream(self, request: CompletionRequest) -> AsyncIterator[Completion]:
        body = self._body(request, stream=True)
        return self._stream("/completions", body, lambda d: self._parse(Completion, d, request.model))

    # -- internals -----------------------------------------------------------------------------

    def _body(self, request: ChatCompletionRequest | CompletionRequest, *, stream: bool) -> bytes:
        """The body to forward: the client's own JSON with `model` rewritten."""
        data: Any = None
        raw = request._raw_body
        if raw is not None:
            try:
                data = json.loads(raw)
            except ValueError:
                data = None  # the gateway validated it, so this is not expected; fall back
        if not isinstance(data, dict):
            data = request.model_dump(mode="json", exclude_unset=True)
        data["model"] = self.model
        if bool(data.get("stream")) != stream:
            data["stream"] = stream
            if not stream:
                data.pop("stream_options", None)  # OpenAI rejects it without stream
        if stream and request.wants_usage_chunk():
            # The gateway turns usage on in the parsed request to reconcile token limits
            # (gateway.ratelimit's usage_for); the raw body does not know that.
            options = data.get("stream_options")
            if not isinstance(options, dict) or not options.get("include_usage"):
                data["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()

    def _headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        # W3C traceparent of the caller's current span (nothing when tracing is off), so the
        # node's spans join the gateway's trace.
        propagate.inject(headers)
        return headers

    def _parse(self, cls: type[M], data: Any, model: str) -> M:
        try:
            item = cls.model_validate(data)
        except ValidationError as exc:
            raise RemoteFailure(
                f"upstream {self.name!r} sent a {cls.__name__} that does not validate: {exc.errors()[0]['msg']}",
                failure="protocol",
            ) from exc
        # Clients see the id they asked for, as with in-process backends.
        item.model = model  # type: ignore[attr-defined]
        return item

    def _note_response(self, response: httpx.Response) -> None:
        header = response.headers.get(LOAD_HEADER)
        if header:
            try:
                self._last_load = LoadReport.from_header(header)
                if self.on_load_report is not None:
                    self.on_load_report(self._last_load)
            except (ValueError, TypeError):
                log.warning("backend %s: unparsable %s header %r", self.name, LOAD_HEADER, header)

    def _transport_error(self, exc: BaseException, phase: str) -> RemoteFailure:
        """Map an httpx / timeout exception to a 502 with its failure kind."""
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            log.warning("backend %s: cannot connect to %s: %s", self.name, self.base_url, exc)
            return RemoteFailure(f"could not connect to upstream {self.name!r}", failure="connect")
        if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
            return RemoteFailure(f"upstream {self.name!r} timed out ({phase})", failure="timeout")
        return RemoteFailure(f"upstream {self.name!r} failed ({phase}): {type(exc).__name__}", failure="server")

    def _status_error(self, response: httpx.Response) -> BackendError:
        """The error for an upstream answer with status >= 400."""
        status = response.status_code
        message, type_, code, param = _error_fields(response)
        if status in (429, 503):
            # 503: the node sheds load. 429: it throttles *this gateway's* key. Either way the
            # system, not the caller, is saturated: DESIGN.md keeps 429 for a caller over its
            # own limit. A 503 with the upstream's Retry-After, retryable elsewhere.
            retry_after = _retry_after(response.headers.get("retry-after"))
            return UpstreamOverloaded(message or f"upstream {self.name!r} is overloaded", retry_after=retry_after)
        if status in (401, 403):
            # The gateway's own credentials were refused: passing 401 on would tell the client
            # its key is wrong. A misconfigured backend is a server-side failure.
            log.error("backend %s: upstream refused our credentials (%s): %s", self.name, status, message)
            return RemoteFailure(
                f"upstream {self.name!r} refused the gateway's credentials", failure="server", upstream_status=status
            )
        if 400 <= status < 500:
            return UpstreamClientError(status, message or f"upstream answered {status}", type=type_, code=code, param=param)
        return RemoteFailure(
            f"upstream {self.name!r} answered {status}" + (f": {message}" if message else ""),
            failure="server",
            upstream_status=status,
        )

    async def _post(self, path: str, body: bytes) -> Any:
        """POST and return the parsed JSON answer (non-streamed): one total deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total_timeout_s
        self._in_flight += 1
        try:
            try:
                response = await _before(deadline, self._client().post(path, content=body, headers=self._headers()))
            except (httpx.HTTPError, TimeoutError) as exc:
                raise self._transport_error(exc, "total") from exc
            self._note_response(response)
            if response.status_code >= 400:
                raise self._status_error(response)
            try:
                return response.json()
            except ValueError as exc:
                raise RemoteFailure(f"upstream {self.name!r} sent a body that is not JSON", failure="protocol") from exc
        finally:
            self._in_flight -= 1

    async def _stream(self, path: str, body: bytes, parse: Callable[[Any], M]) -> AsyncIterator[M]:
        """POST with stream=true and yield each SSE `data:` event parsed, until [DONE].

        The first event must arrive within first_token_timeout_s, the whole stream within
        total_timeout_s. Closing this iterator early closes the upstream response, so the
        upstream sees the disconnect and stops generating.
        """
        client = self._client()
        loop = asyncio.get_running_loop()
        start = loop.time()
        total_deadline = start + self.total_timeout_s
        first_deadline = min(start + self.first_token_timeout_s, total_deadline)
        self._in_flight += 1
        try:
            request = client.build_request("POST", path, content=body, headers={**self._headers(), "accept": "text/event-stream"})
            try:
                response = await _before(first_deadline, client.send(request, stream=True))
            except (httpx.HTTPError, TimeoutError) as exc:
                raise self._transport_error(exc, "first token") from exc
            try:
                self._note_response(response)
                if response.status_code >= 400:
                    try:
                        await _before(first_deadline, response.aread())
                    except (httpx.HTTPError, TimeoutError) as exc:
                        raise self._transport_error(exc, "error body") from exc
                    raise self._status_error(response)
                lines = response.aiter_lines()
                got_first = False
                while True:
                    try:
                        line = await _before(total_deadline if got_first else first_deadline, anext(lines))
                    except StopAsyncIteration:
                        raise RemoteFailure(
                            f"upstream {self.name!r} ended the stream without [DONE]", failure="server"
                        ) from None
                    except (httpx.HTTPError, TimeoutError) as exc:
                        raise self._transport_error(exc, "total" if got_first else "first token") from exc
                    # SSE: only `data:` lines carry events; comments (": ping"), `event:`, `id:`
                    # and the blank separators are skipped.
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].removeprefix(" ")
                    if data.strip() == "[DONE]":
                        return
                    try:
                        obj = json.loads(data)
                    except ValueError as exc:
                        raise RemoteFailure(f"upstream {self.name!r} sent an event that is not JSON", failure="protocol") from exc
                    if isinstance(obj, dict) and "error" in obj and "choices" not in obj:
                        # An in-band error (bytes were already sent upstream-side).
                        err = obj["error"]
                        message = err.get("message") if isinstance(err, dict) else str(err)
                        raise RemoteFailure(f"upstream {self.name!r} failed mid-stream: {message}", failure="server")
                    got_first = True
                    yield parse(obj)
            finally:
                # Not read to the end: httpx closes the connection instead of pooling it,
                # which is what tells the upstream to cancel.
                await response.aclose()
        finally:
            self._in_flight -= 1


def _error_fields(response: httpx.Response) -> tuple[str, str | None, str | None, str | None]:
    """(message, type, code, param) of an error answer: OpenAI's body, `{"error": "text"}`
    (Ollama and others), or the text itself."""
    try:
        payload = response.json()
    except ValueError:
        payload = None
    err = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(err, dict):
        code = err.get("code")
        return (
            str(err.get("message") or ""),
            err.get("type") if isinstance(err.get("type"), str) else None,
            str(code) if code is not None else None,
            err.get("param") if isinstance(err.get("param"), str) else None,
        )
    if isinstance(err, str):
        return err, None, None, None
    if isinstance(payload, dict) and isinstance(payload.get("detail"), str):  # FastAPI-style
        return payload["detail"], None, None, None
    return response.text[:500].strip(), None, None, None


def _retry_after(value: str | None) -> float:
    """Retry-After in seconds (HTTP dates are rare from inference servers: default 1s)."""
    try:
        return max(0.0, float(value)) if value is not None else 1.0
    except ValueError:
        return 1.0

