#!/usr/bin/env bash
# Issue 16, item 3, on a lent GPU machine: `bench engine` with both rooflines and the kernel
# profile for each workload of the issue (docs/benchmarks.md has the results). Every JSON and
# log goes into $OUT/engine.tgz (one file: the tool brings back at most eight).
#
#   bash gateway/bench/device_engine.sh        carry: .whl (the GPU tests' wheels)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT" /tmp/eng
export PYTHONUNBUFFERED=1
start=$SECONDS
budget=${DEVICE_ENGINE_BUDGET_S:-280}
if [ ! -f /tmp/site/.engine-wheels ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
        touch /tmp/site/.engine-wheels
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

run() { # NAME CAP ARGS...: one bench engine run, capped by its share and the time left
    local name=$1 cap=$2 left
    shift 2
    left=$((budget - (SECONDS - start)))
    [ "$left" -lt 20 ] && { echo "device_engine: no time left for $name"; return; }
    [ "$cap" -gt "$left" ] && cap=$left
    timeout "$cap" python3 -m gateway.bench.engine "$@" --no-transformers --json "/tmp/eng/$name.json" >"/tmp/eng/$name.log" 2>&1
    echo "device_engine: $name rc=$? ($((SECONDS - start)) s)"
    tail -n 40 "/tmp/eng/$name.log"
    tar -czf "$OUT/engine.tgz" -C /tmp eng
}

run llama3-8b-bf16-fp8 150 --shape llama3-8b --compare-quantization --profile
run smollm2-fixed 60 --shape smollm2-135m --profile --host-profile
run smollm2-sharegpt 60 --shape smollm2-135m --workload sharegpt --profile --host-profile
run llama3-8b-single 50 --shape llama3-8b --num-requests 1 --profile
