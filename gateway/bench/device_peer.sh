#!/usr/bin/env bash
# Issue 16, item 4, on a lent GPU machine: llama.cpp's CUDA backend built from the slimmed
# llama-cpp-python source, random llama3-8b weights written as an F16 GGUF, and
# gateway.bench.peer_gpu (the llama.cpp runner against the paged engine, both under
# `turnout serve`, same GGUF, same GPU). Everything it reports lands under $OUT.
#
#   bash gateway/bench/device_peer.sh all     build, then the benchmark with the time left (default)
#   bash gateway/bench/device_peer.sh build   only the build (and the GGUF, written meanwhile); both
#                                             stay in /tmp for the next call to the same warm machine
#   bash gateway/bench/device_peer.sh bench   only the benchmark (builds first when /tmp has no build)
#
# carry: .whl .peerwhl   (filled here by `python3 -m gateway.bench.peer_prepare`)
#
# Settings (environment): PEER_BUDGET_S, seconds for the whole command (default 570, under the
# tool's 600); PEER_LEVELS (1,10,50,256); PEER_MAX_TOKENS (256); PEER_LEVEL_CAP_S, the longest a
# wave may run (150); PEER_SHAPE (llama3-8b); PEER_ARGS, more gateway.bench.peer_gpu options,
# e.g. "--llamacpp-instances 2 --rounds 2".
# For a CPU rehearsal of this script (what was checked before any GPU run): PYTHON (python3),
# PEER_DEVICE=cpu (no offload check, --device cpu), PEER_CMAKE_ARGS (the CUDA flags below),
# PEER_SKIP_WHEELS=1 (the carried wheels are CPython 3.12's), PEER_TMP (/tmp).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONFAULTHANDLER=1 # a native crash in an engine worker prints its Python stack in the server's log
mode=${1:-all}
start=$SECONDS
budget=${PEER_BUDGET_S:-570}
left() { echo $((budget - (SECONDS - start))); }

PY=${PYTHON:-python3}
DEVICE=${PEER_DEVICE:-cuda}
TMPD=${PEER_TMP:-/tmp}
LL=$TMPD/llcuda       # the built llama_cpp package; outlives a call on a warm machine
SITE=$TMPD/site       # the carried wheels, installed
WORK=$TMPD/peer-work  # the servers' configs and logs
SHAPE=${PEER_SHAPE:-llama3-8b}
# The GGUF (16 GB for llama3-8b) in RAM when /dev/shm has room for it (no disk in the way of
# either engine's load), else on /tmp's disk.
gguf_dir=$TMPD/peer-gguf
if [ "$(df -k --output=avail /dev/shm 2>/dev/null | tail -1)" -gt $((24 * 1024 * 1024)) ] 2>/dev/null; then
    gguf_dir=/dev/shm/peer-gguf
fi
GGUF=$gguf_dir/$SHAPE-f16.gguf
mkdir -p "$gguf_dir" "$WORK"

# llama.cpp with CUDA for Hopper only. Off: the multimodal library (LLAVA_BUILD), ggml's
# FlashAttention kernels (the runner does not enable flash attention; llama-cpp-python's default
# is off), NCCL (one GPU), -march=native (AMX code paths died of SIGILL on these hosts:
# backends/llamacpp/cpu_variants.py), OpenSSL; llama.cpp's tests, tools, examples and server are
# off already (a subproject). Haswell-level CPU flags for the little the CPU runs.
CMAKE_ARGS_CUDA=${PEER_CMAKE_ARGS:-"-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF \
-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF"}

install_wheels() {
    # Once per machine: a second call to the same warm machine finds them installed.
    local want stamp=$SITE/.peer-wheels
    [ "${PEER_SKIP_WHEELS:-0}" = 1 ] && return 0
    want=$(ls .whl/*.whl .peerwhl/*.whl 2>/dev/null | xargs -n1 basename | sort | tr '\n' ' ')
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl .peerwhl/*.whl ||
        { echo "device_peer: installing the carried wheels failed"; return 3; }
    echo "$want" >"$stamp"
}

build_llama() {
    if [ -f "$LL/.built" ]; then
        echo "device_peer: reusing the llama.cpp CUDA build in $LL"
        return 0
    fi
    # llama-cpp-python's build backend: the machine's own, else the carried one.
    $PY -c 'import scikit_build_core.build.wheel' 2>/dev/null ||
        $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .peerwhl/build/*.whl
    local src t0=$SECONDS rc
    rm -rf "$TMPD/llsrc" "$LL.partial" && mkdir -p "$TMPD/llsrc"
    tar -xJf .peerwhl/llama-cpp-python-*-slim.tar.xz -C "$TMPD/llsrc" || return 4
    src=$(echo "$TMPD"/llsrc/llama_cpp_python-*)
    echo "device_peer: building $(basename "$src") with CUDA on $(nproc) cores ($(left) s left)"
    CMAKE_ARGS="$CMAKE_ARGS_CUDA" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        timeout "$(($(left) - 10))" $PY -m pip install -v --no-build-isolation --no-deps --no-cache-dir \
        --target "$LL.partial" "$src" >"$OUT/build.log" 2>&1
    rc=$?
    echo "device_peer: build rc=$rc in $((SECONDS - t0)) s (124: out of time)"
    if [ $rc != 0 ]; then
        tail -40 "$OUT/build.log"
        return 5
    fi
    rm -rf "$LL" && mv "$LL.partial" "$LL"
    PYTHONPATH="$LL:$PYTHONPATH" $PY -c 'import llama_cpp; ok = llama_cpp.llama_supports_gpu_offload(); print("llama_supports_gpu_offload:", ok); raise SystemExit(not ok and "'"$DEVICE"'" == "cuda")' ||
        return 6
    touch "$LL/.built"
}

write_gguf() {
    $PY -m gateway.bench.random_gguf --shape "$SHAPE" --out "$GGUF" >"$OUT/gguf.log" 2>&1
}

probe() {
    # llama.cpp itself on the GGUF, outside turnout: does the build load it onto the GPU and
    # generate? (A failure here is llama.cpp's or the file's, not the runner's.)
    echo "device_peer: probe: llama_cpp.Llama on $GGUF ($(left) s left)"
    timeout 120 $PY -X faulthandler -c "
import sys, time, llama_cpp
t = time.perf_counter()
llm = llama_cpp.Llama(sys.argv[1], n_gpu_layers=-1, n_ctx=512, verbose=True)
print('probe: loaded in %.1f s' % (time.perf_counter() - t), flush=True)
out = llm.create_completion('Hello', max_tokens=16, temperature=0)
print('probe: generated', out['usage'], flush=True)
" "$GGUF" >"$OUT/probe.log" 2>&1
    echo "device_peer: probe rc=$?"
    grep -v "^llama_model_loader: - \|^load_tensors: \|^llama_context: \|^print_info: " "$OUT/probe.log" | tail -25
}

bench() {
    local l
    l=$(left)
    echo "device_peer: benchmark with $l s left"
    timeout --kill-after=10 "$((l - 5))" $PY -m gateway.bench.peer_gpu --device "$DEVICE" --shape "$SHAPE" --gguf "$GGUF" \
        --levels "${PEER_LEVELS:-1,10,50,256}" --max-tokens "${PEER_MAX_TOKENS:-256}" --level-cap-s "${PEER_LEVEL_CAP_S:-150}" \
        --budget-s "$((l - 15))" --workdir "$WORK" --json "$OUT/peer_gpu.json" ${PEER_ARGS:-} 2>&1 | tee "$OUT/peer_gpu.log"
    local rc=${PIPESTATUS[0]}
    # One file for every server's log ($OUT brings back at most 8 files: a call that also ran
    # device_serve.sh lost its logs once), each cut to its last 2 MB.
    local logs=()
    for f in "$WORK"/server-*.log; do
        [ -f "$f" ] && tail -c 2000000 "$f" >"$WORK/tail-$(basename "$f")" && logs+=("tail-$(basename "$f")")
    done
    [ ${#logs[@]} -gt 0 ] && tar -czf "$OUT/server_logs.tgz" -C "$WORK" "${logs[@]}"
    return "$rc"
}

install_wheels || exit $?
export PYTHONPATH="$LL:$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
    nvcc --version | tail -2
    cmake --version | head -1
    $PY -c 'import sys, torch, triton, scikit_build_core; print(sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "scikit-build-core", scikit_build_core.__version__)'
    echo "mode=$mode budget=${budget}s nproc=$(nproc) GGUF=$GGUF"
    free -g | head -2
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

case "$mode" in
build | all)
    writer=""
    if ! $PY -c "from gateway.bench.random_gguf import existing; from pathlib import Path; raise SystemExit(existing(Path('$GGUF'), '$SHAPE', 0) is None)"; then
        write_gguf &  # one core and the disk, beside the build's sixteen cores
        writer=$!
    fi
    build_llama
    rc=$?
    if [ -n "$writer" ]; then
        wait "$writer" || { echo "device_peer: writing the GGUF failed:"; tail -20 "$OUT/gguf.log"; exit 7; }
        cat "$OUT/gguf.log"
    fi
    [ $rc = 0 ] || exit $rc
    [ "$mode" = build ] && exit 0
    probe
    bench
    ;;
bench)
    build_llama || exit $?
    bench
    ;;
*)
    echo "usage: $0 [all|build|bench]"
    exit 2
    ;;
esac
