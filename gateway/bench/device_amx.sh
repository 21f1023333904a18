#!/usr/bin/env bash
# The llama.cpp runner on a lent host whose CPU advertises AMX (issue 12): which CPU variant it
# registers and a generation from a random-weight GGUF, as the host grants AMX, then under
# gateway.bench.deny_amx (as on a VM whose kernel does not grant it), then with the AMX variant
# forced under the denial (it must refuse, not die of SIGILL). Writes $OUT/amx.txt.
#
#   bash gateway/bench/device_amx.sh     carry: .whl, .llamawhl (the llama.cpp site, every CPU variant)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT" /tmp/llsite
[ -d /tmp/llsite/llama_cpp ] || tar -xJf .llamawhl/llama-site.tar.xz -C /tmp/llsite
[ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="/tmp/llsite:$PYTHONPATH" # the CPU build, ahead of any other llama_cpp
probe='
import sys, time
from backends.llamacpp.cpu_variants import amx_tile_granted, load_cpu_backend
granted = amx_tile_granted()
variant = load_cpu_backend()
import llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=256, n_threads=8, verbose=False)
t = time.perf_counter()
out = llm.create_completion("Hello", max_tokens=32, temperature=0)
n = out["usage"]["completion_tokens"]
print(f"AMX granted: {granted}; variant: {variant}; {n} tokens in {time.perf_counter() - t:.2f} s")
'
timeout 120 python3 -m gateway.bench.random_gguf --shape smollm2-135m --out /tmp/rand.gguf >/dev/null 2>&1 ||
    echo "device_serve: no random GGUF writer output"
{
    echo "== plain"
    timeout 60 python3 -c "$probe" /tmp/rand.gguf 2>&1 | tail -2
    echo "== under deny_amx (a kernel that does not grant AMX)"
    timeout 60 python3 -m gateway.bench.deny_amx python3 -c "$probe" /tmp/rand.gguf 2>&1 | tail -2
    echo "== under deny_amx, the AMX variant forced"
    TURNOUT_GGML_CPU_VARIANT=sapphirerapids timeout 60 python3 -m gateway.bench.deny_amx python3 -c "$probe" /tmp/rand.gguf 2>&1 | tail -2
    echo "exit $?"
} >"$OUT/amx.txt" 2>&1
cat "$OUT/amx.txt"

