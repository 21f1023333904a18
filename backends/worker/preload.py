"""What an engine worker loads before anything else (imports nothing heavy itself).

A llama.cpp engine's native libraries come first. On the lent GPU machines, a CUDA build of
llama-cpp-python (compiled there with that machine's own toolchain) loaded and ran a model in a
bare process, but died of SIGSEGV at model load whenever numpy or pyzmq had been imported
before it, as every worker imports them (the runtime libraries those loaded first were taken
for its own); with llama_cpp imported first, the same load succeeded
(docs/benchmarks.md, the peer run). So the worker imports it before its own modules."""

from __future__ import annotations

import json


def load_engine_libraries(spec_json: str) -> None:
    """Import the native engine a worker spec names, ahead of the worker's own imports."""
    try:
        kind = json.loads(spec_json).get("kind")
    except (ValueError, AttributeError):
        return  # the worker itself reports a bad spec
    if kind == "llamacpp":
        import llama_cpp  # noqa: F401  (loads libllama, libggml and their backends)
