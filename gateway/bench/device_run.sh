#!/usr/bin/env bash
# The paged engine's GPU checks and the bf16-vs-FP8 figure in one command on a lent GPU machine
# (docs/paged-engine.md, "On a lent GPU machine", has the calls and their carry lists).
#
#   bash gateway/bench/device_run.sh         install the carried wheels (.whl), join the carried
#                                            SmolLM2 GGUF parts if both came (.gguf), run
#                                            tests/gpu, and `bench engine --shape llama3-8b
#                                            --compare-quantization`; everything under $OUT
#   bash gateway/bench/device_run.sh stage   only stage the GGUF part carried in this call, for
#                                            the next call to the same warm machine
#
# Order: the embeddings figure, the FP8 and real-weight tests, the benchmark, then the older GPU tests, each
# with its share of the time, so that the new results come back even if a later step overruns.
# The machine has torch, triton, transformers, tokenizers, safetensors and numpy: never carry
# those (a second numpy breaks torch).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/out}"
STAGE=/tmp/turnout-gguf # outlives a call on a warm machine
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if [ "${1:-}" = stage ]; then
    python3 -m gateway.bench.gguf_parts stage --dir .gguf --to "$STAGE"
    exit $?
fi

start=$SECONDS
budget=${DEVICE_RUN_BUDGET_S:-570} # under the tool's 600 s per command
left() { echo $((budget - (SECONDS - start))); }
cap() { # the smaller of a step's cap and the time left
    local l
    l=$(left)
    echo $((l < $1 ? l : $1))
}

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
        { echo "device_run: installing the carried wheels failed"; exit 3; }
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TURNOUT_GPU_REPORT="$OUT/gpu_figures.json"

if gguf=$(python3 -m gateway.bench.gguf_parts join --dir .gguf --to "$STAGE" 2>&1); then
    export TURNOUT_SMOLLM2_GGUF="$gguf"
else
    echo "device_run: no SmolLM2 GGUF ($gguf): the real-weight tests will skip"
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
    python3 -c 'import sys, torch, triton, transformers, pydantic, gguf, llguidance; print(sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "pydantic", pydantic.VERSION, "gguf ok, llguidance ok")'
    echo "TURNOUT_SMOLLM2_GGUF=${TURNOUT_SMOLLM2_GGUF:-unset}"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Embeddings at batch 64: the paged engine on the GPU against the llama.cpp runner on this
# host's CPU (Intel, AMX granted: the runner's AMX variant), same model, same run. The runner
# travels as a trimmed site folder (.llamawhl/llama-site.tar.xz: its x64, haswell and
# sapphirerapids CPU modules only).
rc_emb=0
if [ -f .llamawhl/llama-site.tar.xz ] && [ -n "${TURNOUT_SMOLLM2_GGUF:-}" ]; then
    mkdir -p /tmp/llsite && tar -xJf .llamawhl/llama-site.tar.xz -C /tmp/llsite
    PYTHONPATH="/tmp/llsite:$PYTHONPATH" python3 -c 'from backends.llamacpp.cpu_variants import amx_tile_granted, load_cpu_backend; print("llama.cpp CPU module:", load_cpu_backend(), "AMX granted:", amx_tile_granted())' 2>&1 | tee "$OUT/llamacpp_variant.txt"
    PYTHONPATH="/tmp/llsite:$PYTHONPATH" timeout "$(cap 120)" python3 -m gateway.bench.embeddings --model "$TURNOUT_SMOLLM2_GGUF" \
        --device cuda --threads 16 --requests 5 --json 2>&1 | tee "$OUT/embeddings_gpu.log"
    rc_emb=${PIPESTATUS[0]}
else  # no real model here: the paged engine on random weights of its shape, GPU against this host's CPU
    timeout "$(cap 60)" python3 -m gateway.bench.embeddings --model dummy:smollm2-135m --engines paged --device cuda --requests 5 --json 2>&1 |
        tee "$OUT/embeddings_gpu.log"
    rc_emb=${PIPESTATUS[0]}
    timeout "$(cap 90)" python3 -m gateway.bench.embeddings --model dummy:smollm2-135m --engines paged --device cpu --threads 16 --requests 2 --json 2>&1 |
        tee "$OUT/embeddings_cpu16.log"
fi

timeout "$(cap 240)" python3 -m pytest -q -rs -p no:cacheprovider tests/gpu/test_fp8.py tests/gpu/test_real_weights.py 2>&1 |
    tee "$OUT/pytest_new.log"
rc_new=${PIPESTATUS[0]}

timeout "$(cap 200)" python3 -m gateway.bench.engine --shape llama3-8b --compare-quantization --no-transformers \
    --json "$OUT/bench_llama3_8b_fp8.json" 2>&1 | tee "$OUT/bench_llama3_8b_fp8.log"
rc_bench=${PIPESTATUS[0]}

timeout "$(cap 400)" python3 -m pytest -q -rs -p no:cacheprovider tests/gpu/test_engine_gpu.py tests/gpu/test_triton_kernels.py 2>&1 |
    tee "$OUT/pytest_existing.log"
rc_old=${PIPESTATUS[0]}

echo "device_run: new tests rc=$rc_new, benchmark rc=$rc_bench, embeddings rc=$rc_emb, existing tests rc=$rc_old ($((SECONDS - start)) s; 124: out of time)"
[ "$rc_new" = 0 ] && [ "$rc_bench" = 0 ] && [ "$rc_emb" = 0 ] && [ "$rc_old" = 0 ]
