"""Where the llama.cpp runner dies on a CUDA build (a diagnosis, not a benchmark).

On the lent H200 a CUDA build of llama-cpp-python loaded a GGUF and generated in a plain
process, while the runner's engine worker died of SIGSEGV loading the same file. Each case
below runs in a fresh subprocess (faulthandler on, so a native crash prints the Python stack),
adding one thing the worker does that the plain process does not, and reports how it ended.

    python3 -m gateway.bench.llamacpp_cuda_probe MODEL.gguf [--n-gpu-layers -1]
"""

from __future__ import annotations

import argparse
import os
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
    args = p.parse_args()
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
            print("\n".join(lines[-25:]), flush=True)


if __name__ == "__main__":
    main()
