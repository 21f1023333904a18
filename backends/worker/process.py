"""One incarnation of an engine worker, seen from the serving process: spawn it, talk to it
over two ZeroMQ sockets, hand each request its outputs, and notice when it exits.

A worker that dies (a signal, OOM kill, a native fault) ends every request it had with a
clean `WorkerDied` (502 naming the backend and the signal); the owner (`WorkerBackend`)
decides whether and when to start another."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from backends.generation import GenerationDelta
from backends.process_exit import exit_reason
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

REPO_ROOT = Path(__file__).resolve().parents[2]


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
    """One request's outputs: `started()` once, then GenerationDeltas until the final one. Deltas that queued up while the consumer was busy come out merged into
    one (as vLLM v1's output collector merges them): under load a slow SSE writer sends
    fewer, larger chunks instead of falling further behind. Closing it early (a client that
    left) aborts the request in the worker, which frees its KV blocks or llama.cpp instance."""

    __slots__ = ("request_id", "prompt_tokens", "prompt_text", "tool_format", "finished", "_items", "_waiter", "_worker", "_on_end")

    def __init__(self, worker: WorkerProcess, request_id: str, on_end: Callable[[], None]) -> None:
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
        item = await self._next_item()
        if type(item) is not m.Delta:
            self._end()
            raise _as_error(item)
        delta = item.delta
        # Merged within one choice only, up to its finish.
        while not delta.finish_reason and self._items and type(self._items[0]) is m.Delta and self._items[0].delta.index == delta.index:
            delta = _merged(delta, self._items.popleft().delta)
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


class WorkerProcess:
    """A worker process and its pipe. `start()` returns once the model is loaded."""

    def __init__(self, spec: m.WorkerSpec, on_load: Callable[[m.Load], None], on_exit: Callable[[int], None]) -> None:
        self.spec = spec
        self.on_load = on_load
        self.on_exit = on_exit
        self.proc: asyncio.subprocess.Process | None = None
        self.returncode: int | None = None
        self.ready: m.Ready | None = None
        self._streams: dict[str, RequestStream] = {}
        self._ready: asyncio.Future[m.Ready] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="turnout-worker-"))
        ctx = zmq.asyncio.Context.instance()
        self._to: zmq.asyncio.Socket = ctx.socket(zmq.PUSH)
        self._from: zmq.asyncio.Socket = ctx.socket(zmq.PULL)
        for sock in (self._to, self._from):
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.LINGER, 0)
        self._to.bind(f"ipc://{self._dir}/in")
        self._from.bind(f"ipc://{self._dir}/out")
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.returncode is None

    async def start(self, timeout_s: float) -> m.Ready:
        """Spawn the worker and wait for its model to load. Raises LoadError."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        spec_json = msgspec.json.encode(self.spec).decode()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "backends.worker", spec_json, f"ipc://{self._dir}/in", f"ipc://{self._dir}/out",
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))},
            stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._wait())]
        try:
            async with asyncio.timeout(timeout_s):
                self.ready = await self._ready
        except TimeoutError:
            await self.kill()
            raise LoadError(f"backend {self.spec.name!r}: model {self.spec.model!r} did not load within {timeout_s:g} s") from None
        return self.ready

    def submit(self, kind: str, body: bytes, on_end: Callable[[], None]) -> RequestStream:
        """Send a request; its outputs arrive on the returned stream."""
        if not self.alive:
            raise WorkerDied(f"backend {self.spec.name!r}: its engine worker is not running")
        rid = uuid.uuid4().hex
        stream = RequestStream(self, rid, on_end)
        self._streams[rid] = stream
        self._send(m.Submit(rid, kind, body))
        return stream

    def abort(self, request_id: str) -> None:
        if self.alive:
            self._send(m.Abort(request_id))

    def forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    def _send(self, message: m.ToWorker) -> None:
        # No high-water mark: a send never blocks, so the future is done at once.
        self._to.send(m.to_worker_encoder.encode([message]), copy=False)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the worker to finish (its requests are aborted), then kill it if it lingers."""
        if self.alive:
            self._send(m.Shutdown())
            try:
                async with asyncio.timeout(timeout_s):
                    await asyncio.shield(self._tasks[1])
            except TimeoutError:
                await self.kill()
        await self._cleanup()

    async def kill(self) -> None:
        if self.alive:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):  # it died before its exit was reaped
                self.proc.kill()
            await asyncio.shield(self._tasks[1])
        await self._cleanup()

    async def _cleanup(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._to.close(0)
        self._from.close(0)
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- the reader and the exit watcher --------------------------------------------------------

    async def _read(self) -> None:
        decode = m.from_worker_decoder.decode
        streams = self._streams
        while True:
            frame = await self._from.recv(copy=False)
            for message in decode(frame.buffer):
                kind = type(message)
                if kind is m.Delta or kind is m.Started or kind is m.Failed or kind is m.Embedded:
                    stream = streams.get(message.request_id)  # type: ignore[union-attr]
                    if stream is not None:
                        stream.put(message)
                elif kind is m.Load:
                    self.on_load(message)  # type: ignore[arg-type]
                elif kind is m.Ready:
                    if self._ready is not None and not self._ready.done():
                        self._ready.set_result(message)  # type: ignore[arg-type]
                elif kind is m.LoadFailed and self._ready is not None and not self._ready.done():
                    self._ready.set_exception(
                        LoadError(f"backend {self.spec.name!r} could not load model {self.spec.model!r}: {message.message}")  # type: ignore[union-attr]
                    )

    async def _wait(self) -> None:
        assert self.proc is not None
        rc = await self.proc.wait()
        await asyncio.sleep(0.05)  # let the reader deliver what the worker sent before it went
        self.returncode = rc
        reason = exit_reason(rc)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(
                LoadError(f"backend {self.spec.name!r}: the engine worker died while loading model {self.spec.model!r} ({reason})")
            )
        error = WorkerDied(f"backend {self.spec.name!r}: its engine worker died ({reason}); the request was not completed")
        for stream in list(self._streams.values()):
            stream.put(error)
        self.on_exit(rc)
