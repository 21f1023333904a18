"""The local backends of one HTTP process of `turnout serve --workers N`: each shares an
engine worker that the engine host supervises (gateway/engine_host.py) with the other HTTP
processes, as vLLM's API servers share one EngineCore.

Loading, keep_alive, the memory budget and restarts are the host's (an `Open` per request,
an `End` when it is done); the request's tokens go straight between this process and the
worker over a pipe of its own (backends/worker/pipe.py), so that HTTP and SSE work is spread
over N processes and never shares an interpreter with the engine's loop."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from backends.protocol import Overloaded
from backends.worker import control as c
from backends.worker import messages as m
from backends.worker.backend import LOAD_TIMEOUT_S, LocalModelBackend, State
from backends.worker.pipe import RequestStream, WorkerPipe, error_from, pid_alive

log = logging.getLogger("turnout.worker")

HELLO_INTERVAL_S = 1.0  # a restarted host learns of us again within this
CALL_TIMEOUT_S = LOAD_TIMEOUT_S + 30.0  # an Open may wait for a model load; nothing waits longer
HOST_WATCH_S = 0.5


class EngineHostClient:
    """This process's line to the engine host: calls (`Open`, `Unload`) with their replies,
    `End`s, and the host's broadcasts (`Residents`, `Exited`) handed to the backends."""

    def __init__(self, address: str, host_pid: int) -> None:
        self.address = address
        self.host_pid = host_pid
        self.client = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._backends: dict[str, SharedWorkerBackend] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._to: zmq.asyncio.Socket | None = None
        self._from: zmq.asyncio.Socket | None = None
        self._dir: Path | None = None

    def attach(self, backend: SharedWorkerBackend) -> None:
        """Start (once, inside the serving loop) and route the host's news about `backend` to it."""
        self._backends[backend.name] = backend
        if self._tasks:
            return
        self._dir = Path(tempfile.mkdtemp(prefix="turnout-host-client-"))
        reply_address = f"ipc://{self._dir}/from-host"
        ctx = zmq.asyncio.Context.instance()
        self._to, self._from = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        for sock in (self._to, self._from):
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.LINGER, 0)
        self._from.bind(reply_address)
        self._to.connect(self.address)
        hello = m.Hello(self.client, os.getpid(), reply_address)
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._keep_in_touch(hello))]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for sock in (self._to, self._from):
            if sock is not None:
                sock.close(0)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    async def open(self, model: c.LocalModel, *, hold: bool, budget_bytes: int | None) -> c.Opened:
        """The model loaded (by the host, if it was not), held for one request with `hold`."""
        return await self._call(lambda call: c.Open(call, self.client, model, hold, budget_bytes))

    async def unload(self, name: str) -> None:
        await self._call(lambda call: c.Unload(call, self.client, name))

    def end(self, lease: int, keep_alive: float | None) -> None:
        if lease and self._to is not None:
            self._send(c.End(lease, keep_alive))

    async def _call(self, build: Any) -> Any:
        call = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call] = future
        try:
            self._send(build(call))
            async with asyncio.timeout(CALL_TIMEOUT_S):
                reply = await future
        except TimeoutError:
            raise Overloaded("the engine host did not answer in time", retry_after=5.0) from None
        finally:
            self._calls.pop(call, None)
        if type(reply) is c.Refused:
            raise error_from(m.Failed("", reply.status, reply.type, reply.message, reply.code, None, reply.retry_after))
        return reply

    def _send(self, message: c.ToHost) -> None:
        assert self._to is not None
        self._to.send(c.to_host_encoder.encode(message), copy=False)

    async def _read(self) -> None:
        assert self._from is not None
        while True:
            message = c.from_host_decoder.decode(await self._from.recv())
            kind = type(message)
            if kind is c.Residents:
                self.host_pid = message.host_pid  # type: ignore[union-attr]
                views = {r.name: r for r in message.residents}  # type: ignore[union-attr]
                for name, backend in self._backends.items():
                    backend.observe(views.get(name))  # None: a (new) host that has not built it
            elif kind is c.Exited:
                backend = self._backends.get(message.name)  # type: ignore[union-attr]
                if backend is not None:
                    backend.worker_exited(message.pid, message.reason)  # type: ignore[union-attr]
            else:
                future = self._calls.get(message.call)  # type: ignore[union-attr]
                if future is not None and not future.done():
                    future.set_result(message)

    async def _keep_in_touch(self, hello: m.Hello) -> None:
        """Say hello now and every second (a restarted host knows no one); and, while calls
        wait, make sure the host still exists, so that none waits for a reply that cannot come."""
        since = 0.0
        while True:
            if since <= 0:
                self._send(hello)
                since = HELLO_INTERVAL_S
            await asyncio.sleep(HOST_WATCH_S)
            since -= HOST_WATCH_S
            if self._calls and not pid_alive(self.host_pid):
                gone = Overloaded("the engine host (the local models' supervisor) is not running; it is being restarted", retry_after=1.0)
                for future in self._calls.values():
                    if not future.done():
                        future.set_exception(gone)


class SharedWorkerBackend(LocalModelBackend):
    """A local backend whose worker the engine host owns; see the module's docstring."""

    def __init__(self, model: c.LocalModel, host: EngineHostClient, budget_bytes: Any) -> None:
        self.model = model
        self.spec = model.spec
        self.name = model.spec.name
        self.model_id = model.spec.model_id
        self.state: State = "unloaded"
        self.restarts = 0
        self.last_exit: str | None = None
        self.load_error: str | None = None
        self.expires_at: float | None = None
        self._host = host
        self._budget_bytes = budget_bytes  # () -> int | None: the budget of the policy now in force
        self._view: c.Resident | None = None
        self._pipe: WorkerPipe | None = None
        self._last_load: m.Load | None = None
        self._block_size = model.block_size
        self._max_running = model.max_running
        self._opening = 0  # requests of ours waiting for the host's Opened

    async def start(self) -> None:
        self._host.attach(self)
        if self.model.preload:
            await self._host.open(self.model, hold=False, budget_bytes=self._budget_bytes())

    async def close(self) -> None:
        """Leave the model to the host: other HTTP processes may be using it."""
        if self._pipe is not None:
            await self._pipe.close()
            self._pipe = None

    async def unload(self) -> None:
        await self._host.unload(self.name)

    # -- the host's view ------------------------------------------------------------------------

    @property
    def context_window(self) -> int | None:
        if self._view is not None and self._view.context_window:
            return self._view.context_window
        return self.model.context_window

    @property
    def in_flight(self) -> int:
        return self._view.in_flight if self._view is not None else self._opening

    @property
    def pid(self) -> int | None:
        return self._view.pid if self._view is not None else None

    def memory_bytes(self) -> int:
        return self._view.memory_bytes if self._view is not None else 0

    def observe(self, view: c.Resident | None) -> None:
        """The host's latest word on this model (None: it knows nothing of it, so unloaded)."""
        if view is None:
            view = c.Resident(self.name, "unloaded", None, "", 0, None, self._opening, 0, None, None, None)
        self._view = view
        self.state = view.state  # type: ignore[assignment]
        self.restarts, self.last_exit, self.load_error, self.expires_at = view.restarts, view.last_exit, view.load_error, view.expires_at
        if view.state == "ready" and view.pid and (self._pipe is None or self._pipe.worker_pid != view.pid):
            self._connect(view.pid, view.address)  # load reports flow before our first request

    def worker_exited(self, pid: int, reason: str) -> None:
        if self._pipe is not None and self._pipe.worker_pid == pid:
            self._pipe.fail_all(f"backend {self.name!r}: its engine worker died ({reason}); the request was not completed")
            self._last_load = None

    # -- requests ----------------------------------------------------------------------------------

    async def _submit(self, kind: str, body: bytes, keep_alive: float | None) -> RequestStream:
        self._host.attach(self)
        self._opening += 1
        try:
            opened = await self._host.open(self.model, hold=True, budget_bytes=self._budget_bytes())
        finally:
            self._opening -= 1
        if self.state != "ready":
            self.state = "ready"  # the next Residents says more; the load is done, the caller may know
        pipe = self._connect(opened.pid, opened.address)
        try:
            return pipe.submit(kind, body, on_end=lambda: self._host.end(opened.lease, keep_alive))
        except BaseException:
            self._host.end(opened.lease, keep_alive)
            raise

    def _connect(self, pid: int, address: str) -> WorkerPipe:
        """This process's pipe to the worker `pid` (a new one when the worker is new)."""
        pipe = self._pipe
        if pipe is not None and pipe.worker_pid == pid and pipe.error is None:
            return pipe
        if pipe is not None:  # its worker is gone, whether or not the host has said so yet
            pipe.fail_all(f"backend {self.name!r}: its engine worker was replaced; the request was not completed")
            asyncio.ensure_future(pipe.close())
        self._pipe = WorkerPipe(self.name, address, on_load=self._on_load, client=self._host.client, watch_pid=pid)
        return self._pipe

    def _on_load(self, report: m.Load) -> None:
        self._last_load = report
