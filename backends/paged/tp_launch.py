"""Rank 0's side of tensor parallelism: start ranks 1..N-1, join their group, watch them, stop them.

The engine's own process is rank 0 (in the gateway's setup, the engine worker process, which
builds the engine in `PagedBackend.start()`): it serves a TCPStore on 127.0.0.1 (port chosen by
the kernel, so no two engines race for one), starts each other rank as
`python -m backends.paged.tp_worker` with the store's address in its environment
(MASTER_ADDR, MASTER_PORT), and sends it what to build (a pickled `RankSpec`) on its stdin.

No rank outlives rank 0: each keeps reading its stdin, whose write end only rank 0 holds, and
exits at end of file, which the kernel delivers as soon as rank 0 is gone, SIGKILL included.
(PR_SET_PDEATHSIG, which ties the engine worker to the gateway, fires when the *thread* that
started the child exits; the ranks are started from whichever thread builds the engine.)
The other way round, a watcher thread here notices a rank that exits while the group runs:
the next step fails with that reason (gloo notices a dead peer by itself; NCCL would wait out
its timeout), and `on_failure` is called, with which the engine worker exits so that the
gateway restarts it with fresh ranks.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from backends.paged.config import ModelConfig
from backends.paged.options import EngineOptions
from backends.paged.parallel import TensorParallel, destroy_tensor_parallel, init_tensor_parallel
from backends.process_exit import exit_reason

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
MASTER_ADDR = "127.0.0.1"
START_TIMEOUT_S = 300.0  # a rank's start-up: interpreter, torch, CUDA context
# The model's collectives; the ranks meet at a barrier after loading weights, so this is a
# step's time, never a load's.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
STOP_TIMEOUT_S = 15.0
WATCH_INTERVAL_S = 0.2
_LEN = struct.Struct("<q")


@dataclass
class RankSpec:
    """What rank `rank` builds: the model's source and shape, the engine options, the store."""

    rank: int
    size: int
    port: int
    source_kind: str
    source_location: str
    config: ModelConfig
    options: EngineOptions
    task: str


def ready_key(rank: int) -> str:
    """The store key a rank sets once it is up (before joining the process group)."""
    return f"turnout/tp/ready/{rank}"


def write_spec(stream: Any, spec: RankSpec) -> None:
    """A length-prefixed pickle (tp_worker.read_spec reads it back)."""
    data = pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LEN.pack(len(data)) + data)
    stream.flush()


def read_spec(fd: int) -> RankSpec:
    """The spec `write_spec` sent, read from a file descriptor (unbuffered: nothing past it is
    consumed, and no Python file object's lock is held by the thread that reads on)."""

    def exactly(n: int) -> bytes:
        chunks = []
        while n:
            chunk = os.read(fd, n)
            if not chunk:
                raise EOFError("rank 0 closed the pipe before sending the rank's spec")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    (n,) = _LEN.unpack(exactly(_LEN.size))
    return pickle.loads(exactly(n))


def _visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (or their indices)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


class RankGroup:
    """Ranks 1..N-1 as processes, and rank 0's `TensorParallel`. `start` returns once every
    rank has joined the process group; `close` stops them (idempotent)."""

    def __init__(self, tp: TensorParallel, procs: list[subprocess.Popen[bytes]], on_failure: Callable[[str], None] | None) -> None:
        self.tp = tp
        self.procs = procs
        self._on_failure = on_failure
        self._closing = False
        self._stop_watch = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="tp-rank-watcher", daemon=True)
        self._watcher.start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    @classmethod
    def start(
        cls,
        source_kind: str,
        source_location: str,
        config: ModelConfig,
        options: EngineOptions,
        task: str = "generate",
        on_failure: Callable[[str], None] | None = None,
    ) -> RankGroup:
        """Start ranks 1..N-1 (N = options.tensor_parallel_size) and join the group as rank 0.
        Raises ValueError for too few GPUs, RuntimeError when a rank dies while starting."""
        n = options.tensor_parallel_size
        device = options.torch_device()
        if dist.is_initialized():  # the collectives use torch.distributed's one default group
            raise RuntimeError("one tensor-parallel engine per process: close the other engine first")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            "MASTER_ADDR": MASTER_ADDR,
            "WORLD_SIZE": str(n),
        }
        gpus: list[str] = []
        if device.type == "cuda":
            gpus = _visible_gpus()
            base = device.index or 0
            if base + n > len(gpus):
                raise ValueError(
                    f"paged backend option tensor_parallel_size: {n} needs {n} GPUs (one per rank) from cuda:{base}; "
                    f"this process sees {len(gpus)}"
                )
            gpus = gpus[base : base + n]
            # NVLink multicast (NVLS) off: the lent machines require it, and the all-reduces
            # here are small. Rank 0 reads it when its communicator is made, below.
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
            env["NCCL_NVLS_ENABLE"] = os.environ["NCCL_NVLS_ENABLE"]
        store = dist.TCPStore(
            MASTER_ADDR, 0, n, True, wait_for_workers=False, timeout=datetime.timedelta(seconds=START_TIMEOUT_S)
        )  # fmt: skip
        env["MASTER_PORT"] = str(store.port)
        rank_options = options
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for rank in range(1, n):
                rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
                if gpus:
                    rank_env["CUDA_VISIBLE_DEVICES"] = gpus[rank]  # each rank sees its GPU as cuda:0
                    rank_options = options.model_copy(update={"device": "cuda"})
                proc = subprocess.Popen(
                    [sys.executable, "-m", "backends.paged.tp_worker"], stdin=subprocess.PIPE, env=rank_env, cwd=REPO_ROOT
                )  # fmt: skip
                procs.append(proc)
                spec = RankSpec(rank, n, store.port, source_kind, source_location, config, rank_options, task)
                assert proc.stdin is not None
                write_spec(proc.stdin, spec)  # stdin stays open: its end of file is our death
            _wait_ready(store, procs)
            tp = init_tensor_parallel(config, 0, n, store, device, COLLECTIVE_TIMEOUT)
        except BaseException:
            _kill(procs)
            destroy_tensor_parallel()
            raise
        log.info("tensor parallelism: %d ranks (pids %s), %s", n, [p.pid for p in procs], "nccl" if gpus else "gloo")
        return cls(tp, procs, on_failure)

    def close(self, *, kill: bool = False) -> None:
        """Stop the other ranks (a stop message, then SIGKILL for any still there after a
        while; at once with `kill`, as after a failed start) and leave the group."""
        if self._closing:
            return
        self._closing = True
        self._stop_watch.set()
        alive = all(p.poll() is None for p in self.procs)
        if not kill and alive and self.tp.failure is None:
            try:
                if torch.cuda.is_initialized():
                    torch.cuda.synchronize()  # a step still in flight finishes its collectives first
                self.tp.send_step(None)
            except Exception as exc:  # a rank gone meanwhile: it is killed below
                log.warning("tensor parallelism: stopping the ranks: %s", exc)
        deadline = time.monotonic() + (0 if kill else STOP_TIMEOUT_S)
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        _kill(self.procs)
        destroy_tensor_parallel()

    def _watch(self) -> None:
        """Notice a rank that exits while the group runs (see the module docstring)."""
        while not self._stop_watch.wait(WATCH_INTERVAL_S):
            for rank, p in enumerate(self.procs, start=1):
                rc = p.poll()
                if rc is None or self._closing:
                    continue
                message = f"rank {rank} (pid {p.pid}) exited ({exit_reason(rc)})"
                self.tp.failure = message
                log.error("tensor parallelism: %s; the engine cannot run steps", message)
                if self._on_failure is not None:
                    self._on_failure(message)
                return


def _wait_ready(store: Any, procs: list[subprocess.Popen[bytes]]) -> None:
    """Until every rank has set its ready key; a rank that exits first fails the start at once."""
    deadline = time.monotonic() + START_TIMEOUT_S
    keys = [ready_key(rank) for rank in range(1, len(procs) + 1)]
    while not store.check(keys):
        for rank, p in enumerate(procs, start=1):
            rc = p.poll()
            if rc is not None:
                raise RuntimeError(f"tensor parallelism: rank {rank} exited while starting ({exit_reason(rc)}); see its log above")
        if time.monotonic() > deadline:
            raise RuntimeError(f"tensor parallelism: the ranks did not start within {START_TIMEOUT_S:g} s")
        time.sleep(0.05)


def _kill(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL whatever is still running, reap it, close its stdin."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not refused
            log.error("tensor parallelism: rank pid %d did not die", p.pid)
        if p.stdin is not None:
            try:
                p.stdin.close()
            except OSError:
                pass
