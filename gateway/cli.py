"""`turnout` command line: serve, run, pull, models."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import sys
from collections.abc import Sequence

from backends import models as model_store
from backends.protocol import BackendError, ChatCompletionRequest, ChatMessage
from policies.schema import ConfigError


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app, load_config

    try:
        config = load_config(args.config)
    except (ConfigError, OSError) as exc:
        print(f"turnout: cannot load config: {exc}", file=sys.stderr)
        return 2
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    if config.auth == "none" and not _is_loopback(host):
        print(
            f"turnout: refusing to serve on {host} with `auth: none`: without API keys the gateway "
            "may only bind a loopback address (127.0.0.1, ::1, localhost)",
            file=sys.stderr,
        )
        return 2
    for backend in config.backends:  # fetch known default models on first use, as `ollama serve` does
        if backend.kind in ("llamacpp", "paged") and backend.model in model_store.KNOWN_MODELS:
            model_store.pull(backend.model)
    uvicorn.run(create_app(config), host=host, port=port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    try:
        path = model_store.pull(args.name)
    except BackendError as exc:
        print(f"turnout: {exc.message}", file=sys.stderr)
        return 1
    print(path)
    return 0


def cmd_models(_: argparse.Namespace) -> int:
    found = model_store.list_models()
    if not found:
        print(f"no models in {model_store.store_dir()}; try `turnout pull {model_store.DEFAULT_MODEL}`")
        return 0
    print(f"{'NAME':<28} {'SIZE':>10}  PATH")
    for name, path, size in found:
        print(f"{name:<28} {size / 1e6:>8.1f}MB  {path}")
    return 0


async def _chat_once(backend: object, history: list[ChatMessage], args: argparse.Namespace) -> str:
    """Stream one assistant turn to stdout; return its text."""
    request = ChatCompletionRequest(
        model=args.model, messages=history, max_tokens=args.max_tokens, temperature=args.temperature, stream=True
    )
    parts: list[str] = []
    async for chunk in backend.chat_stream(request):  # type: ignore[attr-defined]
        for choice in chunk.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
                print(choice.delta.content, end="", flush=True)
    print()
    return "".join(parts)


async def _run(args: argparse.Namespace) -> int:
    from backends.llamacpp.runner import LlamaCppBackend

    if args.model in model_store.KNOWN_MODELS:
        model_store.pull(args.model)
    backend = LlamaCppBackend(name="run", model=args.model, model_id=args.model, n_ctx=args.ctx)
    await backend.start()
    history: list[ChatMessage] = [ChatMessage(role="system", content=args.system)] if args.system else []
    try:
        if args.prompt:
            history.append(ChatMessage(role="user", content=" ".join(args.prompt)))
            await _chat_once(backend, history, args)
            return 0
        print("Send a message (/bye to exit, /clear to forget the conversation)")
        while True:
            try:
                line = input(">>> ").strip()
            except EOFError:
                print()
                return 0
            if line in ("/bye", "/exit", "/quit"):
                return 0
            if line == "/clear":
                del history[1 if args.system else 0 :]
                continue
            if not line:
                continue
            history.append(ChatMessage(role="user", content=line))
            try:
                answer = await _chat_once(backend, history, args)
            except BackendError as exc:
                print(f"error: {exc.message}", file=sys.stderr)
                history.pop()
                continue
            history.append(ChatMessage(role="assistant", content=answer))
    finally:
        await backend.close()


def cmd_run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except BackendError as exc:
        print(f"turnout: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turnout", description="An OpenAI-shaped LLM gateway.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI API for a config's backends")
    serve.add_argument("--config", help="policy file (default: the embedded config/default.yaml)")
    serve.add_argument("--host", help="bind address (overrides server.host)")
    serve.add_argument("--port", type=int, help="port (overrides server.port)")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_serve)

    run = sub.add_parser("run", help="answer one prompt, or chat in the terminal without PROMPT")
    run.add_argument("model", help="a model name from `turnout models` or a path to a .gguf")
    run.add_argument("prompt", nargs="*", help="the prompt; omit for an interactive chat")
    run.add_argument("--system", help="a system message")
    run.add_argument("--max-tokens", type=int, default=512)
    run.add_argument("--temperature", type=float, default=0.7)
    run.add_argument("--ctx", type=int, default=4096, help="context window in tokens")
    run.set_defaults(func=cmd_run)

    pull = sub.add_parser("pull", help="download a model into the model store")
    pull.add_argument("name", help=f"one of {', '.join(model_store.KNOWN_MODELS)}, or hf:ORG/REPO/FILE")
    pull.set_defaults(func=cmd_pull)

    models = sub.add_parser("models", help="list the model store")
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `turnout` console script."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
