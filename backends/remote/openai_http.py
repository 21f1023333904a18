"""`kind: remote`: any OpenAI-compatible server (a `turnout serve` node, vLLM, Ollama's /v1)
reached over HTTP with a keep-alive pool.

The client's body is forwarded as sent, with only `model` (and `stream` where it must
differ) rewritten, so fields this gateway does not model (tools, vendor extensions) reach the
upstream intact. Errors: an upstream 4xx is the client's fault and passes through with its
status and OpenAI error fields; the rest is backends/remote/upstream_errors.py's policy
(401/403 and 5xx: a 502 whose `failure` says what happened; 429/503: a 503 with Retry-After).

The transport is aiohttp: on the gateway's hot path it costs about a third of what httpx
(httpcore + anyio) costs per request (profiled with py-spy; docs/benchmarks.md, "Gateway
overhead").
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

import aiohttp
from opentelemetry import propagate
from pydantic import BaseModel, ValidationError

from backends.protocol import (
    BackendError,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    InvalidRequest,
    LoadReport,
    ModelCard,
    RawChunk,
    Usage,
    find_surrogate,
)
from backends.remote.upstream_errors import RemoteFailure, error_for_status

log = logging.getLogger("turnout.remote")

LOAD_HEADER = "endpoint-load-metrics"
MODELS_TIMEOUT_S = 3.0  # start() asks /v1/models for the context length; never longer than this
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

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
        self._http: aiohttp.ClientSession | None = None
        self._in_flight = 0
        self._last_load: LoadReport | None = None
        self._card = ModelCard(id=self.model_id)  # max_model_len once /v1/models said it
        # Called with each load report an upstream piggybacks on a response (the gateway's
        # load tracker subscribes here).
        self.on_load_report: Callable[[LoadReport], None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the connection pool and learn the model's context length from the
        upstream's /v1/models (`max_model_len`, as vLLM and turnout report it): the default
        ceiling of a route's max_tokens. An upstream that does not say, or does not answer
        within MODELS_TIMEOUT_S, leaves it unknown; the backend starts anyway."""
        self._client()
        length = await self._fetch_max_model_len()
        if length is not None:
            self._card = ModelCard(id=self.model_id, max_model_len=length)

    async def _fetch_max_model_len(self) -> int | None:
        try:
            async with asyncio.timeout(min(MODELS_TIMEOUT_S, self.connect_timeout_s + 1.0)):
                async with self._client().get(self.base_url + "/models") as response:
                    if response.status != 200:
                        return None
                    data = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.info("backend %s: no context length from %s/models (%s)", self.name, self.base_url, type(exc).__name__)
            return None
        return _max_model_len(data, self.model)

    async def close(self) -> None:
        """Close the pool; streams still open are cut."""
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            headers = {"accept": "application/json"}
            if self.api_key:
                headers["authorization"] = f"Bearer {self.api_key}"
            connector = aiohttp.TCPConnector(
                limit=self.max_connections,
                limit_per_host=0,  # one upstream per client: `limit` is the pool
                keepalive_timeout=30,
                ttl_dns_cache=300,
            )
            self._http = aiohttp.ClientSession(
                headers=headers,
                connector=connector,
                # Reads are bounded by our own first-token / total deadlines (below); these
                # are backstops. `connect` includes waiting for a free pooled connection.
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=self.first_token_timeout_s,
                    sock_connect=self.connect_timeout_s,
                    sock_read=self.total_timeout_s,
                ),
                auto_decompress=True,
                raise_for_status=False,
                skip_auto_headers=("User-Agent",),
            )
        return self._http

    # -- what routers read ---------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests this client has open to the upstream (for least_load's ReplicaState)."""
        return self._in_flight

    def models(self) -> list[ModelCard]:
        return [self._card]

    def load(self) -> LoadReport:
        """The upstream's last `endpoint-load-metrics` report (its timestamp says when we got
        it); before any, one built from our own in-flight count. Connect failures do not
        mark it unhealthy: the gateway's circuit breaker ejects it and later probes it."""
        if self._last_load is None:
            return LoadReport(running=self._in_flight, max_running=self.max_connections)
        return self._last_load

    # -- the Backend protocol ------------------------------------------------------------------

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion:
        return await self.chat_raw(request, None)

    def chat_stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        body = self._body(request, None, stream=True)
        return self._stream("/chat/completions", body, lambda d, _: self._parse(ChatCompletionChunk, d, request.model))

    async def completion(self, request: CompletionRequest) -> Completion:
        return await self.completion_raw(request, None)

    def completion_stream(self, request: CompletionRequest) -> AsyncIterator[Completion]:
        body = self._body(request, None, stream=True)
        return self._stream("/completions", body, lambda d, _: self._parse(Completion, d, request.model))

    async def embeddings(self, request: EmbeddingRequest) -> EmbeddingResponse:
        """`POST {url}/embeddings` of `request` serialised (a dialect's translation)."""
        return await self.embeddings_raw(request, None)

    # -- Passthrough: the client's own body out, the upstream's own bytes back --------------------

    async def chat_raw(
        self, request: ChatCompletionRequest, body: bytes | None, *, first_byte_timeout_s: float | None = None
    ) -> ChatCompletion:
        data = await self._post("/chat/completions", self._body(request, body, stream=False), first_byte_timeout_s)
        return self._parse(ChatCompletion, data, request.model)

    async def completion_raw(
        self, request: CompletionRequest, body: bytes | None, *, first_byte_timeout_s: float | None = None
    ) -> Completion:
        data = await self._post("/completions", self._body(request, body, stream=False), first_byte_timeout_s)
        return self._parse(Completion, data, request.model)

    def chat_stream_raw(self, request: ChatCompletionRequest, body: bytes | None) -> AsyncIterator[RawChunk]:
        """`chat_stream` as the upstream's bytes (see RawChunk): the gateway's SSE path."""
        forwarded = self._body(request, body, stream=True)
        return self._stream("/chat/completions", forwarded, self._raw_parser(ChatCompletionChunk, request.model))

    def completion_stream_raw(self, request: CompletionRequest, body: bytes | None) -> AsyncIterator[RawChunk]:
        forwarded = self._body(request, body, stream=True)
        return self._stream("/completions", forwarded, self._raw_parser(Completion, request.model))

    async def embeddings_raw(
        self, request: EmbeddingRequest, body: bytes | None, *, first_byte_timeout_s: float | None = None
    ) -> EmbeddingResponse:
        """`POST {url}/embeddings`: the client's body (`body`; without it, `request`
        serialised) with `model` rewritten; errors and timeouts as for a non-streamed chat."""
        data = await self._post("/embeddings", self._body(request, body, stream=None), first_byte_timeout_s)
        return self._parse(EmbeddingResponse, data, request.model)

    # -- internals -----------------------------------------------------------------------------

    def _body(
        self, request: ChatCompletionRequest | CompletionRequest | EmbeddingRequest, raw: bytes | None, *, stream: bool | None
    ) -> bytes:
        """The body to forward: the client's own JSON (`raw`; without it, `request`
        serialised) with `model` rewritten. `stream` None: a request that never streams
        (embeddings), whose body is left as it is but for `model`."""
        data: Any = None
        if raw is not None:
            try:
                data = json.loads(raw)
            except ValueError:
                data = None  # the gateway validated it, so this is not expected; fall back
        if not isinstance(data, dict):
            data = request.model_dump(mode="json", exclude_unset=True)
        data["model"] = self.model
        if stream is not None and bool(data.get("stream")) != stream:
            data["stream"] = stream
            if not stream:
                data.pop("stream_options", None)  # OpenAI rejects it without stream
        if stream and not isinstance(request, EmbeddingRequest) and request.wants_usage_chunk():
            # The gateway turns usage on in the parsed request to reconcile token limits
            # (gateway.ratelimit's usage_for), and usage on every chunk where the route may
            # resume the stream (gateway.resume); the raw body does not know that.
            wanted = request.stream_options.model_dump(exclude_defaults=True)  # type: ignore[union-attr]
            options = data.get("stream_options")
            if not isinstance(options, dict) or any(options.get(k) != v for k, v in wanted.items()):
                data["stream_options"] = {**(options if isinstance(options, dict) else {}), **wanted}
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        try:
            return text.encode()
        except UnicodeEncodeError:
            # A lone surrogate in a field the request models do not declare (they reject
            # one in theirs): the client's error, found where it is, and nothing is sent.
            where = find_surrogate(data) or "body"
            raise InvalidRequest(f"Invalid value for '{where}': must be valid Unicode text: it contains a lone surrogate", param=where) from None

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

    def _raw_parser(self, cls: type[BaseModel], model: str) -> Callable[[Any, bytes], RawChunk]:
        """Turns each event into a RawChunk: the first is validated as `cls` (a malformed
        upstream fails before the first byte, where it can still be retried); the rest are
        forwarded with `model` rewritten in place where the upstream wrote it plainly."""
        upstream = json.dumps(self.model, ensure_ascii=False).encode()
        wanted = json.dumps(model, ensure_ascii=False).encode()
        patterns = [(b'"model":' + upstream, b'"model":' + wanted), (b'"model": ' + upstream, b'"model": ' + wanted)]
        first = True

        def parse(obj: Any, data: bytes) -> RawChunk:
            nonlocal first
            if first:
                self._parse(cls, obj, model)  # raises RemoteFailure(protocol) when it is not one
                first = False
            if not isinstance(obj, dict):
                raise RemoteFailure(f"upstream {self.name!r} sent an event that is not an object", failure="protocol")
            if obj.get("model") != model:
                for old, new in patterns:
                    if old in data:
                        data = data.replace(old, new, 1)
                        break
                else:  # written some other way (or missing): rewrite the whole event
                    obj["model"] = model
                    data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
            choices = obj.get("choices")
            usage = obj.get("usage")
            text, calls = None, None
            if choices and isinstance(choices, list) and isinstance(choices[0], dict):
                delta = choices[0].get("delta")
                if isinstance(delta, dict):
                    text, calls = delta.get("content"), delta.get("tool_calls")
                else:
                    text = choices[0].get("text")
            return RawChunk(
                data,
                usage=Usage.model_validate(usage) if isinstance(usage, dict) and usage else None,
                has_choices=bool(choices),
                has_text=bool(text or calls),
                text=text if isinstance(text, str) else "",
            )

        return parse

    def _note_response(self, response: aiohttp.ClientResponse) -> None:
        header = response.headers.get(LOAD_HEADER)
        if header:
            try:
                self._last_load = LoadReport.from_header(header)
                if self.on_load_report is not None:
                    self.on_load_report(self._last_load)
            except (ValueError, TypeError):
                log.warning("backend %s: unparsable %s header %r", self.name, LOAD_HEADER, header)

    def _transport_error(self, exc: BaseException, phase: str) -> RemoteFailure:
        """Map an aiohttp / timeout exception to a 502 with its failure kind."""
        if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
            log.warning("backend %s: cannot connect to %s: %s", self.name, self.base_url, exc)
            return RemoteFailure(f"could not connect to upstream {self.name!r}", failure="connect")
        if isinstance(exc, TimeoutError):
            return RemoteFailure(f"upstream {self.name!r} timed out ({phase})", failure="timeout")
        return RemoteFailure(f"upstream {self.name!r} failed ({phase}): {type(exc).__name__}", failure="server")

    def _status_error(self, response: aiohttp.ClientResponse, payload: bytes) -> BackendError:
        """The error for an upstream answer with status >= 400 (`payload`: its body)."""
        message, type_, code, param = _error_fields(payload)
        retry_after = _retry_after(response.headers.get("retry-after"))
        return error_for_status(
            f"upstream {self.name!r}", response.status, message, type=type_, code=code, param=param, retry_after=retry_after
        )

    async def _post(self, path: str, body: bytes, first_byte_timeout_s: float | None = None) -> Any:
        """POST and return the parsed JSON answer (non-streamed). The answer's start (its
        response headers) must come within `first_byte_timeout_s` where given (the route's
        first-token deadline: an upstream that accepts and never answers fails there, not at
        the total), the whole answer within total_timeout_s."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        total_deadline = start + self.total_timeout_s
        first_deadline = total_deadline if first_byte_timeout_s is None else min(start + first_byte_timeout_s, total_deadline)
        self._in_flight += 1
        try:
            status, payload = await self._post_read(path, body, first_deadline, total_deadline)
            if isinstance(status, BackendError):
                raise status
            try:
                return json.loads(payload)
            except ValueError as exc:
                raise RemoteFailure(f"upstream {self.name!r} sent a body that is not JSON", failure="protocol") from exc
        finally:
            self._in_flight -= 1

    async def _post_read(self, path: str, body: bytes, first_deadline: float, total_deadline: float) -> tuple[int | BackendError, bytes]:
        """One POST read to the end: (status, or the error for a status >= 400; the body).
        Its headers by `first_deadline`, its body by `total_deadline` (loop times).
        Cancelling it (the client left) closes the connection, so the upstream stops."""
        phase = "first byte" if first_deadline < total_deadline else "total"
        try:
            response = await _before(first_deadline, self._client().post(self.base_url + path, data=body, headers=self._headers()))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._transport_error(exc, phase) from exc
        try:  # release() closes a connection whose body was not read to the end
            self._note_response(response)
            try:
                payload = await _before(total_deadline, response.read())
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise self._transport_error(exc, "total") from exc
        finally:
            response.release()
        if response.status >= 400:
            return self._status_error(response, payload), payload
        return response.status, payload

    async def _stream(self, path: str, body: bytes, parse: Callable[[Any, bytes], T]) -> AsyncIterator[T]:
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
            headers = {**self._headers(), "accept": "text/event-stream"}
            try:
                response = await _before(first_deadline, client.post(self.base_url + path, data=body, headers=headers))
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise self._transport_error(exc, "first token") from exc
            finished = False
            try:
                self._note_response(response)
                if response.status >= 400:
                    try:
                        payload = await _before(first_deadline, response.read())
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        raise self._transport_error(exc, "error body") from exc
                    finished = True
                    raise self._status_error(response, payload)
                got_first = False
                # One deadline per socket read, not per event: the first token's until the
                # first event, then the total's.
                lines = _sse_data(response.content, lambda: total_deadline if got_first else first_deadline)
                while True:
                    try:
                        data = await anext(lines)
                    except StopAsyncIteration:
                        raise RemoteFailure(
                            f"upstream {self.name!r} ended the stream without [DONE]", failure="server"
                        ) from None
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        raise self._transport_error(exc, "total" if got_first else "first token") from exc
                    if data == b"[DONE]":
                        # Read the (empty) rest, so the connection goes back to the pool.
                        finished = await _drained(response, min(total_deadline, loop.time() + 1.0))
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
                    yield parse(obj, data)
            finally:
                # Not read to the end: close the connection instead of pooling it, which is
                # what tells the upstream to cancel.
                if finished:
                    response.release()
                else:
                    response.close()
        finally:
            self._in_flight -= 1


async def _sse_data(content: aiohttp.StreamReader, deadline: Callable[[], float]) -> AsyncIterator[bytes]:
    """The `data:` payloads of an SSE body, however its bytes were chunked; comments
    (": ping"), `event:`/`id:` lines and blank separators are skipped. No line-length limit,
    unlike StreamReader.readline (an event can be large: logprobs). Each read must finish by
    `deadline()` (loop time), else TimeoutError."""
    buffer = b""
    while True:
        async with asyncio.timeout_at(deadline()):
            chunk = await content.readany()
        if not chunk:
            break
        buffer = buffer + chunk if buffer else chunk
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = buffer[start:end]
            start = end + 1
            if line.startswith(b"data:"):
                yield line[5:].strip()
        buffer = buffer[start:]
    if buffer.startswith(b"data:"):
        yield buffer[5:].strip()


async def _drained(response: aiohttp.ClientResponse, deadline: float) -> bool:
    """Read what follows [DONE] (nothing, then the end of the body) within `deadline`:
    True when the body ended, so the connection may be reused."""
    try:
        async with asyncio.timeout_at(deadline):
            while await response.content.readany():
                pass
    except (aiohttp.ClientError, TimeoutError):
        return False
    return True


def _max_model_len(data: Any, model: str) -> int | None:
    """`max_model_len` of `model` in a /v1/models answer (the only entry's, when no id
    matches: a one-model server may list it under another name), else None."""
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return None
    cards = [e for e in entries if isinstance(e, dict)]
    card = next((e for e in cards if e.get("id") == model), cards[0] if len(cards) == 1 else None)
    length = card.get("max_model_len") if card is not None else None
    return length if isinstance(length, int) and not isinstance(length, bool) and length > 0 else None


def _error_fields(payload: bytes) -> tuple[str, str | None, str | None, str | None]:
    """(message, type, code, param) of an error answer's body: OpenAI's, `{"error": "text"}`
    (Ollama and others), or the text itself."""
    try:
        data = json.loads(payload)
    except ValueError:
        data = None
    err = data.get("error") if isinstance(data, dict) else None
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
    if isinstance(data, dict) and isinstance(data.get("detail"), str):  # FastAPI-style
        return data["detail"], None, None, None
    return payload.decode("utf-8", "replace")[:500].strip(), None, None, None


def _retry_after(value: str | None) -> float:
    """Retry-After in seconds (HTTP dates are rare from inference servers: default 1s)."""
    try:
        return max(0.0, float(value)) if value is not None else 1.0
    except ValueError:
        return 1.0

