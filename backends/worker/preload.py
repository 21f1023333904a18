"""What an engine worker loads before anything else (imports nothing heavy itself).

A CUDA build of llama-cpp-python (compiled on the lent GPU machines with their own toolchain)
died of SIGSEGV at model load in the worker, and in any process that had imported pyzmq before
llama_cpp, while a bare process loaded and ran the same GGUF. cuda-gdb put the crash in
`llama_model::print_info()`: its `std::ostream << long` ran a copy of libstdc++'s stream code
that libggml-cuda.so carries, against the locale state of the system libstdc++ that pyzmq's
libzmq had loaded first (gateway/bench/llamacpp_cuda_probe.py, docs/benchmarks.md). With the
system libstdc++ in the process's global symbol scope before llama.cpp's libraries load, every
library binds to that one runtime, and the same load succeeded (probe and peer run, on an H100).
So a llama.cpp worker opens libstdc++ with RTLD_GLOBAL, then imports llama_cpp, both before its
own modules."""

from __future__ import annotations

import ctypes
import faulthandler
import json
import os
from typing import IO

CXX_RUNTIME = "libstdc++.so.6"  # its soname since GCC 3.4
_crash_report: IO[str] | None = None  # faulthandler writes here until the process ends


def load_engine_libraries(spec_json: str) -> None:
    """Import the native engine a worker spec names, ahead of the worker's own imports."""
    try:
        kind = json.loads(spec_json).get("kind")
    except (ValueError, AttributeError):
        return  # the worker itself reports a bad spec
    if kind == "llamacpp":
        share_cxx_runtime()
        import llama_cpp  # noqa: F401  (loads libllama, libggml and their backends)


def share_cxx_runtime() -> bool:
    """Put the system C++ runtime (libstdc++) in the process's global symbol scope, promoting
    it there if a library already loaded it privately; False where there is none (not glibc)."""
    try:
        ctypes.CDLL(CXX_RUNTIME, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    return True


def keep_crash_reports() -> None:
    """A native crash (SIGSEGV, SIGILL, ...) prints the crashing thread's Python stack to the
    gateway's log, through a copy of stderr: llama.cpp's quiet model load points fd 2 at
    /dev/null while it runs, which is where a crash during a load would otherwise go.

    The crashing thread's only: dumping every thread reads the others' frames while they run,
    and in a busy engine worker that dump itself died of SIGSEGV now and then, so a worker
    killed with SIGILL was reported as SIGSEGV (tests/unit/worker/test_worker_backend.py
    failed 2 runs in 6 so; 0 in 10 with this)."""
    global _crash_report
    try:
        _crash_report = os.fdopen(os.dup(2), "w")
    except OSError:  # no stderr at all: nothing to keep
        return
    faulthandler.enable(_crash_report, all_threads=False)
