"""One engine thread, per-request async streams.

The engine is driven by a plain loop on its own thread (torch releases the GIL in kernels,
so the event loop stays responsive). Requests and aborts reach it through a command queue;
deltas come back to each request's asyncio.Queue via call_soon_threadsafe. Closing a
stream early (client disconnect) aborts the request, and the close waits until the engine
thread has freed its blocks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from backends.generation import GenerationDelta, GenerationRequest
from backends.paged.engine import LLMEngine
from backends.protocol import BackendError

log = logging.getLogger(__name__)


class EngineDeadError(BackendError):
    status = 503
    code = "engine_dead"


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is gone; nothing to deliver to
            pass


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
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._stop = False
        # Requests queued but not yet seen by the engine thread = sent - seen; each counter
        # has one writer, so no lock is needed.
        self._adds_sent = 0
        self._adds_seen = 0
        self.error: BaseException | None = None

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

    # -- the engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop:
                self._drain()
                if not self.engine.has_unfinished():
                    self._wake.wait(self.IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except Exception as exc:  # a bug or OOM: fail the affected requests, keep serving
                    log.exception("paged engine step failed")
                    self._fail_all(exc)
                    continue
                for out in outputs:
                    stream = self._streams.get(out.request_id)
                    if stream is None:
                        continue
                    if out.delta.finish_reason:
                        del self._streams[out.request_id]
                    stream.put(out.delta)
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
                request: GenerationRequest = arg
                try:
                    self.engine.add_request(request)
                    self._streams[request.request_id] = extra
                except Exception as exc:
                    extra.put(exc)
            elif kind == "abort":
                self._streams.pop(arg, None)
                self.engine.abort(arg)
                loop, fut = extra
                _resolve(loop, fut)

    def _fail_all(self, exc: BaseException) -> None:
        for rid, stream in list(self._streams.items()):
            self.engine.abort(rid)
            stream.put(exc)
        self._streams.clear()

    # -- the async side ------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Stream a request's deltas. Closing this iterator early aborts the request and
        returns once its KV blocks are free."""
        if not self.healthy:
            raise EngineDeadError("the paged engine is not running")
        self.engine.validate(request)  # fail fast, before the first byte
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue())
        self._adds_sent += 1
        self._commands.put(("add", request, stream))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine already dropped it
                    raise item
                if item.finish_reason:
                    finished = True
                yield item
                if finished:
                    return
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
