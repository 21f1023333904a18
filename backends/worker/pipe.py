"""A client's end of the pipe to one engine worker: requests go out on a PUSH socket to the
worker's inbox, outputs come back on a PULL socket bound at an address of the pipe's own, and
each request's outputs are handed to its `RequestStream`.

The process that started the worker (the owner) holds one pipe to it; with `turnout serve
--workers N`, each HTTP process holds one more, so the outputs of its requests cross the
pipe straight into the process that writes them to the client."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from backends.generation import GenerationDelta
from backends.protocol import (
    BackendError,
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    UpstreamError,
)
from backends.tools.formats import FORMATS, ToolFormat
from backends.worker import messages as m

log = logging.getLogger("turnout.worker")

WATCH_INTERVAL_S = 0.5  # how often a pipe that watches its worker's pid looks


class WorkerDied(UpstreamError):
    code = "worker_died"


class LoadError(UpstreamError):
    """The worker could not load its model (it said so, or died trying)."""

    code = "model_load_failed"


def error_from(failed: m.Failed) -> BackendError:
    """The worker's error as the exception the gateway would have raised in-process."""
    if failed.status == 503:
        return Overloaded(failed.message, retry_after=failed.retry_after or 1.0)
    if failed.status == 404:
        return ModelNotFound(failed.message, param=failed.param)
    if failed.status == 400:
        cls = ContextLengthExceeded if failed.code == ContextLengthExceeded.code else InvalidRequest
        return cls(failed.message, param=failed.param, code=failed.code)
    exc = BackendError(failed.message, param=failed.param, code=failed.code)
    exc.status, exc.type = failed.status, failed.type
    return exc


class RequestStream:
    """One request's outputs: `started()` once, then GenerationDeltas until the final one.
    Deltas that queued up while the consumer was busy come out merged into one (as vLLM v1's output collector merges them): under load a slow SSE writer sends
    fewer, larger chunks instead of falling further behind. Closing it early (a client that
    left) aborts the request in the worker, which frees its KV blocks or llama.cpp instance."""

    __slots__ = ("request_id", "prompt_tokens", "prompt_text", "tool_format", "finished", "_items", "_waiter", "_worker", "_on_end")

    def __init__(self, worker: WorkerPipe, request_id: str, on_end: Callable[[], None]) -> None:
        self.request_id = request_id
        self.prompt_tokens = 0
        self.prompt_text = ""
        self.tool_format: ToolFormat | None = None
        self.finished = False
        self._items: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._worker = worker
        self._on_end = on_end

    def put(self, item: Any) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _next_item(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    async def result(self) -> m.Embedded:
        """An embeddings request's one answer (after `started()`), or its error."""
        item = await self._next_item()
        self._end()
        if type(item) is m.Embedded:
            return item
        raise _as_error(item)

    async def started(self) -> None:
        """Wait until the worker accepted the request (or raise its error)."""
        item = await self._next_item()
        if type(item) is m.Started:
            self.prompt_tokens, self.prompt_text = item.prompt_tokens, item.prompt_text
            self.tool_format = FORMATS[item.tool_format] if item.tool_format else None
            return
        self._end()
        raise _as_error(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> GenerationDelta:
        if self.finished:
            raise StopAsyncIteration
        delta = await self._next_item()
        if type(delta) is not GenerationDelta:
            self._end()
            raise _as_error(delta)
        # Merged within one choice only, up to its finish.
        items = self._items
        while not delta.finish_reason and items and type(items[0]) is GenerationDelta and items[0].index == delta.index:
            delta = _merged(delta, items.popleft())
        if delta.final:
            self._end()
        return delta

    async def aclose(self) -> None:
        if not self.finished:
            self._worker.abort(self.request_id)
            self._end()

    def _end(self) -> None:
        if not self.finished:
            self.finished = True
            self._worker.forget(self.request_id)
            self._on_end()


def _merged(first: GenerationDelta, then: GenerationDelta) -> GenerationDelta:
    logprobs = None if first.logprobs is None and then.logprobs is None else [*(first.logprobs or []), *(then.logprobs or [])]
    return GenerationDelta(first.text + then.text, first.token_ids + then.token_ids, then.finish_reason, logprobs, then.index, then.final)


def _as_error(item: Any) -> BaseException:
    if isinstance(item, BaseException):
        return item
    if type(item) is m.Failed:
        return error_from(item)
    return UpstreamError(f"unexpected message from the engine worker: {type(item).__name__}")


class WorkerPipe:
    """One client's connection to one worker incarnation. `client` "" is the owner, whose
    address the worker was given at spawn; any other client says `Hello` first. `on_load`
    gets the worker's load reports; `on_control` its `Ready` and `LoadFailed` (the owner's).
    With `watch_pid`, the pipe fails its requests by itself if that process disappears (a
    sharing HTTP process hears of a death from the engine host, this is the fallback)."""

    def __init__(
        self,
        name: str,
        worker_address: str,
        *,
        on_load: Callable[[m.Load], None],
        on_control: Callable[[Any], None] | None = None,
        client: str = "",
        watch_pid: int | None = None,
    ) -> None:
        self.name = name
        self.client = client
        self.worker_pid = watch_pid
        self.on_load = on_load
        self.on_control = on_control
        self.error: WorkerDied | None = None  # set once the worker is gone
        self._streams: dict[str, RequestStream] = {}
        self._dir = Path(tempfile.mkdtemp(prefix="turnout-pipe-"))
        self.address = f"ipc://{self._dir}/out"
        ctx = zmq.asyncio.Context.instance()
        self._to: zmq.asyncio.Socket = ctx.socket(zmq.PUSH)
        self._from: zmq.asyncio.Socket = ctx.socket(zmq.PULL)
        for sock in (self._to, self._from):
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.LINGER, 0)
        self._to.setsockopt(zmq.RECONNECT_IVL, 10)  # the worker binds its inbox a moment after spawn
        self._from.bind(self.address)
        self._to.connect(worker_address)
        if client:
            self._send(m.Hello(client, os.getpid(), self.address))
        self._tasks = [asyncio.create_task(self._read())]
        if watch_pid is not None:
            self._tasks.append(asyncio.create_task(self._watch(watch_pid)))

    def submit(self, kind: str, body: bytes, on_end: Callable[[], None]) -> RequestStream:
        """Send a request; its outputs arrive on the returned stream."""
        if self.error is not None:
            raise WorkerDied(self.error.message)
        rid = uuid.uuid4().hex
        stream = RequestStream(self, rid, on_end)
        self._streams[rid] = stream
        self._send(m.Submit(rid, kind, body, self.client))
        return stream

    def abort(self, request_id: str) -> None:
        if self.error is None:
            self._send(m.Abort(request_id))

    def forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    def send(self, message: m.ToWorker) -> None:
        """A message of the pipe's own (the owner's Shutdown)."""
        self._send(message)

    def _send(self, message: m.ToWorker) -> None:
        # No high-water mark: a send never blocks, so the future is done at once.
        self._to.send(m.to_worker_encoder.encode([message]), copy=False)

    def fail_all(self, message: str) -> None:
        """The worker is gone: every request still open ends with WorkerDied, and so does
        every later submit."""
        if self.error is None:
            self.error = WorkerDied(message)
            for stream in list(self._streams.values()):
                stream.put(WorkerDied(message))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._to.close(0)
        self._from.close(0)
        shutil.rmtree(self._dir, ignore_errors=True)

    async def _read(self) -> None:
        decode = m.from_worker_decoder.decode
        streams = self._streams
        while True:
            frame = await self._from.recv(copy=False)
            for message in decode(frame.buffer):
                kind = type(message)
                if kind is m.StepDeltas:
                    for rid, delta in zip(message.request_ids, message.deltas):  # type: ignore[union-attr]
                        stream = streams.get(rid)
                        if stream is not None:
                            stream.put(delta)
                elif kind is m.Delta:
                    stream = streams.get(message.request_id)  # type: ignore[union-attr]
                    if stream is not None:
                        stream.put(message.delta)  # type: ignore[union-attr]
                elif kind is m.Started or kind is m.Failed or kind is m.Embedded:
                    stream = streams.get(message.request_id)  # type: ignore[union-attr]
                    if stream is not None:
                        stream.put(message)
                elif kind is m.Load:
                    self.on_load(message)  # type: ignore[arg-type]
                elif self.on_control is not None:
                    self.on_control(message)

    async def _watch(self, pid: int) -> None:
        while self.error is None:
            await asyncio.sleep(WATCH_INTERVAL_S)
            if not pid_alive(pid):
                # The process that started the worker reaped it, and says how it ended
                # (`Exited`: "SIGKILL", "SIGSEGV") a moment later: its word ends the streams
                # when it comes in time, this generic one otherwise.
                await asyncio.sleep(WATCH_INTERVAL_S)
                if self.error is None:
                    self.fail_all(f"backend {self.name!r}: its engine worker (pid {pid}) is gone; the request was not completed")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (ours, or anyone's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
