#!/usr/bin/env bash
# Issue 12's figures on a lent GPU machine, in one command (docs/benchmarks.md has the results):
#
#   bash gateway/bench/device_serve.sh [SHAPES]     default: smollm2-135m,llama3-8b
#
# carry: .whl (the GPU tests' wheels), .srvwhl (the serving stack's: fastapi, uvicorn, pyzmq,
# msgspec, redis, opentelemetry, ...; docs/paged-engine.md lists both), .llamawhl (the
# llama.cpp site, every CPU variant).
#
# 1. gateway/bench/device_amx.sh: the llama.cpp runner with and without the AMX grant.
# 2. `gateway.bench.serve_vs_offline --workers 1,4 --clients 4`: the paged engine offline
#    against `turnout serve` with one and with four HTTP processes in front of it; SVO_ARGS adds
#    options: "--repeats 3" (offline and served interleaved, medians: the lent hosts' speed
#    drifts), "--py-spy /tmp/site/bin/py-spy" (the engine worker's stacks, to $OUT/stacks.tgz;
#    the py-spy wheel rides in .srvwhl). SKIP_AMX=1 skips step 1.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
shapes=${1:-smollm2-135m,llama3-8b}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .srvwhl/*.whl ||
    { echo "device_serve: installing the carried wheels failed"; exit 3; }
mkdir -p /tmp/llsite && tar -xJf .llamawhl/llama-site.tar.xz -C /tmp/llsite
export PYTHONPATH="/tmp/site:/tmp/llsite:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c 'import gateway.app, gateway.engine_host, backends.worker.shared, gateway.bench.serve' ||
    { echo "device_serve: the serving stack does not import"; exit 3; }
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    lscpu | grep -E 'Model name|^CPU\(s\)|per core|per socket|NUMA node\(s\)'
    echo "AMX in CPUID: $(grep -o -w 'amx[a-z0-9_]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

[ -n "${SKIP_AMX:-}" ] || bash gateway/bench/device_amx.sh

timeout "${SERVE_BUDGET_S:-520}" python3 -m gateway.bench.serve_vs_offline --shapes "$shapes" --workers 1,4 --clients 4 \
    --workdir /tmp/svo --json "$OUT/serve_vs_offline.json" ${SVO_ARGS:-} 2>&1 | grep -v '^ \{4,\}\|^best under' | tee "$OUT/serve_vs_offline.log"
rc=${PIPESTATUS[0]}
tail -c 3000 /tmp/svo/*-w4.log >"$OUT/server_logs.txt" 2>/dev/null
ls /tmp/svo/*.spy >/dev/null 2>&1 && tar -czf "$OUT/stacks.tgz" -C /tmp/svo $(cd /tmp/svo && ls *.spy)
echo "device_serve: serve_vs_offline rc=$rc"
