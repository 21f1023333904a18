#!/usr/bin/env bash
# Issue 12 on a lent machine: the part of the test suite that drives the llama.cpp runner with
# the real SmolLM2-135M, on an Intel host whose CPU advertises AMX, first under
# gateway.bench.deny_amx (a seccomp filter: the kernel refuses the AMX grant, as on issue 12's
# VM), then plainly (the grant as the host gives it). Two calls to the same warm machine, since
# the GGUF (94 MiB) is over one call's 64 MiB (gateway/bench/gguf_parts.py):
#
#   call 1: bash gateway/bench/device_tests.sh stage
#           carry: .gguf/SmolLM2-135M-Instruct.Q4_1.gguf.part1, .gguf/SmolLM2-135M-Instruct.Q4_1.gguf.json,
#                  .testwhl/core, .testwhl/pytest            (62.5 MiB with the tree: 1.5 MiB to spare)
#   call 2: bash gateway/bench/device_tests.sh
#           carry: .gguf/SmolLM2-135M-Instruct.Q4_1.gguf.part2, .gguf/SmolLM2-135M-Instruct.Q4_1.gguf.json,
#                  .whl, .srvwhl, .llamawhl                    (60.7 MiB with the tree: 3.3 MiB to spare)
#
# Call 1 stages the GGUF's first part in /tmp/turnout-gguf and the test wheels in
# /tmp/turnout-testwhl (both outlive a call on a warm machine). Call 2 installs .whl, .srvwhl and
# the staged test wheels into /tmp/site (pip --no-index --no-deps), extracts the llama.cpp site
# (every CPU variant) into /tmp/llsite, joins the GGUF and puts it in a model store of its own
# ($TURNOUT_HOME/models, which `pull("smollm2-135m")` reads before it would download), prints
# the CPU, the AMX grant and the variant chosen with and without deny_amx, and runs the
# selection below: under deny_amx, then plainly if the time left allows. Everything under $OUT
# (at most 8 files come back): env.txt, pytest_denied.log, junit_denied.xml, pytest_plain.log,
# junit_plain.xml.
#
# .testwhl (git-excluded): core/ = openai, jiter, sniffio, httpx2, httpcore2, truststore,
# pytest-asyncio (the machine's image lacks them); pytest/ = pytest, pluggy, iniconfig, installed
# only where the machine's pytest is older than pytest-asyncio's 8.4; dialect/ = anthropic,
# docstring-parser, ollama, needed only with TESTS_DIALECTS=1, which adds the dialect files (they
# also start the paged engine on the CPU; carry .testwhl/dialect in call 2 then, which leaves
# about 0.6 MiB of room). The image has the rest (httpx, anyio, aiohttp, pyyaml, jinja2,
# prometheus-client, hypothesis, pytest-timeout; /work/.library/device/KINDS.md), and torch,
# numpy, transformers, tokenizers and safetensors, which are never carried.
#
# .testwhl is filled here, with the versions the .venv runs (cp312, manylinux, --no-deps):
#   d=core; for spec in openai==3.63.0 jiter==0.19.0 sniffio==1.3.1 httpx2==2.17.0 httpcore2==2.17.0 \
#       truststore==0.10.5 pytest-asyncio==1.5.0; do   # pytest: pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .testwhl/$d $spec; done                      # dialect: anthropic==2.17.0 docstring-parser==0.18.0 ollama==0.6.3
#
# Not in the selection: what needs redis-server (test_ratelimit_lua, and test_auth_limits, half of
# whose tests do), nginx (test_nginx) or Chromium and Playwright (test_console): the image has
# none of them, and those fixtures fail rather than skip. TESTS="..." replaces the selection;
# TESTS_BUDGET_S (570) caps the whole; TESTS_SITE, TESTS_LLSITE, TESTS_GGUF_STAGE,
# TESTS_WHEEL_STAGE and TESTS_TURNOUT_HOME move its /tmp folders (for a dry run elsewhere).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/out}"
STAGE=${TESTS_GGUF_STAGE:-/tmp/turnout-gguf}     # outlives a call on a warm machine
WSTAGE=${TESTS_WHEEL_STAGE:-/tmp/turnout-testwhl} # likewise
SITE=${TESTS_SITE:-/tmp/site}                     # the carried wheels, installed
LLSITE=${TESTS_LLSITE:-/tmp/llsite}               # the llama.cpp site, extracted
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if [ "${1:-}" = stage ]; then
    python3 -m gateway.bench.gguf_parts stage --dir .gguf --to "$STAGE" || exit $?
    mkdir -p "$WSTAGE"
    [ -d .testwhl ] && cp -r .testwhl/. "$WSTAGE"/
    echo "staged wheels: $(cd "$WSTAGE" && ls -d */*.whl 2>/dev/null | tr '\n' ' ')"
    exit 0
fi

start=$SECONDS
budget=${TESTS_BUDGET_S:-570} # under the tool's 600 s per command
left() { echo $((budget - (SECONDS - start))); }

# -- wheels: .whl, .srvwhl and the test wheels (staged in call 1, or carried in this one) ---------
mkdir -p "$WSTAGE"
[ -d .testwhl ] && cp -r .testwhl/. "$WSTAGE"/
wheels=(.whl/*.whl .srvwhl/*.whl)
compgen -G "$WSTAGE/core/*.whl" >/dev/null && wheels+=("$WSTAGE"/core/*.whl) ||
    echo "device_tests: no test wheels in $WSTAGE/core (was call 1, stage, run on this machine?)"
compgen -G "$WSTAGE/dialect/*.whl" >/dev/null && wheels+=("$WSTAGE"/dialect/*.whl)
if ! python3 -c 'import sys, pytest; sys.exit(tuple(map(int, pytest.__version__.split(".")[:2])) < (8, 4))' 2>/dev/null; then
    echo "device_tests: the machine's pytest is older than 8.4 (pytest-asyncio 1.5 needs it): the carried one"
    wheels+=("$WSTAGE"/pytest/*.whl)
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" ||
    { echo "device_tests: installing the carried wheels failed"; exit 3; }
mkdir -p "$LLSITE" && tar -xJf .llamawhl/llama-site.tar.xz -C "$LLSITE" ||
    { echo "device_tests: no llama.cpp site (carry .llamawhl)"; exit 3; }
export PYTHONPATH="$SITE:$LLSITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# -- the model: joined, then where `pull("smollm2-135m")` looks first ---------------------------
if ! gguf=$(python3 -m gateway.bench.gguf_parts join --dir .gguf --to "$STAGE"); then
    echo "device_tests: no SmolLM2 GGUF (call 1, stage, carries part1; this call part2)"
    exit 3
fi
export TURNOUT_HOME=${TESTS_TURNOUT_HOME:-/tmp/turnout-home} # backends/models.py: store_dir() = $TURNOUT_HOME/models
mkdir -p "$TURNOUT_HOME/models"
store="$TURNOUT_HOME/models/$(basename "$gguf")" # KNOWN_MODELS["smollm2-135m"].filename
[ -f "$store" ] || ln -f "$gguf" "$store" 2>/dev/null || cp "$gguf" "$store"
python3 -c 'from backends.models import pull; print("pull(smollm2-135m) ->", pull("smollm2-135m"))' ||
    { echo "device_tests: the model store does not find the GGUF"; exit 3; }

# -- the machine ------------------------------------------------------------------------------
probe='from backends.llamacpp.cpu_variants import amx_tile_granted, load_cpu_backend; print("AMX granted:", amx_tile_granted(), "variant:", load_cpu_backend())'
{
    lscpu | grep -E 'Model name|^CPU\(s\)|per core|per socket'
    echo "AMX in CPUID: $(grep -o -w 'amx[a-z0-9_]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"
    echo "plain:     $(timeout 60 python3 -c "$probe" 2>&1 | tail -1)"
    echo "deny_amx:  $(timeout 60 python3 -m gateway.bench.deny_amx python3 -c "$probe" 2>&1 | tail -1)"
    echo "deny_amx, sapphirerapids forced (must refuse, not die of SIGILL): $(TURNOUT_GGML_CPU_VARIANT=sapphirerapids \
        timeout 60 python3 -m gateway.bench.deny_amx python3 -c "$probe" 2>&1 | tail -1)"
    python3 - <<'EOF'
import importlib.metadata as md, sys
names = ["pytest", "pytest-asyncio", "pytest-timeout", "openai", "httpx", "httpx2", "anyio", "h11", "idna",
         "aiohttp", "pydantic", "fastapi", "uvicorn", "prometheus-client", "pyyaml", "jinja2", "numpy", "torch"]
def version(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return "-"
print(sys.version.split()[0], " ".join(f"{n} {version(n)}" for n in names))
EOF
    echo "model: $store"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# -- the tests --------------------------------------------------------------------------------
if [ -n "${TESTS:-}" ]; then
    read -r -a selection <<<"$TESTS"
else
    selection=(
        tests/unit/test_deny_amx.py tests/unit/test_llamacpp_build.py tests/unit/test_llamacpp_runner.py
        tests/unit/test_random_gguf.py tests/unit/worker/test_preload.py
        tests/integration/test_openai_api.py tests/integration/test_cli.py tests/integration/test_faults_input.py
        tests/integration/test_faults_stall.py tests/integration/test_engine_workers.py
        tests/integration/test_admission_live.py tests/integration/test_policies_live.py
        tests/integration/test_observability.py tests/integration/test_remote_backend.py
    )
    if [ -n "${TESTS_DIALECTS:-}" ]; then
        selection+=(
            tests/integration/test_agent_contract.py tests/integration/test_anthropic_dialect.py
            tests/integration/test_ollama_dialect.py tests/integration/test_responses_dialect.py
            tests/integration/test_embeddings_api.py tests/integration/test_embeddings_engines.py
            tests/integration/test_paged_gateway.py
        )
    fi
fi
opts=(-v -rfEs -p no:cacheprovider --durations=10 -o junit_family=xunit2) # -v: a cut-off log names the test that ran last
python3 -c 'import pytest_timeout' 2>/dev/null && opts+=(--timeout=150) # a hang costs one test, not the run

run_tests() { # NAME SECONDS [PREFIX...]: the selection under `timeout`, its log and junit in $OUT
    local name=$1 secs=$2
    shift 2
    echo "== $name: ${#selection[@]} files, at most $secs s"
    # SIGINT at the deadline: pytest stops as on ^C, tears its servers down, and still writes
    # its summary and junit; SIGKILL 20 s later if it has not.
    timeout -s INT -k 20 "$secs" "$@" python3 -m pytest "${opts[@]}" ${extra[@]+"${extra[@]}"} --junitxml="$OUT/junit_$name.xml" "${selection[@]}" \
        >"$OUT/pytest_$name.log" 2>&1
    local rc=$?
    tail -n 30 "$OUT/pytest_$name.log"
    echo "== $name: rc=$rc ($((SECONDS - start)) s in all; 124 or 2 after a KeyboardInterrupt: out of time)"
    return $rc
}

rc_denied=skipped rc_plain=skipped extra=()
room=$(($(left) - 20))
if [ "$room" -ge 60 ]; then
    # Under the filter, the filter's own test cannot see the grant allowed "without" it: left out.
    extra=(--deselect tests/unit/test_deny_amx.py::test_the_grant_is_refused_with_eperm_in_the_command_and_its_children)
    run_tests denied $((room < 330 ? room : 330)) python3 -m gateway.bench.deny_amx # the run that matters most
    rc_denied=$?
    extra=()
fi
room=$(($(left) - 15))
if [ "$room" -ge 60 ]; then
    run_tests plain "$room"
    rc_plain=$?
else
    echo "device_tests: no time left for the plain run ($room s)"
fi
echo "device_tests: under deny_amx rc=$rc_denied, plain rc=$rc_plain ($((SECONDS - start)) s)"
[ "$rc_denied" = 0 ] && [ "$rc_plain" = 0 ]
