"""Single-stream llama.cpp speed: the portable build (a CPU variant picked at run time) vs native.

Not a test: a program. A build is a directory holding the `llama_cpp` package (a venv's
site-packages or an unpacked wheel). Each repetition runs one fresh subprocess per build, the
order alternating (ABBA), so that load from other work on the machine falls on both alike. A
subprocess registers its CPU backend the way the runner does (`load_cpu_backend()`; a native
build answers "builtin"), loads the model, evaluates a fixed prompt and decodes a fixed number
of tokens greedily, and reports prompt-eval and decode tokens per second.

    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" \
        .venv/bin/pip wheel --no-deps --no-cache-dir -w /tmp/native-wh llama-cpp-python==0.3.36
    .venv/bin/python -m zipfile -e /tmp/native-wh/llama_cpp_python-0.3.36-*.whl /tmp/native-site
    .venv/bin/python -m gateway.bench.llamacpp_build --native /tmp/native-site --reps 12 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
from pathlib import Path

from gateway.bench.harness import REPO
from gateway.bench.machine import cpu_name

PROMPT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lamp, a "
    "logbook and a flask of tea. From the gallery he could see the whole bay: the fishing boats "
    "coming home, the gulls over the harbour wall, the ferry that left for the islands at seven. "
    "He wrote down the wind, the swell and the ships he saw, as his father had done before him. "
    "One night in November, a light appeared far out at sea where no ship should have been, and "
    "it blinked in a pattern he had never seen. He opened the logbook and began to write:"
)

# Runs in the subprocess, with the build's directory first on PYTHONPATH.
WORKER = r"""
import hashlib, json, sys, time
from backends.llamacpp.cpu_variants import load_cpu_backend
variant = load_cpu_backend()  # before the first Llama, as the runner does
import llama_cpp
model, threads, n_gen, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
llm = llama_cpp.Llama(model_path=model, n_ctx=1024, n_batch=512, n_threads=threads,
                      n_threads_batch=threads, verbose=False)
tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)

def run(prompt_tokens, n):
    llm.reset()
    gen = llm.generate(prompt_tokens, temp=0.0)  # temp 0: the greedy sampler
    t0 = time.perf_counter()
    out = [next(gen)]  # the whole prompt evaluated, the first token sampled
    t1 = time.perf_counter()
    out += [next(gen) for _ in range(n - 1)]  # one decode step each
    t2 = time.perf_counter()
    gen.close()
    return out, t1 - t0, t2 - t1

run(tokens[:16], 16)  # warm-up: weights paged in, buffers allocated
out, t_prompt, t_decode = run(tokens, n_gen)
print(json.dumps({"variant": variant, "lib": llama_cpp.__file__, "prompt_tokens": len(tokens),
                  "prompt_tok_s": len(tokens) / t_prompt, "decode_tok_s": (n_gen - 1) / t_decode,
                  "tokens_sha": hashlib.sha256(repr(out).encode()).hexdigest()[:12]}))
"""


def cpu_flags() -> str:
    """The CPU flags that decide the variant (AVX2, AVX-512, AMX), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    keep = [f for f in flags if f in ("avx2", "fma", "f16c", "bmi2", "avx_vnni") or f.startswith(("avx512", "amx"))]
    return " ".join(keep) or "none of avx2/avx512/amx"


def run_once(build: Path, model: Path, threads: int, max_tokens: int, variant: str | None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(build), str(REPO)]))
    env.pop("TURNOUT_GGML_CPU_VARIANT", None)
    if variant:
        env["TURNOUT_GGML_CPU_VARIANT"] = variant
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(model), str(threads), str(max_tokens), PROMPT],
        env=env, capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{build}: worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summary(values: list[float], digits: int = 1) -> str:
    """Median (min-max)."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--portable", type=Path, default=Path(sysconfig.get_paths()["purelib"]),
                    help="directory holding the portable llama_cpp (default: this interpreter's site-packages)")
    ap.add_argument("--native", type=Path, required=True, help="directory holding a -DGGML_NATIVE=ON llama_cpp")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=8, help="runs of each build, interleaved")
    ap.add_argument("--variant", help="force the portable build's CPU variant (TURNOUT_GGML_CPU_VARIANT)")
    ap.add_argument("--json", type=Path, help="also write every run here")
    args = ap.parse_args()

    from backends.models import pull

    model = pull(args.model)
    builds = {"portable": args.portable, "native": args.native}
    header = {"cpu": cpu_name(), "flags": cpu_flags(), "cores": os.cpu_count(), "threads": args.threads,
              "model": args.model, "max_tokens": args.max_tokens, "reps": args.reps, "loadavg_start": os.getloadavg()[0]}
    print(json.dumps(header), flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in builds}
    for rep in range(args.reps):
        order = list(builds) if rep % 2 == 0 else list(builds)[::-1]
        for name in order:
            result = run_once(builds[name], model, args.threads, args.max_tokens,
                              args.variant if name == "portable" else None)
            runs[name].append(result)
            print(json.dumps({"rep": rep, "build": name, **result}), flush=True)
    load_end = os.getloadavg()[0]

    print("\n| build | CPU backend | decode tok/s, median (range) | prompt eval tok/s, median (range) |")
    print("|---|---|---:|---:|")
    for name, results in runs.items():
        print(f"| {name} | {results[0]['variant']} | {summary([r['decode_tok_s'] for r in results])} "
              f"| {summary([r['prompt_tok_s'] for r in results])} |")
    med = {name: statistics.median(r["decode_tok_s"] for r in results) for name, results in runs.items()}
    # Each repetition's two runs were back to back: their ratio cancels most of the drift in load.
    paired = [p["decode_tok_s"] / n["decode_tok_s"] for p, n in zip(runs["portable"], runs["native"])]
    same = len({r["tokens_sha"] for results in runs.values() for r in results}) == 1
    print(f"\nportable / native decode: {med['portable'] / med['native']:.3f} (medians), "
          f"{summary(paired, 3)} (per repetition); same greedy tokens in every run: {same}; "
          f"load average {header['loadavg_start']:.2f} at the start, {load_end:.2f} at the end")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**header, "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                         "loadavg_end": load_end}, indent=1))


if __name__ == "__main__":
    main()
