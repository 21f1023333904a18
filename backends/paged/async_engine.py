"""One engine thread, per-request outputs delivered to sinks.

The engine is driven by a plain loop on its own thread (torch releases the GIL in kernels,
so the event loop stays responsive). Requests and aborts reach it through a command queue.
After each step the outputs go to each request's `OutputSink`, one call per sink per step:
for `generate()`, a sink that hands them to the request's asyncio.Queue through one
call_soon_threadsafe; in an engine worker process, a sink that writes them straight to the
gateway's pipe from this thread, with no event loop in the way. Closing a `generate()`
stream early (client disconnect) aborts the request, and the close waits until the engine
thread has freed its blocks.

The thread keeps a few plain float counters of where its wall time goes (idle, delivering,
draining commands; the engine's own step time is in `LLMEngine.counters`), each written by
the thread alone, so that a served run can be profiled from /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from backends.generation import GenerationDelta, GenerationRequest
from backends.paged.engine import LLMEngine
from backends.paged.pooling import EmbeddingOutput, PoolingRequest
from backends.protocol import BackendError

log = logging.getLogger(__name__)


class EngineDeadError(BackendError):
    status = 503
    code = "engine_dead"


class OutputSink(Protocol):
    """Where a request's outputs go. Called on the engine thread, once per step, with every
    (token, delta or exception) of that step for this sink's requests; `token` is what the
    request was submitted with."""

    def deliver(self, items: list[tuple[Any, GenerationDelta | BaseException]]) -> None: ...


@dataclass(frozen=True)
class _LoopSink:
    """Outputs to asyncio queues (the tokens) on one event loop: one wake-up per step, not one
    per sequence (at batch 256 the self-pipe writes were a large share of the host time)."""

    loop: asyncio.AbstractEventLoop

    def deliver(self, items: list[tuple[Any, GenerationDelta | BaseException]]) -> None:
        try:
            self.loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # the consumer's loop is gone; nothing to deliver to
            pass


def _deliver(items: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]) -> None:
    def done() -> None:
        if not fut.done():
            fut.set_result(None)

    try:
        loop.call_soon_threadsafe(done)
    except RuntimeError:
        pass


class AsyncEngine:
    """Runs an LLMEngine on a background thread and streams its outputs to coroutines."""

    IDLE_WAIT_S = 0.5

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[OutputSink, Any]] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._stop = False
        # Requests queued but not yet seen by the engine thread = sent - seen; each counter
        # has one writer, so no lock is needed.
        self._adds_sent = 0
        self._adds_seen = 0
        self.error: BaseException | None = None
        # Where the engine thread's wall time goes, in seconds (engine thread only, no locks):
        self.idle_s = 0.0  # waiting for work: nothing unfinished
        self.deliver_s = 0.0  # in sink.deliver() for step outputs (a worker's encode + send too)
        self.drain_s = 0.0  # in _drain(): adding and aborting requests
        self.started_at = 0.0  # perf_counter() when the thread started; 0 before
        self._idle_since = 0.0  # perf_counter() when the current idle wait began; 0 when busy

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="paged-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        """Stop the thread; in-flight streams end with an error."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def pending_adds(self) -> int:
        return max(0, self._adds_sent - self._adds_seen)

    @property
    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def idle_seconds(self) -> float:
        """`idle_s` plus the idle wait in progress, so that a reader on another thread (the
        worker's load reports come while the engine waits) sees it grow with `loop_seconds()`.
        A read racing the end of a wait may miss that one wait (at most IDLE_WAIT_S)."""
        since = self._idle_since
        return self.idle_s + (time.perf_counter() - since if since else 0.0)

    def loop_seconds(self) -> float:
        """Wall seconds since the engine thread started (0 before)."""
        return time.perf_counter() - self.started_at if self.started_at else 0.0

    # -- the engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        clock = time.perf_counter
        # Three clock reads per step: `t` is the end of the previous turn (the start of this one).
        self.started_at = t = clock()
        try:
            while not self._stop:
                self._drain()
                drained = clock()
                self.drain_s += drained - t
                if not self.engine.has_unfinished():
                    self._idle_since = drained
                    self._wake.wait(self.IDLE_WAIT_S)
                    self._wake.clear()
                    t = clock()
                    self._idle_since = 0.0  # cleared before the add: a racing read undercounts, never doubles
                    self.idle_s += t - drained
                    continue
                try:
                    outputs = self.engine.step()
                except Exception as exc:  # a bug or OOM: fail the affected requests, keep serving
                    log.exception("paged engine step failed")
                    self._fail_all(exc)
                    t = clock()
                    continue
                deliveries: dict[OutputSink, list[tuple[Any, GenerationDelta | BaseException]]] = {}
                for out in outputs:
                    stream = self._streams.get(out.request_id)
                    if stream is None:
                        continue
                    if out.delta.final:  # the request's last choice finished
                        del self._streams[out.request_id]
                    deliveries.setdefault(stream[0], []).append((stream[1], out.delta))
                delivering = clock()
                for sink, items in deliveries.items():
                    sink.deliver(items)
                t = clock()
                self.deliver_s += t - delivering
        except BaseException as exc:  # pragma: no cover - the loop itself broke
            self.error = exc
            log.exception("paged engine loop died")
        finally:
            self._drain()
            self._fail_all(EngineDeadError("the paged engine stopped"))

    def _drain(self) -> None:
        while True:
            try:
                kind, arg, extra = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._adds_seen += 1
                request: GenerationRequest | PoolingRequest = arg
                sink, token = extra
                try:
                    self.engine.add_request(request)
                    self._streams[request.request_id] = extra
                except Exception as exc:
                    sink.deliver([(token, exc)])
            elif kind == "abort":
                self._streams.pop(arg, None)
                self.engine.abort(arg)
                if extra is not None:
                    loop, fut = extra
                    _resolve(loop, fut)

    def _fail_all(self, exc: BaseException) -> None:
        deliveries: dict[OutputSink, list[tuple[Any, GenerationDelta | BaseException]]] = {}
        for rid, (sink, token) in list(self._streams.items()):
            self.engine.abort(rid)
            deliveries.setdefault(sink, []).append((token, exc))
        self._streams.clear()
        for sink, items in deliveries.items():
            sink.deliver(items)

    # -- the async side ------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest | PoolingRequest, sink: OutputSink, token: Any) -> None:
        """Queue a request whose outputs go to `sink` (as `(token, item)` pairs). Raises
        what the engine cannot take (InvalidRequest) at once, before anything is queued."""
        if not self.healthy:
            raise EngineDeadError("the paged engine is not running")
        self.engine.validate(request)  # fail fast, before the first byte
        self._adds_sent += 1
        self._commands.put(("add", request, (sink, token)))
        self._wake.set()

    def abort_nowait(self, request_id: str) -> None:
        """Abort a submitted request; its blocks are freed at the engine thread's next turn."""
        self._commands.put(("abort", request_id, None))
        self._wake.set()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Stream a request's deltas (every choice's, each by its `index`) up to the `final`
        one. Closing this iterator early aborts the request and returns once its KV blocks
        are free."""
        queue_: asyncio.Queue[Any] = asyncio.Queue()
        self.submit(request, _LoopSink(asyncio.get_running_loop()), queue_)
        finished = False
        try:
            while True:
                item = await queue_.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine already dropped it
                    raise item
                if item.final:  # every choice has finished
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                await self.abort(request.request_id)

    async def embed(self, request: PoolingRequest) -> EmbeddingOutput:
        """Run an embedding request through the engine, batched with whatever else runs;
        its one output. Cancelling the wait aborts it and returns once its blocks are free."""
        queue_: asyncio.Queue[Any] = asyncio.Queue()
        self.submit(request, _LoopSink(asyncio.get_running_loop()), queue_)
        finished = False
        try:
            item = await queue_.get()
            finished = True  # an answer or an error: the engine has dropped the request either way
            if isinstance(item, BaseException):
                raise item
            return item
        finally:
            if not finished:
                await self.abort(request.request_id)

    async def abort(self, request_id: str) -> None:
        """Abort a request and wait until the engine thread has freed its blocks."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._commands.put(("abort", request_id, (loop, fut)))
        self._wake.set()
        if self._thread is None or not self._thread.is_alive():
            return
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout=30)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            pass
