"""One generation (or embedding) request, end to end (DESIGN.md, "A request's path"): rate limit ->
experiment assignment -> pick a backend and call it (retries and fallbacks before the first
byte) -> stream (gateway.streaming) or answer -> record usage, metrics, span and experiment
sample.

Authentication ran before this, in `gateway.auth.AuthMiddleware`, which also handed the
request the policy snapshot it keeps to the end. Every dialect comes through here, translated
to the contract by its route; its `Dialect` writes the answer and the stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import nullcontext
from functools import partial
from typing import Any, Literal, TypeVar

from fastapi import Request, Response
from opentelemetry import trace
from starlette.background import BackgroundTask

from backends.protocol import (
    Backend,
    ChatCompletionRequest,
    CompletionRequest,
    Embeds,
    EmbeddingRequest,
    InvalidRequest,
    UpstreamTimeout,
)
from gateway.auth import rate_limit
from gateway.body import prompt_token_estimate
from gateway.dialects.base import Dialect, OpenAIDialect
from gateway.dispatch import Dispatcher, Route
from gateway.errors import CLIENT_CLOSED, status_of
from gateway.outcome import RequestOutcome
from gateway.ratelimit import NO_RESERVATION, NoReservation, TokenReservation
from gateway.resume import Resumer, Serving, ask_for_usage, resumable
from gateway.runtime import GatewayRuntime
from gateway.snapshot import Snapshot
from gateway.streaming import ChunkStream, first_chunk
from gateway.tracing import Tracing, trace_id_of
from policies.experiments import Experiment, Variant, unit_hash
from policies.routing import RequestFeatures, chat_prefix_text, prefix_block_hashes

T = TypeVar("T")

Kind = Literal["chat", "completions", "embeddings"]
Body = ChatCompletionRequest | CompletionRequest | EmbeddingRequest

# How often a non-streamed request checks whether its client is still there.
DISCONNECT_POLL_S = 0.25
MAX_SHADOW_IN_FLIGHT = 16  # beyond this, shadow copies are skipped rather than queued


async def generate(kind: Kind, body: Body, raw: bytes, request: Request, dialect: Dialect | None = None) -> Response:
    """Serve one chat, text completion or embedding request, answered in `dialect` (default:
    OpenAI's). `raw`: the body as the client sent it (the prompt's size estimate, and what a
    remote forwards as is where the dialect is OpenAI's)."""
    if dialect is None:
        streamed = bool(getattr(body, "stream", False))  # an EmbeddingRequest has no stream
        dialect = OpenAIDialect(kind, strip_usage=streamed and not body.wants_usage_chunk())  # type: ignore[union-attr]
    runtime: GatewayRuntime = request.app.state.runtime
    state = request.scope["state"]
    snapshot: Snapshot = state["snapshot"]  # this request keeps this policy even if a reload lands
    dispatcher = snapshot.dispatcher
    principal = state.get("principal")
    outcome = RequestOutcome(
        request_id=state["request_id"],
        route=dialect.route,
        model=body.model,
        stream=bool(getattr(body, "stream", False)),
        key_name=principal.key_id if principal else None,
        tenant=principal.tenant if principal else None,
        client_ip=state["client_ip"],  # the peer, or the client a trusted proxy names (gateway/client_address.py)
    )
    if snapshot.config.server.log_prompts:
        outcome.prompt = body.model_dump_json(include={"messages", "prompt", "input"})
    tracing = runtime.tracing
    span = _request_span(tracing, kind, body, request) if tracing.enabled else None
    outcome.trace_id = trace_id_of(span)
    handed_to_stream = False
    record_after_send = False
    reservation: TokenReservation | NoReservation = NO_RESERVATION
    prompt_estimate = prompt_token_estimate(raw)
    forward = raw if dialect.forwards_raw else None  # the bytes a remote may send upstream as they came
    try:
        if principal is not None:
            principal.check_model(body.model)
        dispatcher.check_serves(body.model, kind)
        if not isinstance(body, EmbeddingRequest):
            dispatcher.check_output_limit(body)  # before the limiter reserves what it asks for
        with tracing.span("turnout.rate_limit", span):
            reservation = await rate_limit(request, body, prompt_estimate)
        pool, headers = _assign_variant(runtime, dispatcher, kind, body, forward, request, outcome, principal)
        features = _features(dispatcher, body, principal, prompt_estimate)
        if not isinstance(body, EmbeddingRequest) and body.stream:
            route = dispatcher.route(body.model)
            may_resume = route.config.resume and resumable(body)
            # Usage for limits and metrics; on every chunk where the stream may resume.
            client_continuous = ask_for_usage(body, continuous=may_resume)
            lease, (first, rest, backend_span) = await dispatcher.call(
                body.model, lambda b, r: _open_stream(kind, dispatcher, b, r, body, forward, tracing, span), features, pool, tracing, span
            )
            outcome.backend = lease.name
            serving = Serving(lease, backend_span)
            resumer = None
            if may_resume:
                members = pool or route.config.backends
                reopen = partial(_reopen, kind, dispatcher, body.model, features, members, tracing, span)
                resumer = Resumer(body, serving, reopen, client_continuous=client_continuous)
            deadline = asyncio.get_running_loop().time() + route.config.timeouts.total_s
            current = (lambda: resumer.serving) if resumer is not None else (lambda: serving)
            on_close = partial(_close_stream, runtime, outcome, reservation, current, span)
            chunks = ChunkStream(first, rest, deadline=deadline, dialect=dialect, outcome=outcome, on_close=on_close, resume=resumer)
            handed_to_stream = True
            headers["endpoint-load-metrics"] = lease.backend.load().to_header()
            return chunks.response(headers)
        lease, (result, backend_span) = await dispatcher.call(
            body.model, lambda b, r: _answer(kind, dispatcher, b, r, body, forward, tracing, span), features, pool, tracing, span
        )
        outcome.backend = lease.name
        try:
            usage = result.usage
            if usage is not None:  # an embedding's usage has no completion_tokens: total less prompt is 0
                outcome.prompt_tokens, outcome.completion_tokens = usage.prompt_tokens, usage.total_tokens - usage.prompt_tokens
            outcome.first_token_at = time.perf_counter()  # a whole answer arrives at once
            headers["endpoint-load-metrics"] = lease.backend.load().to_header()
            reservation.settle(usage.total_tokens if usage is not None else None)
        finally:
            lease.release()
            _end(backend_span)
        # Metrics and the access line once the answer is on its way (Starlette runs a
        # response's background after its last byte is sent, before the request ends): the
        # client does not wait for them. The outcome is finished below, as on every path.
        record_after_send = True
        return Response(
            dialect.answer(result), media_type="application/json", headers=headers, background=BackgroundTask(_record, runtime, outcome)
        )
    except BaseException as exc:
        outcome.status, outcome.error_code = status_of(exc)
        if not handed_to_stream:
            reservation.settle(0)  # nothing was generated: give the reservation back (once; a settled one stays)
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


def _close_stream(
    runtime: GatewayRuntime,
    outcome: RequestOutcome,
    reservation: TokenReservation | NoReservation,
    current: Callable[[], Serving],
    span: Any,
    error: BaseException | None,
) -> None:
    """A stream's bookkeeping once it ended, however it ended (ChunkStream's `on_close`).
    `current`: where it is served at the end (another backend, if it resumed there)."""
    serving = current()
    serving.lease.release()
    outcome.backend = serving.lease.name
    backend_span = serving.span
    if error is not None:
        status, outcome.error_code = status_of(error)
        if status == CLIENT_CLOSED:
            outcome.status = status  # otherwise it stays the 200 that went out; the error was in-band
        Tracing.fail(backend_span, str(error))
    used = outcome.prompt_tokens + outcome.completion_tokens
    reservation.settle(used if outcome.completion_tokens or error is None else None)
    outcome.finish()
    runtime.record(outcome)
    _end(backend_span, outcome)
    _end(span, outcome)


# -- steps -------------------------------------------------------------------------------------


def _request_span(tracing: Tracing, kind: Kind, body: Body, request: Request) -> Any:
    """The request's root span, continuing the caller's W3C trace; GenAI semantic names."""
    operation = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}[kind]
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.request.model": body.model,
        "turnout.request_id": request.scope["state"]["request_id"],
    }
    if not isinstance(body, EmbeddingRequest):
        attributes["gen_ai.request.max_tokens"] = body.output_limit() or 0
        attributes["gen_ai.request.temperature"] = body.temperature if body.temperature is not None else 1.0
    parent = tracing.extract(request.headers)
    span = tracing.start_span(f"{operation} {body.model}", None, server=True, context=parent, **attributes)
    auth = request.scope["state"].get("auth_span_ns")
    if auth is not None and span is not None:
        tracing.record_span("turnout.auth", span, *auth)
    return span


def _features(dispatcher: Dispatcher, body: Body, principal: Any, prompt_estimate: int) -> RequestFeatures:
    """What the routing strategy may know of the request. Prefix hashes are computed only
    for strategies that use them (the gateway does not tokenize: it hashes text chunks)."""
    route = dispatcher.route(body.model)
    prefix: tuple[int, ...] = ()
    if route.uses_prefixes:
        if isinstance(body, ChatCompletionRequest):
            text: str | list[int] = chat_prefix_text((m.role, m.text()) for m in body.messages)
        elif isinstance(body, CompletionRequest):
            text = body.single_prompt()
        else:
            text = ""  # embeddings: nothing is cached for them, so nothing to be near
        hashing = route.config.prefix_hashing
        prefix = prefix_block_hashes(text, hashing.block_size, hashing.max_blocks) if text else ()
    return RequestFeatures(
        model=body.model,
        prompt_tokens=prompt_estimate,
        max_tokens=(body.output_limit() or 0) * body.choices() or None,  # every choice holds KV of its own
        priority=0 if principal is None or principal.priority == "interactive" else 1,
        sticky_key=body.user or (principal.key_id if principal else None),
        prefix_hashes=prefix,
    )


def _assign_variant(
    runtime: GatewayRuntime,
    dispatcher: Dispatcher,
    kind: Kind,
    body: Body,
    raw: bytes | None,
    request: Request,
    outcome: RequestOutcome,
    principal: Any,
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
            _shadow(runtime, dispatcher, experiment, variant, kind, body, raw, request.scope["state"]["request_id"])
    return list(assignment.variant.backends), {"x-turnout-variant": assignment.variant.name}


def _shadow(
    runtime: GatewayRuntime,
    dispatcher: Dispatcher,
    experiment: Experiment,
    variant: Variant,
    kind: Kind,
    body: Body,
    raw: bytes | None,
    request_id: str,
) -> None:
    """Mirror the request to a shadow variant; its answer is recorded and discarded. Never
    delays the client: no waiting, and nothing at all when too many copies are in flight."""
    if runtime.background_tasks >= MAX_SHADOW_IN_FLIGHT:
        return
    copy = body if isinstance(body, EmbeddingRequest) else body.model_copy(update={"stream": False, "stream_options": None})
    outcome = RequestOutcome(request_id=f"{request_id}-shadow", route=kind, model=body.model)
    outcome.experiment, outcome.variant = experiment.name, variant.name

    async def run() -> None:
        features = RequestFeatures(model=body.model, priority=1)  # shadow copies never take interactive slots
        try:
            lease, (result, _) = await dispatcher.call(
                body.model, lambda b, r: _answer(kind, dispatcher, b, r, copy, raw, runtime.tracing, None), features, variant.backends
            )
            lease.release()
            outcome.first_token_at = time.perf_counter()
            if result.usage is not None:  # an embedding's usage has no completion_tokens: total less prompt is 0
                outcome.prompt_tokens, outcome.completion_tokens = result.usage.prompt_tokens, result.usage.total_tokens - result.usage.prompt_tokens
        except Exception as exc:
            outcome.status, outcome.error_code = status_of(exc)
        outcome.finish()
        runtime.write_sample(outcome, shadow=True)

    runtime.spawn(run())


async def _answer(
    kind: Kind, dispatcher: Dispatcher, backend: Backend, route: Route, body: Body, raw: bytes | None, tracing: Tracing, parent: Any
) -> tuple[Any, Any]:
    """One attempt at a whole answer. Its start must come within the route's first-token
    deadline: for a remote, the upstream's response headers (the backend times them, as
    `first_byte_timeout_s`); other backends hand an answer over only whole, so there the
    total deadline is the only one. Past either: a 502 with failure "timeout"
    (UpstreamTimeout here, the remote's RemoteFailure), which retries, fallbacks and the
    circuit count as a timeout."""
    timeouts = route.config.timeouts
    bspan = tracing.start_span(f"turnout.backend {backend.name}", parent, **{"turnout.backend": backend.name})
    try:
        with trace.use_span(bspan, end_on_exit=False) if bspan is not None else nullcontext():
            try:
                async with asyncio.timeout(timeouts.total_s):
                    forward = dispatcher.passthrough.get(backend.name) if raw is not None else None
                    first = timeouts.first_token_s
                    if forward is not None:  # the client's own bytes go upstream
                        raw_call = {"chat": forward.chat_raw, "completions": forward.completion_raw, "embeddings": forward.embeddings_raw}[kind]
                        work = raw_call(body, raw, first_byte_timeout_s=first)  # type: ignore[operator]
                    elif isinstance(body, EmbeddingRequest):
                        if not isinstance(backend, Embeds):
                            raise InvalidRequest(f"backend {backend.name!r} cannot embed", param="model")
                        work = backend.embeddings(body)
                    else:
                        work = backend.chat(body) if kind == "chat" else backend.completion(body)  # type: ignore[arg-type]
                    return await work, bspan
            except TimeoutError:
                raise _timed_out(backend, "did not finish its answer", "total_s", timeouts.total_s) from None
    except BaseException as exc:
        Tracing.fail(bspan, str(exc))
        _end(bspan)
        raise


async def _open_stream(
    kind: Kind, dispatcher: Dispatcher, backend: Backend, route: Route, body: Body, raw: bytes | None, tracing: Tracing, parent: Any
) -> tuple[Any, AsyncIterator[Any], Any]:
    """One attempt at a stream: open it and wait for its first chunk (the first-token
    deadline). Until that chunk, a failure may still be retried elsewhere."""
    bspan = tracing.start_span(f"turnout.backend {backend.name}", parent, **{"turnout.backend": backend.name})
    try:
        with trace.use_span(bspan, end_on_exit=False) if bspan is not None else nullcontext():
            forward = dispatcher.passthrough.get(backend.name) if raw is not None else None
            stream: AsyncIterator[Any]
            if forward is not None:  # the upstream's bytes come back (RawChunk): nothing to re-serialise
                stream = forward.chat_stream_raw(body, raw) if kind == "chat" else forward.completion_stream_raw(body, raw)  # type: ignore[arg-type]
            else:
                stream = backend.chat_stream(body) if kind == "chat" else backend.completion_stream(body)  # type: ignore[arg-type]
            deadline = route.config.timeouts.first_token_s
            try:
                first = await first_chunk(stream, deadline)
            except TimeoutError:
                raise _timed_out(backend, "sent nothing", "first_token_s", deadline) from None
        if bspan is not None:
            bspan.add_event("gen_ai.first_chunk")
        return first, stream, bspan
    except BaseException as exc:
        Tracing.fail(bspan, str(exc))
        _end(bspan)
        raise


async def _reopen(
    kind: Kind,
    dispatcher: Dispatcher,
    alias: str,
    features: RequestFeatures,
    members: list[str],
    tracing: Tracing,
    parent: Any,
    continuation: Body,
    failed: frozenset[str],
) -> tuple[Any, AsyncIterator[Any], Serving]:
    """A failed stream's continuation, opened on another backend (gateway.resume's `Reopen`)."""
    attempt = partial(_open_stream, kind, dispatcher, body=continuation, raw=None, tracing=tracing, parent=parent)
    lease, (first, rest, backend_span) = await dispatcher.resume(alias, attempt, features, members, failed, tracing, parent)
    return first, rest, Serving(lease, backend_span)


def _timed_out(backend: Backend, what: str, deadline: str, seconds: float) -> UpstreamTimeout:
    """The error for an attempt past one of the route's deadlines (`timeouts.<deadline>`)."""
    return UpstreamTimeout(f"backend {backend.name!r} {what} within the route's timeouts.{deadline} ({seconds:g} s)")


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
            return Response(status_code=CLIENT_CLOSED)  # never seen by the client; for logs
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
