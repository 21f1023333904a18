"""What an engine worker loads before anything else (imports nothing heavy itself).

A llama.cpp engine's native libraries come first. On the lent GPU machines, a CUDA build of
llama-cpp-python (compiled there with that machine's own toolchain) loaded and ran a model in a
bare process, but died of SIGSEGV at model load whenever numpy or pyzmq had been imported
before it, as every worker imports them (the runtime libraries those loaded first were taken
for its own); with llama_cpp imported first, the same load succeeded
(docs/benchmarks.md, the peer run). So the worker imports it before its own modules."""

from __future__ import annotations

import faulthandler
import json
import os
from typing import IO

_crash_report: IO[str] | None = None  # faulthandler writes here until the process ends


def load_engine_libraries(spec_json: str) -> None:
    """Import the native engine a worker spec names, ahead of the worker's own imports."""
    try:
        kind = json.loads(spec_json).get("kind")
    except (ValueError, AttributeError):
        return  # the worker itself reports a bad spec
    if kind == "llamacpp":
        import llama_cpp  # noqa: F401  (loads libllama, libggml and their backends)


def keep_crash_reports() -> None:
    """A native crash (SIGSEGV, SIGILL, ...) prints every thread's Python stack to the
    gateway's log, through a copy of stderr: llama.cpp's quiet model load points fd 2 at
    /dev/null while it runs, which is where a crash during a load would otherwise go."""
    global _crash_report
    try:
        _crash_report = os.fdopen(os.dup(2), "w")
    except OSError:  # no stderr at all: nothing to keep
        return
    faulthandler.enable(_crash_report, all_threads=True)
