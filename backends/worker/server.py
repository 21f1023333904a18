"""The worker's side of the pipe: build one LocalBackend, then serve requests from the
gateway until told to stop or orphaned.

Run as `python -m backends.worker SPEC_JSON IN_ADDR OWNER_ADDR` by `backends.worker.process`:
it binds IN_ADDR, where every client's requests arrive, and sends its owner's outputs to
OWNER_ADDR; HTTP processes sharing the worker say `Hello` with an address of their own.
Each request is a task: validate, render and tokenize in a thread (CPU work proportional to
the request must not stall the other streams), then run it. A paged engine (`DirectEngine`)
then sends each step's deltas to the pipe from its own thread, one message a step; other
engines' deltas are forwarded by the task, and everything queued in one turn of the loop
goes out as one message."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
import sys
import threading
from contextlib import aclosing
from typing import Any, Protocol, runtime_checkable

import msgspec
import zmq
import zmq.asyncio

from backends.generation import GenerationDelta, GenerationRequest
from backends.local import LocalBackend, Prepared
from backends.protocol import BackendError, ChatCompletionRequest, CompletionRequest, Overloaded
from backends.worker import messages as m
from backends.worker.pipe import pid_alive

log = logging.getLogger("turnout.worker")

LOAD_INTERVAL_BUSY_S = 0.1  # load reports while requests run: fresh enough for routing
LOAD_INTERVAL_IDLE_S = 0.5  # and the heartbeat when idle
LARGE_BODY_BYTES = 64 * 1024  # requests above this are prepared with the cyclic GC paused
# Requests the gateway aborted (its client left) while they were still being prepared or run;
# carried in every load report's stats and exported by the gateway as `..._total` on /metrics.
ABORTED = "turnout:requests_aborted"
_PR_SET_PDEATHSIG = 1
OWNER = ""  # the client name of the process that started the worker


def build_backend(spec: m.WorkerSpec) -> LocalBackend:
    """The in-process backend a spec describes (model code is imported only here)."""
    if spec.kind == "llamacpp":
        from backends.llamacpp.runner import LlamaCppBackend

        return LlamaCppBackend(name=spec.name, model=spec.model, model_id=spec.model_id, task=spec.task, **spec.options)
    if spec.kind == "paged":
        from backends.paged.backend import PagedBackend

        return PagedBackend(
            name=spec.name, model=spec.model, model_id=spec.model_id, task=spec.task, on_rank_failure=_rank_failed, **spec.options
        )  # fmt: skip
    raise ValueError(f"kind {spec.kind!r} has no engine worker")


def _rank_failed(reason: str) -> None:
    """A tensor-parallel rank of the engine died: the engine cannot run a step (NCCL would
    wait out its timeout), so this worker exits, its requests get clean errors in the gateway,
    and the gateway starts it again with fresh ranks (the other ranks follow us out)."""
    log.error("tensor-parallel %s; the engine worker exits to be restarted", reason)
    logging.shutdown()
    os._exit(70)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        return 0


@runtime_checkable
class DirectEngine(Protocol):
    """A backend whose engine thread hands each step's outputs to a sink itself (paged): the
    worker then writes them to the pipe from that thread, with no event loop per token."""

    def submit(self, request: GenerationRequest, sink: Any, token: Any) -> None: ...

    def abort_request(self, request_id: str) -> None: ...


class WorkerServer:
    """Serves one backend to its clients: requests come in on one PULL socket, each client's
    outputs go out on a PUSH socket connected to that client's address. The owner (the
    process that started the worker) is a client from the start; HTTP processes sharing the
    worker join with `Hello`."""

    def __init__(self, backend: LocalBackend, inbox: zmq.asyncio.Socket, ctx: zmq.Context[Any], owner_address: str) -> None:
        self.backend = backend
        self.inbox = inbox
        self._ctx = ctx
        self._send_lock = threading.Lock()  # the loop and a direct engine's thread both send
        self._clients: dict[str, zmq.Socket[Any]] = {}  # plain sockets: sends never block (no high-water mark)
        self._client_pids: dict[str, int] = {}
        self._client_of: dict[str, str] = {}  # request -> the client its outputs go to
        self._pending: dict[str, list[Any]] = {}
        self._flush_scheduled = False
        self._tasks: dict[str, asyncio.Task[None]] = {}  # requests being prepared or run here
        self._direct = backend if isinstance(backend, DirectEngine) else None
        self._in_engine: set[str] = set()  # requests a direct engine is running
        self._fresh: set[str] = set()  # ... that have not produced a token yet
        self.aborted = 0  # requests ended by an Abort from the gateway before they finished
        self._loop = asyncio.get_running_loop()
        self._parent = os.getppid()
        self._join(OWNER, self._parent, owner_address)

    # -- clients ------------------------------------------------------------------------------

    def _join(self, client: str, pid: int, address: str) -> None:
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.LINGER, 0 if client else 2000)  # the owner's last outputs may leave
        sock.connect(address)
        with self._send_lock:
            self._clients[client] = sock
            self._client_pids[client] = pid

    def _drop_departed(self) -> None:
        """An HTTP process that died leaves requests nobody reads: abort them, forget it."""
        for client, pid in list(self._client_pids.items()):
            if client == OWNER or pid_alive(pid):
                continue
            for rid, owner in list(self._client_of.items()):
                if owner == client and self._abort(rid):
                    self.aborted += 1
            with self._send_lock:
                self._client_pids.pop(client, None)
                sock = self._clients.pop(client, None)
            if sock is not None:
                sock.close(0)

    # -- output -------------------------------------------------------------------------------

    def send(self, message: Any, client: str = OWNER) -> None:
        """Queue a message for a client; everything queued in this turn of the loop goes out
        together, one ZeroMQ message per client."""
        self._pending.setdefault(client, []).append(message)
        self._schedule_flush()

    def broadcast(self, message: Any) -> None:
        """Queue a message (a load report) for every client."""
        for client in list(self._clients):
            self._pending.setdefault(client, []).append(message)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for client, batch in pending.items():
            self._send_now(client, batch)

    def _send_now(self, client: str, batch: list[Any]) -> None:
        data = m.from_worker_encoder.encode(batch)
        with self._send_lock:
            sock = self._clients.get(client)
            if sock is not None:  # else it left: nobody to tell
                sock.send(data, copy=False)

    def deliver(self, items: list[tuple[Any, GenerationDelta | BaseException]]) -> None:
        """A direct engine's step outputs, on its thread: one message per client for the whole
        step, its deltas in one `StepDeltas`."""
        steps: dict[str, m.StepDeltas] = {}
        others: dict[str, list[Any]] = {}  # failures, then a load report
        changed = False  # a request took its first blocks or gave them back: report load
        client_of, fresh = self._client_of, self._fresh
        for rid, item in items:
            client = client_of.get(rid, OWNER)
            if type(item) is not GenerationDelta:
                others.setdefault(client, []).append(_failed(rid, item, self.backend.name))
                self._end_direct(rid)
                changed = True
                continue
            step = steps.get(client)
            if step is None:
                step = steps[client] = m.StepDeltas([], [])
            step.request_ids.append(rid)
            step.deltas.append(item)
            if rid in fresh:
                fresh.discard(rid)
                changed = True
            if item.final:
                self._end_direct(rid)
                changed = True
        if changed:
            load = self.load_message()
            for client in list(self._clients):
                others.setdefault(client, []).append(load)
        for client in steps.keys() | others.keys():
            step = steps.get(client)
            self._send_now(client, ([step] if step is not None else []) + others.get(client, []))

    def _end_direct(self, rid: str) -> None:
        self._in_engine.discard(rid)
        self._client_of.pop(rid, None)

    def load_message(self) -> m.Load:
        report = self.backend.load()
        stats = getattr(self.backend, "stats", None)
        engine_stats = stats() if callable(stats) else {}
        return m.Load(
            kv_usage=report.kv_usage,
            kv_free_blocks=report.kv_free_blocks,
            block_size=report.block_size,
            running=report.running,
            waiting=report.waiting,
            max_running=report.max_running,
            prefix_cache_hit_rate=report.prefix_cache_hit_rate,
            healthy=report.healthy,
            rss_bytes=_rss_bytes(),
            stats={**engine_stats, ABORTED: float(self.aborted)},
        )

    # -- the loop --------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Until Shutdown, or until the gateway that started us is gone."""
        reporter = asyncio.create_task(self._report_load())
        try:
            while True:
                for message in m.to_worker_decoder.decode(await self.inbox.recv()):
                    if isinstance(message, m.Submit):
                        self._client_of[message.request_id] = message.client
                        self._tasks[message.request_id] = asyncio.create_task(self._run(message))
                    elif isinstance(message, m.Hello):
                        self._join(message.client, message.pid, message.address)
                        self.send(self.load_message(), message.client)
                    elif isinstance(message, m.Abort):
                        if self._abort(message.request_id):
                            self.aborted += 1
                    else:
                        return
        finally:
            reporter.cancel()
            for rid in list(self._tasks) + list(self._in_engine):
                self._abort(rid)
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            self._flush()

    def _abort(self, rid: str) -> bool:
        """Stop a request; False when it had already ended (an Abort that crossed its last delta)."""
        task = self._tasks.get(rid)
        if task is not None:
            task.cancel()  # closes the generation: the engine frees its blocks
            return True
        if self._direct is not None and rid in self._in_engine:
            self._end_direct(rid)
            self._fresh.discard(rid)
            self._direct.abort_request(rid)
            return True
        return False

    async def _report_load(self) -> None:
        while True:
            busy = self._tasks or self._in_engine
            await asyncio.sleep(LOAD_INTERVAL_BUSY_S if busy else LOAD_INTERVAL_IDLE_S)
            if os.getppid() != self._parent:  # orphaned (no PDEATHSIG off Linux): go
                os._exit(0)
            self._drop_departed()
            self.broadcast(self.load_message())

    async def _run(self, submit: m.Submit) -> None:
        if submit.kind == "embeddings":
            await self._run_embeddings(submit)
            return
        rid, client = submit.request_id, submit.client
        direct = False
        try:
            request, prepared = await asyncio.to_thread(self._prepare, submit)
            gen = prepared.gen
            echo = isinstance(request, CompletionRequest) and bool(request.echo)
            tools = prepared.tool_format.name if prepared.tool_format is not None else ""
            self.send(m.Started(rid, len(gen.prompt_tokens), prepared.prompt_text if echo else "", tools), client)
            if self._direct is not None:
                self._flush()  # Started leaves before the engine thread can send a token
                gen.request_id = rid  # aborts name it so
                self._in_engine.add(rid)
                self._fresh.add(rid)
                try:
                    self._direct.submit(gen, self, rid)
                except BaseException:
                    self._in_engine.discard(rid)
                    self._fresh.discard(rid)
                    raise
                direct = True
                return
            first = True
            async with aclosing(self.backend.generate(gen)) as deltas:
                async for delta in deltas:
                    self.send(m.Delta(rid, delta), client)
                    if first:  # the request now holds blocks: routers should know at once
                        first = False
                        self.broadcast(self.load_message())
        except asyncio.CancelledError:
            pass  # aborted by the gateway: nobody is listening
        except Exception as exc:
            self.send(_failed(rid, exc, self.backend.name), client)
        finally:
            self._tasks.pop(rid, None)
            if not direct:
                self._client_of.pop(rid, None)
                self.broadcast(self.load_message())  # rides with the last delta: fresh as the answer lands

    async def _run_embeddings(self, submit: m.Submit) -> None:
        """Tokenize and check in a thread, pool through the engine, answer in one message.
        An Abort cancels this task, which stops the engine's work and frees what it holds."""
        rid, client = submit.request_id, submit.client
        try:
            request = m.decode_embedding_request(submit.body)
            inputs = await asyncio.to_thread(self.backend.prepare_embeddings, request)
            tokens = sum(map(len, inputs))
            self.send(m.Started(rid, tokens), client)
            self.broadcast(self.load_message())
            vectors = self.backend.finish_embeddings(request, await self.backend.embed_tokens(inputs))
            self.send(m.Embedded(rid, [v.astype("<f4").tobytes() for v in vectors], tokens), client)
        except asyncio.CancelledError:
            pass  # aborted by the gateway: nobody is listening
        except Exception as exc:
            self.send(_failed(rid, exc, self.backend.name), client)
        finally:
            self._tasks.pop(rid, None)
            self._client_of.pop(rid, None)
            self.broadcast(self.load_message())

    def _prepare(self, submit: m.Submit) -> tuple[ChatCompletionRequest | CompletionRequest, Prepared]:
        """Validate, render, tokenize and check a request, in a thread: all of it grows with
        the request, and the loop meanwhile forwards other requests' deltas and aborts."""
        paused = len(submit.body) > LARGE_BODY_BYTES and gc.isenabled()
        if paused:  # its allocations would set off full collections, GIL held (gateway.body)
            gc.disable()
        try:
            request = m.decode_request(submit.kind, submit.body)
            prepared = self.backend.prepare(submit.kind, request)
        finally:
            if paused:
                gc.enable()
        return request, prepared


def _failed(rid: str, exc: BaseException, backend: str) -> m.Failed:
    """A request's error for the pipe: a BackendError keeps its OpenAI fields; anything else
    is a bug in the engine, logged here, and fails that request alone."""
    if isinstance(exc, BackendError):
        retry = exc.retry_after if isinstance(exc, Overloaded) else None
        return m.Failed(rid, exc.status, exc.type, exc.message, exc.code, exc.param, retry)
    log.error("%s: request %s failed", backend, rid, exc_info=exc)
    return m.Failed(rid, 500, "server_error", f"the engine failed: {type(exc).__name__}: {exc}")


def die_with_parent() -> None:
    """Linux: the kernel sends SIGKILL when the parent dies, so no worker outlives the gateway."""
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


async def amain(spec: m.WorkerSpec, in_addr: str, owner_addr: str) -> int:
    """Bind the inbox, load the model, then serve until told to stop."""
    ctx = zmq.Context()
    inbox = zmq.asyncio.Context.shadow(ctx).socket(zmq.PULL)
    inbox.setsockopt(zmq.RCVHWM, 0)
    inbox.bind(in_addr)  # clients that connect while the model loads are queued, not lost
    try:
        backend = build_backend(spec)
        await backend.start()
    except BaseException as exc:  # a load failure is an answer, not a crash loop
        log.exception("%s: could not load %s", spec.name, spec.model)
        owner = ctx.socket(zmq.PUSH)
        owner.connect(owner_addr)
        owner.send(m.from_worker_encoder.encode([m.LoadFailed(f"{type(exc).__name__}: {exc}")]))
        _close(inbox, ctx)
        return 1
    # As vLLM's engine core does once it is up: what the load built (the model's and the
    # tokenizer's objects, compiled kernels) lives as long as the worker, so later cyclic
    # collections, which the engine thread pays for mid-step, need not scan it again.
    gc.collect()
    gc.freeze()
    server = WorkerServer(backend, inbox, ctx, owner_addr)
    detail = getattr(backend, "cpu_variant", "")
    server.send(m.Ready(os.getpid(), backend.context_window, detail))
    server.send(server.load_message())
    try:
        await server.serve()
    finally:
        await backend.close()
        _close(inbox, ctx)
    return 0


def _close(inbox: zmq.asyncio.Socket, ctx: zmq.Context[Any]) -> None:
    """Close the pipe; the last outputs get two seconds to leave. The inbox belongs to the
    asyncio shadow of `ctx`, which `ctx.destroy()` does not see: left open, it blocks term."""
    inbox.close(linger=0)
    ctx.destroy(linger=2000)


def main(argv: list[str]) -> int:
    """Entry point of `python -m backends.worker`."""
    spec_json, in_addr, owner_addr = argv
    die_with_parent()
    logging.basicConfig(level=os.environ.get("TURNOUT_WORKER_LOG_LEVEL", "WARNING"), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = msgspec.json.decode(spec_json.encode(), type=m.WorkerSpec)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    return asyncio.run(amain(spec, in_addr, owner_addr))
