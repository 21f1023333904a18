"""The engine host: with `turnout serve --workers N`, the one process that supervises the local
models the N HTTP processes share (`python -m gateway.engine_host ADDRESS`, started and, if it
dies, restarted by `turnout serve`'s parent process).

It runs the same WorkerBackend supervisors a single serving process runs (load on demand,
keep_alive, the memory budget, restarts with backoff), built from the definitions the HTTP
processes send with each `Open` (backends/worker/control.py), and tells every HTTP process
what it knows: each model's state twice a second and at once on a change, and each worker's
exit. It never sees a token."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from backends.protocol import BackendError, Overloaded
from backends.worker import control as c
from backends.worker import messages as m
from backends.process_exit import exit_reason
from backends.worker.backend import BACKOFF_BASE_S, BACKOFF_MAX_S, STABLE_AFTER_S, WorkerBackend
from backends.worker.pipe import pid_alive
from backends.worker.server import die_with_parent
from gateway.residency import ModelResidency

log = logging.getLogger("turnout.engine_host")

BROADCAST_INTERVAL_S = 0.5
RETIRE_WAIT_S = 600.0  # a replaced definition's worker serves its last requests this long at most


class EngineHost:
    """Serves Open/End/Unload from HTTP processes on one PULL socket; answers each on a PUSH
    socket connected to the address it said hello with."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.backends: dict[str, WorkerBackend] = {}
        self.residency = ModelResidency(None, lambda: self.backends.values())
        self._definitions: dict[str, c.LocalModel] = {}
        self._clients: dict[str, tuple[int, zmq.asyncio.Socket]] = {}
        self._leases: dict[int, tuple[str, WorkerBackend]] = {}
        self._lease_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._news = False  # a Residents broadcast is due at the next turn of the loop
        self._ctx = zmq.asyncio.Context.instance()
        self._inbox = self._ctx.socket(zmq.PULL)
        self._inbox.setsockopt(zmq.RCVHWM, 0)
        self._inbox.bind(address)

    async def serve(self) -> None:
        """Until cancelled (SIGTERM): then every worker is stopped."""
        ticker = asyncio.create_task(self._tick())
        try:
            while True:
                message = c.to_host_decoder.decode(await self._inbox.recv())
                kind = type(message)
                if kind is m.Hello:
                    self._join(message)  # type: ignore[arg-type]
                elif kind is c.Open:
                    self._spawn(self._open(message))  # type: ignore[arg-type]
                elif kind is c.End:
                    self._end(message.lease, message.keep_alive)  # type: ignore[union-attr]
                elif kind is c.Unload:
                    self._spawn(self._unload(message))  # type: ignore[arg-type]
        finally:
            ticker.cancel()
            await asyncio.gather(*(b.close() for b in self.backends.values()), return_exceptions=True)
            self._inbox.close(0)
            for _, sock in self._clients.values():
                sock.close(0)

    # -- clients ---------------------------------------------------------------------------------

    def _join(self, hello: m.Hello) -> None:
        if hello.client in self._clients:
            return
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(hello.address)
        self._clients[hello.client] = (hello.pid, sock)
        self._send(hello.client, self._residents())

    def _send(self, client: str, message: c.FromHost) -> None:
        entry = self._clients.get(client)
        if entry is not None:
            entry[1].send(c.from_host_encoder.encode(message), copy=False)

    def _broadcast(self, message: c.FromHost) -> None:
        data = c.from_host_encoder.encode(message)
        for _, sock in self._clients.values():
            sock.send(data, copy=False)

    async def _tick(self) -> None:
        """The periodic Residents, and the leases of HTTP processes that died (their requests
        will never End; the workers abort those requests themselves)."""
        while True:
            await asyncio.sleep(BROADCAST_INTERVAL_S)
            for client, (pid, sock) in list(self._clients.items()):
                if not pid_alive(pid):
                    del self._clients[client]
                    sock.close(0)
                    for lease, (owner, _) in list(self._leases.items()):
                        if owner == client:
                            self._end(lease, None)
            self._broadcast(self._residents())

    # -- calls -----------------------------------------------------------------------------------

    async def _open(self, call: c.Open) -> None:
        self.residency.budget_bytes = call.budget_bytes  # the policy in force in the HTTP processes
        backend = self._backend(call.model)
        try:
            if call.hold:
                await backend.acquire()
                lease = next(self._lease_ids)
                self._leases[lease] = (call.client, backend)
            else:
                await backend.ensure_loaded()
                lease = 0
        except BackendError as exc:
            self._send(call.client, _refused(call.call, exc))
            return
        except Exception as exc:  # a bug here must not leave the request waiting for an answer
            log.exception("opening %s failed", call.model.spec.name)
            self._send(call.client, c.Refused(call.call, 500, "server_error", f"the engine host failed: {type(exc).__name__}: {exc}"))
            return
        finally:
            self._changed()
        self._send(call.client, c.Opened(call.call, lease, backend.pid or 0, backend.address, backend.context_window or 0))

    def _end(self, lease: int, keep_alive: float | None) -> None:
        entry = self._leases.pop(lease, None)
        if entry is not None:
            entry[1].release(keep_alive)
            self._changed()

    async def _unload(self, call: c.Unload) -> None:
        try:
            backend = self.backends.get(call.name)
            if backend is not None:
                await backend.unload()
        finally:  # answered whatever happened: the caller is waiting
            self._changed()
            self._send(call.client, c.Done(call.call))

    def _backend(self, model: c.LocalModel) -> WorkerBackend:
        """The supervisor for this definition; a changed definition (a policy reload) gets a
        new one, and the old one stops once its last request is done."""
        name = model.spec.name
        if self._definitions.get(name) == model:
            return self.backends[name]
        old = self.backends.get(name)
        if old is not None:
            self._spawn(self._retire(old))
        backend = WorkerBackend(
            model.spec,
            keep_alive_s=model.keep_alive_s,
            preload=model.preload,
            context_window=model.context_window,
            max_running=model.max_running,
            block_size=model.block_size,
            model_path=Path(model.model_path) if model.model_path else None,
            before_load=self.residency.before_load,
            on_worker_exit=lambda pid, reason: self._worker_exited(name, pid, reason),
        )
        self.backends[name], self._definitions[name] = backend, model
        return backend

    async def _retire(self, backend: WorkerBackend) -> None:
        for _ in range(int(RETIRE_WAIT_S / BROADCAST_INTERVAL_S)):
            if backend.in_flight == 0:
                break
            await asyncio.sleep(BROADCAST_INTERVAL_S)
        await backend.close()

    def _worker_exited(self, name: str, pid: int, reason: str) -> None:
        self._broadcast(c.Exited(name, pid, reason))
        self._changed()

    def _changed(self) -> None:
        """Tell every client the new state soon: one broadcast for whatever changed this turn."""
        if not self._news:
            self._news = True
            asyncio.get_running_loop().call_soon(self._announce)

    def _announce(self) -> None:
        self._news = False
        self._broadcast(self._residents())

    def _residents(self) -> c.Residents:
        return c.Residents(
            os.getpid(),
            [
                c.Resident(
                    b.name, b.state, b.pid, b.address, b.memory_bytes() if b.loaded else 0, b.expires_at, b.in_flight,
                    b.restarts, b.last_exit, b.load_error, b.context_window,
                )  # fmt: skip
                for b in self.backends.values()
            ],
        )

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _refused(call: int, exc: BackendError) -> c.Refused:
    retry = exc.retry_after if isinstance(exc, Overloaded) else None
    return c.Refused(call, exc.status, exc.type, exc.message, exc.code, retry)


async def amain(address: str) -> int:
    host = EngineHost(address)
    task = asyncio.create_task(host.serve())
    loop = asyncio.get_running_loop()
    # SIGTERM from the parent stops it; a terminal's Ctrl-C reaches the whole process group,
    # and the parent, which hears it too, decides (a host that left first would be restarted).
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        await task
    except asyncio.CancelledError:
        pass
    return 0


class HostSupervisor:
    """The parent's side (`turnout serve --workers N`): start the engine host, start another
    with backoff if it dies (the HTTP processes' next Open tells it what to load), and stop it
    when the server stops. The host dies with the parent (PDEATHSIG), its workers with it."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="turnout-host-")
        self.address = f"ipc://{self._dir}/host"
        self._stopping = threading.Event()
        self._proc = self._spawn()
        self._thread = threading.Thread(target=self._watch, name="engine-host-watch", daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "gateway.engine_host", self.address], preexec_fn=die_with_parent)

    def _watch(self) -> None:
        crashes = 0
        while True:
            started = time.monotonic()
            rc = self._proc.wait()
            if self._stopping.is_set():
                return
            crashes = 1 if time.monotonic() - started >= STABLE_AFTER_S else crashes + 1
            delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (crashes - 1))
            log.error("engine host pid %s exited (%s); starting another in %.1f s", self._proc.pid, exit_reason(rc), delay)
            if self._stopping.wait(delay):
                return
            self._proc = self._spawn()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the host (it stops its workers) and wait for it."""
        self._stopping.set()
        self._proc.terminate()
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


def main(argv: list[str]) -> int:
    """Entry point of `python -m gateway.engine_host ADDRESS`."""
    from gateway.cli import configure_logging

    configure_logging()
    (address,) = argv
    return asyncio.run(amain(address))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
