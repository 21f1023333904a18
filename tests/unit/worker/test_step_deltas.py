"""A direct engine's step leaves the worker as one message per client: that client's deltas in
one StepDeltas, then its failures, then (when a request started or ended) a load report."""

from __future__ import annotations

import os
from types import SimpleNamespace

import zmq
import zmq.asyncio

from backends.generation import GenerationDelta
from backends.protocol import InvalidRequest, LoadReport
from backends.worker import messages as m
from backends.worker.server import OWNER, WorkerServer


async def test_a_step_goes_to_each_client_as_one_message() -> None:
    ctx = zmq.Context()  # as the worker's: plain sockets to the clients
    owner, http = ctx.socket(zmq.PULL), ctx.socket(zmq.PULL)
    owner.bind("inproc://owner")
    http.bind("inproc://http")
    for sock in (owner, http):
        sock.setsockopt(zmq.RCVTIMEO, 5000)  # a message that never comes fails the test
    inbox = zmq.asyncio.Context.shadow(ctx).socket(zmq.PULL)
    backend = SimpleNamespace(name="paged", load=lambda: LoadReport(running=2))
    server = WorkerServer(backend, inbox, ctx, "inproc://owner")  # type: ignore[arg-type]
    server._join("http-1", os.getpid(), "inproc://http")
    for rid, client in (("a", OWNER), ("b", "http-1"), ("c", "http-1"), ("d", OWNER)):
        server._client_of[rid] = client
        server._in_engine.add(rid)
    server._fresh.add("c")
    try:
        # A step of plain deltas for requests that had tokens before: no load report.
        server.deliver([("a", GenerationDelta("x", [1])), ("b", GenerationDelta("y", [2]))])
        assert m.from_worker_decoder.decode(owner.recv()) == [m.StepDeltas(["a"], [GenerationDelta("x", [1])])]
        assert m.from_worker_decoder.decode(http.recv()) == [m.StepDeltas(["b"], [GenerationDelta("y", [2])])]

        # c's first token, b's last, d's failure: each client's deltas, then its failures, then
        # the load report every client gets.
        final = GenerationDelta("", [], "stop", final=True)
        server.deliver([("c", GenerationDelta("z", [3])), ("d", InvalidRequest("bad")), ("b", final)])
        to_owner = m.from_worker_decoder.decode(owner.recv())
        to_http = m.from_worker_decoder.decode(http.recv())
        assert [type(msg) for msg in to_owner] == [m.Failed, m.Load]
        assert to_owner[0].request_id == "d" and to_owner[0].status == 400 and to_owner[1].running == 2
        assert to_http[:1] == [m.StepDeltas(["c", "b"], [GenerationDelta("z", [3]), final])] and type(to_http[1]) is m.Load
        assert server._client_of == {"a": OWNER, "c": "http-1"} and server._in_engine == {"a", "c"} and not server._fresh
    finally:
        for sock in server._clients.values():
            sock.close(0)
        for sock in (owner, http, inbox):
            sock.close(0)
        ctx.term()
