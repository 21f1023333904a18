"""One generation request, end to end (DESIGN.md, "A request's path"): rate limit ->
experiment assignment -> pick a backend and call it (retries and fallbacks before the first
byte) -> stream or answer -> record usage, metrics, span and experiment sample.

Authentication ran before this, in `gateway.auth.AuthMiddleware`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Literal, TypeVar

from fastapi import Request, Response
from opentelemetry import trace
from starlette.background import BackgroundTask

from backends.protocol import Backend, BackendError, ChatCompletionRequest, CompletionRequest, RawChunk, StreamOptions
from gateway.auth import AuthError, ModelForbidden, admit
from gateway.dispatch import Dispatcher, Lease, Route, first_item, until_deadline
from gateway.outcome import RequestOutcome
from gateway.ratelimit import NO_TICKET, LimiterUnavailable, NoTicket, RateLimited, Ticket
from gateway.runtime import GatewayRuntime
from gateway.sse import stream_response
from gateway.tracing import Tracing, trace_id_of
from policies.experiments import Experiment, Variant, unit_hash
from policies.routing import RequestFeatures, chat_prefix_text, prefix_block_hashes

T = TypeVar("T")

Kind = Literal["chat", "completions"]
Body = ChatCompletionRequest | CompletionRequest

# How often a non-streamed request checks whether its client is still there.
DISCONNECT_POLL_S = 0.25
MAX_SHADOW_IN_FLIGHT = 16  # beyond this, shadow copies are skipped rather than queued


async def generate(kind: Kind, body: Body, request: Request) -> Response:
    """Serve one chat or text completion."""
    runtime: GatewayRuntime = request.app.state.runtime
    dispatcher = runtime.dispatcher  # this request keeps this policy even if a reload lands
    state = request.scope["state"]
    principal = state.get("principal")
    outcome = RequestOutcome(
        request_id=state["request_id"],
        route=kind,
        model=body.model,
        stream=bool(body.stream),
        key_name=principal.key_id if principal else None,
        tenant=principal.tenant if principal else None,
        client_ip=request.client.host if request.client else None,
    )
    if runtime.config.server.log_prompts:
        outcome.prompt = body.model_dump_json(include={"messages", "prompt"})
    tracing = runtime.tracing
    span = _request_span(tracing, kind, body, request) if tracing.enabled else None
    outcome.trace_id = trace_id_of(span)
    handed_to_stream = False
    record_after_send = False
    ticket: Ticket | NoTicket = NO_TICKET
    try:
        with tracing.span("turnout.rate_limit", span):
            ticket = await admit(request, body)
        pool, headers = _assign_variant(runtime, dispatcher, body, request, outcome, principal)
        features = _features(dispatcher, body, principal)
        if body.stream:
            strip_usage = not body.wants_usage_chunk()
            body.stream_options = StreamOptions(include_usage=True)  # usage for limits and metrics
            lease, (stream, backend_span) = await dispatcher.call(
                body.model, lambda b, r: _open_stream(kind, b, r, body, tracing, span), features, pool, tracing, span
            )
            outcome.backend = lease.name
            deadline = asyncio.get_running_loop().time() + dispatcher.route(body.model).config.timeouts.total_s
            first, rest = stream
            events = _observed(until_deadline(first, rest, deadline), strip_usage, outcome)
            headers["endpoint-load-metrics"] = lease.backend.load().to_header()
            finish = _finisher(runtime, outcome, ticket, lease, span, backend_span)
            handed_to_stream = True
            return await stream_response(_finally(events, finish), headers=headers)
        lease, (result, backend_span) = await dispatcher.call(
            body.model, lambda b, r: _answer(kind, b, r, body, tracing, span), features, pool, tracing, span
        )
        outcome.backend = lease.name
        try:
            usage = result.usage
            if usage is not None:
                outcome.prompt_tokens, outcome.completion_tokens = usage.prompt_tokens, usage.completion_tokens
            outcome.first_token_at = time.perf_counter()  # a whole answer arrives at once
            headers["endpoint-load-metrics"] = lease.backend.load().to_header()
            ticket.settle(usage.total_tokens if usage is not None else None)
        finally:
            lease.release()
            _end(backend_span)
        # Metrics and the access line once the answer is on its way (Starlette runs a
        # response's background after its last byte is sent, before the request ends): the
        # client does not wait for them. The outcome is finished below, as on every path.
        record_after_send = True
        return Response(
            result.model_dump_json(), media_type="application/json", headers=headers, background=BackgroundTask(_record, runtime, outcome)
        )
    except BaseException as exc:
        outcome.status, outcome.error_code = _status_of(exc)
        if not handed_to_stream:
            ticket.settle(0)  # nothing was generated: give the reservation back (once; a settled one stays)
        Tracing.fail(span, str(exc))
        raise
    finally:
        if not handed_to_stream:
            outcome.finish()
            if not record_after_send:
                runtime.record(outcome)
            _end(span, outcome)


async def _record(runtime: GatewayRuntime, outcome: RequestOutcome) -> None:
    """`runtime.record` as a response's background: a coroutine, so Starlette runs it on the
    event loop (a plain function would go to its thread pool)."""
    runtime.record(outcome)


# -- steps -------------------------------------------------------------------------------------


def _request_span(tracing: Tracing, kind: Kind, body: Body, request: Request) -> Any:
    """The request's root span, continuing the caller's W3C trace; GenAI semantic names."""
    operation = "chat" if kind == "chat" else "text_completion"
    attributes = {
        "gen_ai.operation.name": operation,
        "gen_ai.request.model": body.model,
        "gen_ai.request.max_tokens": body.output_limit() or 0,
        "gen_ai.request.temperature": body.temperature if body.temperature is not None else 1.0,
        "turnout.request_id": request.scope["state"]["request_id"],
    }
    parent = tracing.extract(request.headers)
    span = tracing.start_span(f"{operation} {body.model}", None, server=True, context=parent, **attributes)
    auth = request.scope["state"].get("auth_span_ns")
    if auth is not None and span is not None:
        tracing.record_span("turnout.auth", span, *auth)
    return span


def _features(dispatcher: Dispatcher, body: Body, principal: Any) -> RequestFeatures:
    """What the routing strategy may know of the request. Prefix hashes are computed only
    for strategies that use them (the gateway does not tokenize: it hashes text chunks)."""
    route = dispatcher.route(body.model)
    prefix: tuple[int, ...] = ()
    if route.uses_prefixes:
        if isinstance(body, ChatCompletionRequest):
            text: str | list[int] = chat_prefix_text((m.role, m.text()) for m in body.messages)
        else:
            text = body.single_prompt()
        hashing = route.config.prefix_hashing
        prefix = prefix_block_hashes(text, hashing.block_size, hashing.max_blocks)
    return RequestFeatures(
        model=body.model,
        prompt_tokens=len(body._raw_body or b"") // 4,  # an estimate: the gateway does not tokenize
        max_tokens=body.output_limit(),
        priority=0 if principal is None or principal.priority == "interactive" else 1,
        sticky_key=body.user or (principal.key_id if principal else None),
        prefix_hashes=prefix,
    )


def _assign_variant(
    runtime: GatewayRuntime, dispatcher: Dispatcher, body: Body, request: Request, outcome: RequestOutcome, principal: Any
) -> tuple[list[str] | None, dict[str, str]]:
    """The experiment's variant for this request (its pool and response header), and shadow
    copies to the experiment's candidates, sent in the background."""
    experiment = dispatcher.experiments.get(body.model)
    if experiment is None:
        return None, {}
    sticky = experiment.sticky_value(
        api_key=principal.key_id if principal else None, user=body.user, headers=request.headers
    )
    assignment = experiment.assign(sticky, fallback=outcome.request_id)
    outcome.experiment, outcome.variant = experiment.name, assignment.variant.name
    if experiment.should_shadow(unit_hash(experiment.name, "shadow", outcome.request_id)):
        for variant in experiment.shadows:
            _shadow(runtime, dispatcher, experiment, variant, body, request.scope["state"]["request_id"])
    return list(assignment.variant.backends), {"x-turnout-variant": assignment.variant.name}


def _shadow(
    runtime: GatewayRuntime, dispatcher: Dispatcher, experiment: Experiment, variant: Variant, body: Body, request_id: str
) -> None:
    """Mirror the request to a shadow variant; its answer is recorded and discarded. Never
    delays the client: no waiting, and nothing at all when too many copies are in flight."""
    if len(runtime._tasks) >= MAX_SHADOW_IN_FLIGHT:  # noqa: SLF001 - the runtime's own task set
        return
    copy = body.model_copy(update={"stream": False, "stream_options": None})
    copy._raw_body = body._raw_body
    kind: Kind = "chat" if isinstance(body, ChatCompletionRequest) else "completions"
    outcome = RequestOutcome(request_id=f"{request_id}-shadow", route=kind, model=body.model)
    outcome.experiment, outcome.variant = experiment.name, variant.name

    async def run() -> None:
        features = RequestFeatures(model=body.model, priority=1)  # shadow copies never take interactive slots
        try:
            lease, (result, _) = await dispatcher.call(
                body.model, lambda b, r: _answer(kind, b, r, copy, runtime.tracing, None), features, variant.backends
            )
            lease.release()
            outcome.first_token_at = time.perf_counter()
            if result.usage is not None:
                outcome.prompt_tokens, outcome.completion_tokens = result.usage.prompt_tokens, result.usage.completion_tokens
        except Exception as exc:
            outcome.status, outcome.error_code = _status_of(exc)
        outcome.finish()
        runtime.write_sample(outcome, shadow=True)

    runtime.spawn(run())


async def _answer(kind: Kind, backend: Backend, route: Route, body: Body, tracing: Tracing, parent: Any) -> tuple[Any, Any]:
    """One attempt at a whole answer, inside the route's total deadline."""
    bspan = tracing.start_span(f"turnout.backend {backend.name}", parent, **{"turnout.backend": backend.name})
    try:
        with trace.use_span(bspan, end_on_exit=False) if bspan is not None else _nothing():
            async with asyncio.timeout(route.config.timeouts.total_s):
                work = backend.chat(body) if kind == "chat" else backend.completion(body)  # type: ignore[arg-type]
                return await work, bspan
    except BaseException as exc:
        Tracing.fail(bspan, str(exc))
        _end(bspan)
        raise


async def _open_stream(
    kind: Kind, backend: Backend, route: Route, body: Body, tracing: Tracing, parent: Any
) -> tuple[tuple[Any, AsyncIterator[Any]], Any]:
    """One attempt at a stream: open it and wait for its first chunk (the first-token
    deadline). Until that chunk, a failure may still be retried elsewhere."""
    bspan = tracing.start_span(f"turnout.backend {backend.name}", parent, **{"turnout.backend": backend.name})
    try:
        with trace.use_span(bspan, end_on_exit=False) if bspan is not None else _nothing():
            # Remote backends hand over the upstream's bytes (RawChunk): nothing to re-serialise.
            raw = getattr(backend, "chat_stream_raw" if kind == "chat" else "completion_stream_raw", None)
            if raw is not None:
                stream = raw(body)
            else:
                stream = backend.chat_stream(body) if kind == "chat" else backend.completion_stream(body)  # type: ignore[arg-type]
            first = await first_item(stream, route.config.timeouts.first_token_s)
        if bspan is not None:
            bspan.add_event("gen_ai.first_chunk")
        return (first, stream), bspan
    except BaseException as exc:
        Tracing.fail(bspan, str(exc))
        _end(bspan)
        raise


async def _observed(items: AsyncIterator[Any], strip_usage: bool, outcome: RequestOutcome) -> AsyncIterator[Any]:
    """Pass chunks through, noting the first token and the usage; drop the usage chunk the
    client did not ask for. Chunks are models (in-process backends) or RawChunks (remote)."""
    async for item in items:
        raw = type(item) is RawChunk
        if item.usage is not None:
            outcome.prompt_tokens = item.usage.prompt_tokens
            outcome.completion_tokens = item.usage.completion_tokens
            if strip_usage and not (item.has_choices if raw else item.choices):
                continue
        if outcome.first_token_at is None and (item.has_text if raw else _has_text(item)):
            outcome.first_token()
        yield item


def _has_text(chunk: Any) -> bool:
    """Whether a chat or completion chunk model carries generated text."""
    if not chunk.choices:
        return False
    choice = chunk.choices[0]
    delta = getattr(choice, "delta", None)
    return bool(delta.content if delta is not None else getattr(choice, "text", None))


async def _finally(items: AsyncIterator[T], finish: Any) -> AsyncIterator[T]:
    """`items`, then `finish(error)` however the stream ends (completion, failure, disconnect)."""
    error: BaseException | None = None
    try:
        async for item in items:
            yield item
    except BaseException as exc:
        error = exc
        raise
    finally:
        await items.aclose()  # type: ignore[attr-defined]
        finish(error)


def _finisher(runtime: GatewayRuntime, outcome: RequestOutcome, ticket: Any, lease: Lease, span: Any, backend_span: Any) -> Any:
    def finish(error: BaseException | None) -> None:
        lease.release()
        if error is not None:
            status, outcome.error_code = _status_of(error)
            outcome.status = 499 if status == 499 else outcome.status  # bytes went out with a 200
            Tracing.fail(backend_span, str(error))
        used = outcome.prompt_tokens + outcome.completion_tokens
        ticket.settle(used if outcome.completion_tokens or error is None else None)
        outcome.finish()
        runtime.record(outcome)
        _end(backend_span, outcome)
        _end(span, outcome)

    return finish


def _status_of(exc: BaseException) -> tuple[int, str | None]:
    if isinstance(exc, BackendError):
        return exc.status, exc.code
    if isinstance(exc, RateLimited):
        return 429, "rate_limit_exceeded"
    if isinstance(exc, AuthError):
        return 401, "invalid_api_key"
    if isinstance(exc, ModelForbidden):
        return 403, "model_not_allowed"
    if isinstance(exc, LimiterUnavailable):
        return 503, "service_unavailable"
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return 499, "client_closed_request"
    return 500, None


def _end(span: Any, outcome: RequestOutcome | None = None) -> None:
    if span is None:
        return
    if outcome is not None:
        span.set_attribute("gen_ai.usage.input_tokens", outcome.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", outcome.completion_tokens)
        span.set_attribute("http.response.status_code", outcome.status)
        if outcome.backend:
            span.set_attribute("turnout.backend", outcome.backend)
        if outcome.variant:
            span.set_attribute("turnout.variant", outcome.variant)
    span.end()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | Response:
    """Await `work`, cancelling it (and so the generation) if the client goes away.

    `work` runs in the request's own task; a timer looks for a disconnect every
    DISCONNECT_POLL_S and, when it finds one, cancels this task. Most answers take less
    than one period, so they cost one timer and no second task (a task per request, and
    asyncio.wait's waiter and timer around it, were measurable per request)."""
    watch = _DisconnectWatch(request, asyncio.current_task())  # type: ignore[arg-type]
    try:
        return await work
    except asyncio.CancelledError:
        if watch.left and watch.task.uncancel() == 0:  # our cancellation, nobody else's
            return Response(status_code=499)  # never seen by the client; for logs
        raise
    finally:
        watch.stop()


class _DisconnectWatch:
    """Polls `request.is_disconnected()` every DISCONNECT_POLL_S, off `task`, and cancels
    `task` (setting `left`) when the client has gone."""

    def __init__(self, request: Request, task: asyncio.Task[Any]) -> None:
        self.request = request
        self.task = task
        self.left = False
        self._loop = asyncio.get_running_loop()
        self._checking: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(DISCONNECT_POLL_S, self._poll)

    def _poll(self) -> None:
        self._timer = None
        self._checking = self._loop.create_task(self._check())

    async def _check(self) -> None:
        if await self.request.is_disconnected():
            self.left = True
            self.task.cancel()
        elif not self.task.done():
            self._timer = self._loop.call_later(DISCONNECT_POLL_S, self._poll)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._checking is not None and not self._checking.done():
            self._checking.cancel()
