"""One incarnation of an engine worker, seen from the process that owns it: spawn it, hold
the owner's pipe to it (backends.worker.pipe), and notice when it exits.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from backends.process_exit import exit_reason
from backends.worker import messages as m
from backends.worker.pipe import LoadError, RequestStream, WorkerPipe

log = logging.getLogger("turnout.worker")

REPO_ROOT = Path(__file__).resolve().parents[2]


class WorkerProcess:
    """A worker process and its owner's pipe. `start()` returns once the model is loaded.
    `address` is the worker's inbox, where clients sharing it connect."""

    def __init__(self, spec: m.WorkerSpec, on_load: Callable[[m.Load], None], on_exit: Callable[[int], None]) -> None:
        self.spec = spec
        self.on_exit = on_exit
        self.proc: asyncio.subprocess.Process | None = None
        self.returncode: int | None = None
        self.ready: m.Ready | None = None
        self._ready: asyncio.Future[m.Ready] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="turnout-worker-"))
        self.address = f"ipc://{self._dir}/in"
        self.pipe = WorkerPipe(spec.name, self.address, on_load=on_load, on_control=self._on_control)
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
            sys.executable, "-m", "backends.worker", spec_json, self.address, self.pipe.address,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))},
            stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        self._tasks = [asyncio.create_task(self._wait())]
        try:
            async with asyncio.timeout(timeout_s):
                self.ready = await self._ready
        except TimeoutError:
            await self.kill()
            raise LoadError(f"backend {self.spec.name!r}: model {self.spec.model!r} did not load within {timeout_s:g} s") from None
        return self.ready

    def submit(self, kind: str, body: bytes, on_end: Callable[[], None]) -> RequestStream:
        """Send a request; its outputs arrive on the returned stream."""
        return self.pipe.submit(kind, body, on_end)

    @property
    def in_flight(self) -> int:
        return self.pipe.in_flight

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the worker to finish (its requests are aborted), then kill it if it lingers."""
        if self.alive:
            self.pipe.send(m.Shutdown())
            try:
                async with asyncio.timeout(timeout_s):
                    await asyncio.shield(self._tasks[0])
            except TimeoutError:
                await self.kill()
        await self._cleanup()

    async def kill(self) -> None:
        if self.alive:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):  # it died before its exit was reaped
                self.proc.kill()
            await asyncio.shield(self._tasks[0])
        await self._cleanup()

    async def _cleanup(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pipe.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _on_control(self, message: Any) -> None:
        if self._ready is None or self._ready.done():
            return
        if type(message) is m.Ready:
            self._ready.set_result(message)
        elif type(message) is m.LoadFailed:
            self._ready.set_exception(LoadError(f"backend {self.spec.name!r} could not load model {self.spec.model!r}: {message.message}"))

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
        self.pipe.fail_all(f"backend {self.spec.name!r}: its engine worker died ({reason}); the request was not completed")
        self.on_exit(rc)
