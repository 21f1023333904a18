"""Benchmark (a program, not a test): preparing a chat of many messages on the llama.cpp
runner. Renders N one-word messages with the model's own template, then tokenizes the prompt
two ways in the same run: as one text (what the runner did before issue 17: llama.cpp's
special-token pass is quadratic in the number of fragments) and in pieces (the runner's
`tokenize`, which gives the same tokens).

    .venv/bin/python -m gateway.bench.long_prompt [--messages 20000 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time

from backends.chat_template import render_chat
from backends.llamacpp.runner import LlamaCppBackend
from backends.models import pull
from backends.protocol import ChatMessage


def main(argv: list[str] | None = None) -> int:
    """Print, per message count: render, whole-text tokenize and pieced tokenize seconds."""
    parser = argparse.ArgumentParser(prog="python -m gateway.bench.long_prompt")
    parser.add_argument("--messages", type=int, nargs="+", default=[5000, 20000])
    args = parser.parse_args(argv)
    backend = LlamaCppBackend("bench", str(pull("smollm2-135m")), n_ctx=512, n_threads=1)
    asyncio.run(backend.start())
    try:
        llm = backend._pool[0]  # noqa: SLF001 - the one-text pass, as the runner did before
        template = backend.chat_template()[0]
        print(f"machine: {platform.machine()}, Python {platform.python_version()}; SmolLM2-135M-Instruct Q4_1")
        print(f"{'messages':>9} {'prompt KiB':>10} {'render s':>9} {'whole s':>9} {'pieces s':>9} {'same':>5}")
        for n in args.messages:
            messages = [ChatMessage(role=("user", "assistant")[i % 2], content="word") for i in range(n)]
            t0 = time.perf_counter()
            prompt = render_chat(template, messages)
            t1 = time.perf_counter()
            whole = llm.tokenize(prompt.encode(), add_bos=True, special=True)
            t2 = time.perf_counter()
            pieces = backend.tokenize(prompt)
            t3 = time.perf_counter()
            print(f"{n:>9} {len(prompt) / 1024:>10.0f} {t1 - t0:>9.3f} {t2 - t1:>9.3f} {t3 - t2:>9.3f} {str(whole == pieces):>5}")
    finally:
        asyncio.run(backend.close())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
