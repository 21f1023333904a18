"""WorkerBackend: the Backend protocol over an engine worker process.

Models come and go as Ollama's do: a worker starts on the first request (or at start with
`preload`), stops after `keep_alive` seconds without requests (a request's own keep_alive
wins, as in Ollama), and a `before_load` hook (the gateway's memory budget) may first unload
other models. A worker that dies is restarted with backoff; meanwhile the backend reports
itself unhealthy, so routers send its traffic elsewhere, and requests that reach it anyway
get a 503 with Retry-After. A model that fails to load answers that error, and the load is
tried again on the next request, not in a loop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any, Literal

import numpy as np

from backends import responses
from backends.embeddings import build_response, embedding_only_message
from backends.protocol import (
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
    Overloaded,
    parse_keep_alive,
)
from backends.worker import messages as m
from backends.process_exit import exit_reason
from backends.worker.pipe import LoadError, RequestStream
from backends.worker.process import WorkerProcess

log = logging.getLogger("turnout.worker")

State = Literal["unloaded", "loading", "ready", "restarting", "failed"]

LOAD_TIMEOUT_S = 600.0  # a model load (GPU weights, CUDA graphs) may take minutes
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # a worker that lived this long resets the backoff


class LocalModelBackend:
    """What every local backend of a serving process has, whether it owns its engine worker
    (WorkerBackend) or shares one supervised by the engine host (SharedWorkerBackend, with
    `turnout serve --workers N`): the Backend protocol over a request's `RequestStream`, and
    the state that `turnout ps`, Ollama's ps and the memory budget read."""

    spec: m.WorkerSpec
    name: str
    model_id: str
    state: State
    restarts: int
    last_exit: str | None
    load_error: str | None
    expires_at: float | None

    _last_load: m.Load | None
    _block_size: int
    _max_running: int

    def models(self) -> list[ModelCard]:
        return [ModelCard(id=self.model_id, max_model_len=self.context_window)]

    def load(self) -> LoadReport:
        """The worker's last report; an unloaded model is healthy (it loads on demand), a
        restarting one is not."""
        healthy = self.state != "restarting"
        last = self._last_load if self.state == "ready" else None
        if last is None:
            return LoadReport(block_size=self._block_size, max_running=self._max_running, running=self.in_flight, healthy=healthy)
        return LoadReport(
            kv_usage=last.kv_usage,
            kv_free_blocks=last.kv_free_blocks,
            block_size=last.block_size,
            running=last.running,
            waiting=last.waiting,
            max_running=last.max_running,
            prefix_cache_hit_rate=last.prefix_cache_hit_rate,
            healthy=healthy and last.healthy,
        )

    def stats(self) -> dict[str, float]:
        """The engine's counters under vLLM's names (paged) and the worker's own
        (`turnout:requests_aborted`), from its last report; a new worker counts from 0."""
        return dict(self._last_load.stats) if self._last_load is not None else {}

    @property
    def context_window(self) -> int | None:
        raise NotImplementedError

    async def _submit(self, kind: str, body: bytes, keep_alive: float | None) -> RequestStream:
        """Send a request to a loaded worker (loading it first if needed)."""
        raise NotImplementedError

    async def unload(self) -> None:
        raise NotImplementedError

    @property
    def loaded(self) -> bool:
        return self.state == "ready"

    @property
    def in_flight(self) -> int:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        raise NotImplementedError

    def memory_bytes(self) -> int:
        raise NotImplementedError

    async def _open(self, kind: str, request: ChatCompletionRequest | CompletionRequest | EmbeddingRequest) -> RequestStream:
        """Submit a request and wait until the worker accepted it. A `task: embed` backend
        refuses chat and completions before loading anything."""
        if kind != "embeddings" and self.spec.task == "embed":
            raise InvalidRequest(embedding_only_message(self.model_id), param="model")
        keep_alive = parse_keep_alive(request.keep_alive) if request.keep_alive is not None else None
        stream = await self._submit(kind, request.model_dump_json(exclude_unset=True).encode(), keep_alive)
        try:
            await stream.started()
        except BaseException:
            await stream.aclose()
            raise
        return stream

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion:
        stream = await self._open("chat", request)
        return await responses.chat_completion(request, stream.prompt_tokens, stream, stream.tool_format)

    async def chat_stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        stream = await self._open("chat", request)
        async with aclosing(responses.chat_chunks(request, stream.prompt_tokens, stream, stream.tool_format)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def completion(self, request: CompletionRequest) -> Completion:
        stream = await self._open("completions", request)
        return await responses.completion(request, stream.prompt_tokens, stream.prompt_text, stream)

    async def completion_stream(self, request: CompletionRequest) -> AsyncIterator[Completion]:
        stream = await self._open("completions", request)
        async with aclosing(responses.completion_chunks(request, stream.prompt_tokens, stream.prompt_text, stream)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def embeddings(self, request: EmbeddingRequest) -> EmbeddingResponse:
        """Pooled in the worker (loaded on demand, `keep_alive` honoured as for a chat), the
        answer back in one message; a client that leaves aborts it there."""
        stream = await self._open("embeddings", request)
        try:
            answer = await stream.result()
        except BaseException:
            await stream.aclose()  # an Abort unless it already ended
            raise
        vectors = [np.frombuffer(v, dtype="<f4") for v in answer.vectors]
        return build_response(request.model, vectors, answer.prompt_tokens, request.encoding_format)

class WorkerBackend(LocalModelBackend):
    """A local backend (llamacpp, paged) whose model runs in a supervised worker process."""

    def __init__(
        self,
        spec: m.WorkerSpec,
        *,
        keep_alive_s: float,
        preload: bool = False,
        context_window: int | None = None,
        max_running: int = 1,
        block_size: int = 0,
        model_path: Path | None = None,
        before_load: Callable[[WorkerBackend], Awaitable[None]] | None = None,
        on_worker_exit: Callable[[int, str], None] | None = None,
    ) -> None:
        self.spec = spec
        self.on_worker_exit = on_worker_exit  # the engine host tells the HTTP processes sharing it
        self.name = spec.name
        self.model_id = spec.model_id
        self.keep_alive_s = keep_alive_s
        self.preload = preload
        self.before_load = before_load
        self.state: State = "unloaded"
        self.restarts = 0  # workers started again after a crash
        self.last_exit: str | None = None  # why the last worker ended, when it was not asked to
        self.load_error: str | None = None
        self.last_used = 0.0  # monotonic time of the last request's start
        self.expires_at: float | None = None  # wall-clock time the idle model unloads at
        self._context_window = context_window
        self._max_running = max_running
        self._block_size = block_size
        self._model_path = model_path
        self._worker: WorkerProcess | None = None
        self._started_at = 0.0
        self._crashes_in_a_row = 0
        self._in_flight = 0
        self._next_keep_alive: float | None = None
        self._last_load: m.Load | None = None
        self._last_rss = 0
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load now with `preload`; otherwise on the first request."""
        if self.preload:
            await self.ensure_loaded()

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await self.unload()

    async def unload(self) -> None:
        """Stop the worker (its requests, if any, are aborted)."""
        self._cancel_timer()
        worker, self._worker = self._worker, None
        if self.state in ("ready", "loading"):
            self.state = "unloaded"
        self.expires_at = None
        if worker is not None:
            await worker.stop()

    @property
    def address(self) -> str:
        """The loaded worker's inbox ("" when none), where HTTP processes sharing it connect."""
        return self._worker.address if self._worker is not None and self.state == "ready" else ""

    # -- the Backend protocol -----------------------------------------------------------------------

    @property
    def context_window(self) -> int | None:
        ready = self._worker.ready if self._worker is not None else None
        return ready.context_window if ready is not None else self._context_window

    # -- residency ------------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def pid(self) -> int | None:
        return self._worker.pid if self._worker is not None and self._worker.alive else None

    def memory_bytes(self) -> int:
        """The worker's resident memory when loaded; before that, what it used last time
        or, never loaded, the size of its model file."""
        if self.state == "ready" and self._last_load is not None:
            return self._last_load.rss_bytes
        if self._last_rss:
            return self._last_rss
        try:
            return self._model_path.stat().st_size if self._model_path else 0
        except OSError:
            return 0

    # -- internals --------------------------------------------------------------------------------------

    async def _submit(self, kind: str, body: bytes, keep_alive: float | None) -> RequestStream:
        worker = await self.acquire()
        try:
            return worker.submit(kind, body, on_end=lambda: self.release(keep_alive))
        except BaseException:
            self.release(keep_alive)
            raise

    async def acquire(self) -> WorkerProcess:
        """The loaded worker, holding it for one request until `release` (no keep_alive
        expiry meanwhile)."""
        worker = await self.ensure_loaded()
        self._in_flight += 1
        self._cancel_timer()
        self.last_used = time.monotonic()
        return worker

    async def ensure_loaded(self) -> WorkerProcess:
        """The loaded worker, loading it first (a restarting one answers 503 with Retry-After)."""
        if self.state == "ready" and self._worker is not None:
            return self._worker
        if self.state == "restarting":
            raise Overloaded(
                f"backend {self.name!r} is restarting after its engine worker died ({self.last_exit})",
                retry_after=self._backoff_s(),
            )
        async with self._lock:
            if self.state == "ready" and self._worker is not None:
                return self._worker
            if self._closed:
                raise Overloaded(f"backend {self.name!r} is shutting down")
            if self.before_load is not None:
                await self.before_load(self)
            self.state = "loading"
            worker = WorkerProcess(self.spec, on_load=self._on_load, on_exit=lambda rc: self._on_exit(worker, rc))
            try:
                await worker.start(LOAD_TIMEOUT_S)
            except LoadError as exc:
                self.state, self.load_error = "failed", exc.message
                log.error("%s", exc.message)
                self._spawn(worker.stop())
                raise
            except BaseException:
                self.state = "unloaded"
                self._spawn(worker.kill())
                raise
            self._worker, self.state, self.load_error = worker, "ready", None
            self._started_at = time.monotonic()
            detail = f", {worker.ready.detail}" if worker.ready and worker.ready.detail else ""
            log.info("%s: loaded %s in worker pid %s%s", self.name, self.spec.model, worker.pid, detail)
            if self._in_flight == 0:
                self._arm_timer(None)
            return worker

    def _on_load(self, report: m.Load) -> None:
        self._last_load = report
        self._last_rss = report.rss_bytes

    def _on_exit(self, worker: WorkerProcess, returncode: int) -> None:
        """The worker process ended. Unless we stopped it, restart it after a backoff."""
        if self.on_worker_exit is not None and worker.pid is not None:
            self.on_worker_exit(worker.pid, exit_reason(returncode))
        if worker is not self._worker or self.state != "ready":
            return  # stopped on purpose, or died while loading (start() reports that)
        self._worker = None
        self._spawn(worker.stop())  # close its sockets
        reason = exit_reason(returncode)
        self.last_exit = reason
        lived = time.monotonic() - self._started_at
        self._crashes_in_a_row = 1 if lived >= STABLE_AFTER_S else self._crashes_in_a_row + 1
        delay = self._backoff_s()
        self.state = "restarting"
        # Once per exit, not once per request: the requests get their own 502s.
        log.error("%s: engine worker pid %s died (%s); restarting in %.1f s", self.name, worker.pid, reason, delay)
        self._spawn(self._restart_after(delay))

    def _backoff_s(self) -> float:
        return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(0, self._crashes_in_a_row - 1))

    async def _restart_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._closed:
            return
        self.state = "unloaded"
        self.restarts += 1
        try:
            await self.ensure_loaded()
        except Exception as exc:  # reported by ensure_loaded; the next request tries again
            log.debug("%s: restart failed: %s", self.name, exc)

    def release(self, keep_alive: float | None) -> None:
        """A request that `acquire` counted ended; its keep_alive, if it gave one, wins."""
        self._in_flight -= 1
        self._next_keep_alive = keep_alive  # the last request's keep_alive wins, as in Ollama
        if self._in_flight == 0 and self.state == "ready":
            self._arm_timer(self._next_keep_alive)

    def _arm_timer(self, keep_alive: float | None) -> None:
        """Unload after `keep_alive` idle seconds (the backend's default when None)."""
        self._cancel_timer()
        seconds = self.keep_alive_s if keep_alive is None else keep_alive
        if seconds < 0:
            self.expires_at = None
            return
        self.expires_at = time.time() + seconds
        self._timer = asyncio.get_running_loop().call_later(seconds, lambda: self._spawn(self._expire()))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.expires_at = None

    async def _expire(self) -> None:
        if self._in_flight == 0 and self.state == "ready":
            log.info("%s: unloading %s (idle past keep_alive)", self.name, self.spec.model)
            await self.unload()

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
