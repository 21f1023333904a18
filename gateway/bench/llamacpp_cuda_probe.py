"""Where the llama.cpp runner dies on a CUDA build (a diagnosis, not a benchmark).

On the lent H200 a CUDA build of llama-cpp-python loaded a GGUF and generated in a plain
process, while the runner's engine worker died of SIGSEGV loading the same file. Each case
below runs in a fresh subprocess (faulthandler on, so a native crash prints the Python stack),
adding one thing the worker does that the plain process does not, and reports how it ended.

    python3 -m gateway.bench.llamacpp_cuda_probe MODEL.gguf [--n-gpu-layers -1] [--gdb]

With --gdb, a case that died of a signal runs once more under cuda-gdb (the lent machines have
no plain gdb; cuda-gdb debugs host code too), which prints the native frames of the crash.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

from gateway.bench.harness import REPO

LOAD = "llama_cpp.Llama({path!r}, n_gpu_layers={ngl}, n_ctx=4096, n_batch=512, n_threads={threads}, verbose={verbose})"
CASES = {
    "plain, main thread, verbose": "import llama_cpp; llm = " + LOAD,
    "plain, main thread, quiet": "import llama_cpp; llm = " + LOAD.replace("{verbose}", "False"),
    "plain, in a thread, quiet": (
        "import llama_cpp, concurrent.futures as cf; "
        "llm = cf.ThreadPoolExecutor(1).submit(lambda: " + LOAD.replace("{verbose}", "False") + ").result()"
    ),
    "after the worker's imports, main thread, quiet": (
        "import backends.worker.server, backends.llamacpp.runner, llama_cpp; llm = " + LOAD.replace("{verbose}", "False")
    ),
    "zmq imported first, main thread, quiet": "import zmq, llama_cpp; llm = " + LOAD.replace("{verbose}", "False"),
    "zmq imported after llama_cpp, main thread, quiet": "import llama_cpp, zmq; llm = " + LOAD.replace("{verbose}", "False"),
    "zmq imported first, main thread, verbose": "import zmq, llama_cpp; llm = " + LOAD,
    "msgspec imported first, main thread, quiet": "import msgspec, llama_cpp; llm = " + LOAD.replace("{verbose}", "False"),
    "a zmq context running, main thread, quiet": (
        "import llama_cpp, zmq; ctx = zmq.Context(); sock = ctx.socket(zmq.PULL); sock.bind('tcp://127.0.0.1:*'); llm = "
        + LOAD.replace("{verbose}", "False")
    ),
    "zmq imported first, libstdc++ opened RTLD_GLOBAL before it, main thread, quiet": (
        "import ctypes; ctypes.CDLL('libstdc++.so.6', mode=ctypes.RTLD_GLOBAL); import zmq, llama_cpp; llm = "
        + LOAD.replace("{verbose}", "False")
    ),
    # The worker's own entry point in this process (no gateway around it): a load that works
    # leaves it serving, so "timeout" is its success.
    "the worker's entry point (python -m backends.worker), in this process": (
        "import json, runpy, sys; sys.argv = ['backends.worker', json.dumps(dict(kind='llamacpp', name='probe', model={path!r}, "
        "model_id='probe', options=dict(n_ctx=4096, n_gpu_layers={ngl}))), 'ipc:///tmp/probe-in', 'ipc:///tmp/probe-owner']; "
        "runpy.run_module('backends.worker', run_name='__main__', alter_sys=True)"
    ),
    "after load_cpu_backend(), main thread, quiet": (
        "from backends.llamacpp.cpu_variants import load_cpu_backend; print('variant', load_cpu_backend()); "
        "import llama_cpp; llm = " + LOAD.replace("{verbose}", "False")
    ),
    "the runner's start()": (
        "import asyncio; from backends.llamacpp.runner import LlamaCppBackend; "
        "b = LlamaCppBackend(name='probe', model={path!r}, n_ctx=4096, n_gpu_layers={ngl}); asyncio.run(b.start())"
    ),
    "an engine worker process (as turnout serve starts it)": (
        "import asyncio; from gateway.registry import build_backend; from policies.schema import BackendConfig; "
        "b = build_backend(BackendConfig(name='probe', kind='llamacpp', model={path!r}, options={{'n_ctx': 4096, 'n_gpu_layers': {ngl}}})); "
        "asyncio.run(b.ensure_loaded())"
    ),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--n-gpu-layers", type=int, default=-1)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--timeout", type=float, default=90)
    p.add_argument("--gdb", action="store_true", help="rerun a case that died of a signal under cuda-gdb for its native stack")
    args = p.parse_args()
    gdb = shutil.which("cuda-gdb") or shutil.which("gdb") if args.gdb else None
    for name, code in CASES.items():
        source = code.format(path=args.model, ngl=args.n_gpu_layers, threads=args.threads, verbose=True) + "; print('probe: loaded', flush=True)"
        t = time.perf_counter()
        try:
            env = {**os.environ, "PYTHONFAULTHANDLER": "1", "TURNOUT_WORKER_LOG_LEVEL": "DEBUG"}  # the worker's too
            done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", source], cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
            rc, out = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            rc, out = "timeout", str(exc.stdout or "") + str(exc.stderr or "")
        lines = [line for line in out.splitlines() if not line.startswith(("llama_model_loader: - ", "print_info: ", "load_tensors: "))]
        print(f"== {name}: rc {rc} in {time.perf_counter() - t:.1f} s", flush=True)
        if rc != 0:
            fatal = next((i for i, line in enumerate(lines) if line.startswith("Fatal Python error")), None)
            print("\n".join(lines[fatal : fatal + 20] if fatal is not None else lines[-25:]), flush=True)
        if gdb and isinstance(rc, int) and rc < 0:
            native_stack(gdb, source, env, args.timeout * 2)


def native_stack(gdb: str, source: str, env: dict[str, str], timeout: float) -> None:
    """Run `source` under the debugger to its crash, then print the faulting thread's native
    frames and the libraries they come from."""
    cmd = [gdb, "-q", "-batch", "-ex", "set pagination off", "-ex", "run", "-ex", "bt 40", "-ex", "info sharedlibrary",
           "--args", sys.executable, "-c", source]  # fmt: skip
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        out = done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        out = f"(cuda-gdb timed out)\n{exc.stdout or ''}"
    lines = out.splitlines()
    frames = [line for line in lines if line.startswith(("#", "Program received", "Thread")) or "signal SIG" in line]
    libs = [line for line in lines if line.startswith("0x") and any(k in line for k in ("zmq", "sodium", "ggml", "llama", "cud", "cublas", "stdc++", "gomp"))]
    print("-- native stack (" + os.path.basename(gdb) + ")\n" + "\n".join(frames[:60] + libs), flush=True)


if __name__ == "__main__":
    main()
