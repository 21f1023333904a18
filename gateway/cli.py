"""`turnout` command line: serve, run, pull, models, keys, check, ab, bench, sim."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from backends import models as model_store
from backends.protocol import BackendError, ChatCompletionRequest, ChatMessage
from policies.schema import AuthConfig, Config, ConfigError


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_refusal(config: Config, host: str) -> str | None:
    """Why `serve` must not bind `host` with this config (None: it may)."""
    if config.auth == "none" and not _is_loopback(host):
        return (
            f"refusing to serve on {host} with `auth: none`: without API keys the gateway may only "
            "bind a loopback address (127.0.0.1, ::1, localhost). Set `auth: {store: file}` (or "
            "redis) in the config and create keys with `turnout keys create`."
        )
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.policy_file import load_config

    try:
        config = load_config(args.config)
    except (ConfigError, OSError) as exc:
        print(f"turnout: cannot load config: {exc}", file=sys.stderr)
        return 2
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    refusal = bind_refusal(config, host)
    if refusal:
        print(f"turnout: {refusal}", file=sys.stderr)
        return 2
    for backend in config.backends:  # fetch known default models on first use, as `ollama serve` does
        if backend.kind in ("llamacpp", "paged") and backend.model in model_store.KNOWN_MODELS:
            model_store.pull(backend.model)
    if args.workers > 1:
        _serve_workers(args, config, host, port)
        return 0
    try:
        app = create_app(config, config_path=args.config)
    except ConfigError as exc:
        print(f"turnout: cannot load config: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=host, port=port, log_level=args.log_level, **uvicorn_options(config))
    return 0


def uvicorn_options(config: Config) -> dict[str, object]:
    """uvicorn options for the request path, the same for one process and for `--workers N`:

    - uvloop and httptools (uvicorn[standard]) wherever they are installed (they are
      dependencies; named so that the choice is visible, not left to uvicorn's "auto");
    - the connection guard over that parser (gateway.connections): `server.header_timeout_s`
      and `server.max_connections`, which uvicorn has no options for;
    - no uvicorn access line per request (the gateway writes its own JSON access log,
      gateway.access_log, and a second line per request cost measurable CPU);
    - no uvicorn proxy headers: uvicorn would believe X-Forwarded-For from any loopback peer
      and rewrite the socket peer with it; the gateway decides the client's address itself,
      from `server.trusted_proxies` (gateway.client_address).
    """
    import importlib.util

    from gateway.connections import ConnectionLimits, connection_protocol

    options: dict[str, object] = {"access_log": False, "proxy_headers": False, "timeout_graceful_shutdown": 5}
    if importlib.util.find_spec("uvloop") is not None:
        options["loop"] = "uvloop"
    parser = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
    limits = ConnectionLimits(header_timeout_s=config.server.header_timeout_s, max_connections=config.server.max_connections)
    options["http"] = connection_protocol(limits, parser=parser)
    return options


def _serve_workers(args: argparse.Namespace, config: Config, host: str, port: int) -> None:
    """Several HTTP processes on one port (uvicorn's workers) in front of one engine host,
    which supervises the local models they all share (gateway/engine_host.py): one engine
    worker per model, whatever N is, as vLLM's API servers share one EngineCore. Share rate
    limits through Redis; the processes' metrics are summed through prometheus_client's
    multiprocess mode. The connection guard's limits travel to the processes inside
    uvicorn's (pickled) config; `server.max_connections` applies per process."""
    import tempfile

    import uvicorn

    from gateway.engine_host import HostSupervisor

    os.environ["TURNOUT_CONFIG"] = str(Path(args.config).resolve()) if args.config else ""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="turnout-metrics-")
    engine_host = HostSupervisor()
    os.environ["TURNOUT_ENGINE_HOST"] = f"{engine_host.address}#{engine_host.pid}"
    try:
        uvicorn.run(
            "gateway.app:app_from_env",
            factory=True,
            workers=args.workers,
            host=host,
            port=port,
            log_level=args.log_level,
            **uvicorn_options(config),
        )
    finally:
        engine_host.stop()


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


def cmd_ps(args: argparse.Namespace) -> int:
    """Print `/admin/ps` as a table, as `ollama ps` does."""
    import time

    import httpx

    key = os.environ.get(args.admin_key_env)
    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.get(args.url.rstrip("/") + "/admin/ps", headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        print(f"turnout: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        print(f"turnout: {response.status_code}: {response.json().get('error', {}).get('message', response.text)}", file=sys.stderr)
        return 1
    print(f"{'NAME':<20} {'MODEL':<24} {'STATE':<11} {'PID':>7} {'MEMORY':>9} {'UNTIL':<20} {'RESTARTS':>8}")
    for row in response.json()["models"]:
        expires = row["expires_at"]
        until = "forever" if row["state"] == "ready" and expires is None else (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires)) if expires else "-"
        )
        memory = f"{row['memory_bytes'] / (1 << 20):.0f} MiB" if row["memory_bytes"] else "-"
        print(f"{row['name']:<20} {row['model']:<24} {row['state']:<11} {row['pid'] or '-':>7} {memory:>9} {until:<20} {row['restarts']:>8}")
    return 0


# -- turnout keys ---------------------------------------------------------------------------


def _key_store(config_path: str | None) -> object:
    """The store a config names: `auth.store: redis` -> Redis, else the file store (its
    `auth.path`, or $TURNOUT_HOME/keys.json when the config has `auth: none`)."""
    from gateway.policy_file import load_config
    from gateway.keys import FileKeyStore, RedisKeyStore

    config = load_config(config_path)
    if isinstance(config.auth, AuthConfig) and config.auth.store == "redis":
        assert config.redis is not None  # the schema requires it
        return RedisKeyStore(config.redis.url, config.redis.prefix)
    return FileKeyStore(config.auth.path if isinstance(config.auth, AuthConfig) else None)


def _when(epoch: float | None) -> str:
    from datetime import datetime, timezone

    return "-" if epoch is None else datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_keys(args: argparse.Namespace) -> int:
    import json

    from gateway.keys import KeyNotFound, new_key, parse_expiry

    try:
        store = _key_store(args.config)
        if args.keys_command == "create":
            expires = parse_expiry(args.expires) if args.expires else None
            models = tuple(m.strip() for m in (args.models or "").split(",") if m.strip())
            secret, record = new_key(
                args.name, tenant=args.tenant, models=models, rpm=args.rpm, tpm=args.tpm, priority=args.priority, expires=expires
            )
            store.add(record)  # type: ignore[attr-defined]
            print(f"created {record.id} ({record.name}); the secret is shown once, store it now:", file=sys.stderr)
            print(secret)
            return 0
        if args.keys_command == "list":
            records = store.list()  # type: ignore[attr-defined]
            if args.json:
                print(json.dumps([{k: v for k, v in r.to_json().items() if k != "hash"} for r in records], indent=1))
                return 0
            print(f"{'ID':<17} {'NAME':<16} {'TENANT':<12} {'MODELS':<20} {'RPM':>6} {'TPM':>8} {'PRIORITY':<11} {'EXPIRES':<20} {'STATUS':<8} KEY")
            for r in records:
                status = "revoked" if r.revoked else ("expired" if r.expired() else "active")
                models = ",".join(r.models) or "*"
                print(
                    f"{r.id:<17} {r.name:<16} {r.tenant:<12} {models:<20} {r.rpm or '-':>6} {r.tpm or '-':>8} "
                    f"{r.priority:<11} {_when(r.expires):<20} {status:<8} {r.hint}"
                )
            return 0
        record = store.revoke(args.key)  # type: ignore[attr-defined]
        print(f"revoked {record.id} ({record.name})")
        return 0
    except (ConfigError, OSError, ValueError, KeyNotFound) as exc:
        print(f"turnout: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # redis errors: the store is unreachable
        print(f"turnout: key store unavailable: {exc}", file=sys.stderr)
        return 1


def cmd_check(args: argparse.Namespace) -> int:
    """Validate policy files offline (for ops' own CI): exit 0 when all are valid."""
    from gateway.policy_file import load_config
    from gateway.registry import build_backend

    failed = 0
    for path in args.configs:
        try:
            config = load_config(path)  # the schema and each backend's options, by file, line and field
            for backend in config.backends:  # and what only building tells (an unset api_key_env)
                try:
                    build_backend(backend)
                except ConfigError as exc:
                    raise ConfigError(f"{path}: {exc}") from exc
        except (ConfigError, OSError) as exc:
            print(f"{exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: ok ({len(config.backends)} backends, {len(config.aliases())} models, {len(config.experiments)} experiments)")
    return 1 if failed else 0


# -- the tools: their modules are imported here, when their command runs, never by `serve` ----


def cmd_ab_report(args: argparse.Namespace) -> int:
    from gateway.ab import report

    return report.main(args.args)


def cmd_bench_engine(args: argparse.Namespace) -> int:
    from gateway.bench import engine  # numpy at import; torch when it runs

    return engine.main(args.args)


def cmd_bench_embeddings(args: argparse.Namespace) -> int:
    from gateway.bench import embeddings  # stdlib at import; the engines when it runs

    return embeddings.main(args.args)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from gateway.bench import serve  # stdlib at import; aiohttp/matplotlib when it runs

    return serve.main(args.args)


def cmd_sim(args: argparse.Namespace) -> int:
    from gateway.sim import simulator

    return simulator.main(args.args)


def _tool(sub: argparse._SubParsersAction, name: str, summary: str, func: object) -> None:
    """A command whose options its own module parses (`turnout ... NAME --help` prints them):
    everything after NAME goes to that module's `main`, so the CLI need not import it."""
    tool = sub.add_parser(name, help=summary, add_help=False)
    tool.add_argument("args", nargs=argparse.REMAINDER)
    tool.set_defaults(func=func, passthrough=True)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turnout", description="An OpenAI-shaped LLM gateway.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI API for a config's backends")
    serve.add_argument("--config", help="policy file (default: the embedded config/default.yaml)")
    serve.add_argument("--host", help="bind address (overrides server.host)")
    serve.add_argument("--port", type=int, help="port (overrides server.port)")
    serve.add_argument("--workers", type=_positive, default=1, help="HTTP processes (default 1); with more, one engine host supervises the local models all of them share")
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

    ps = sub.add_parser("ps", help="list a running gateway's local models: loaded or not, process, memory, expiry")
    ps.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway (default http://127.0.0.1:8080)")
    ps.add_argument("--admin-key-env", default="TURNOUT_ADMIN_KEY", help="env var holding the admin key, if the gateway has one")
    ps.set_defaults(func=cmd_ps)

    check = sub.add_parser("check", help="validate policy files without serving them")
    check.add_argument("configs", nargs="+", metavar="CONFIG")
    check.set_defaults(func=cmd_check)

    ab = sub.add_parser("ab", help="A/B experiments")
    ab_sub = ab.add_subparsers(dest="ab_command", required=True)
    _tool(ab_sub, "report", "per-variant latency, errors and throughput, with confidence intervals, and the decision", cmd_ab_report)

    keys = sub.add_parser("keys", help="create, list and revoke API keys")
    keys.add_argument("--config", help="policy file naming the key store (default: the embedded config)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key; prints its secret once")
    create.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    create.add_argument("--name", required=True)
    create.add_argument("--tenant", default="default", help="limits are per key and per tenant (default: default)")
    create.add_argument("--models", help="comma-separated model ids the key may use (default: all)")
    create.add_argument("--rpm", type=_positive, help="requests per minute (default: limits.key.rpm)")
    create.add_argument("--tpm", type=_positive, help="tokens per minute (default: limits.key.tpm)")
    create.add_argument("--priority", choices=["interactive", "batch"], default="interactive")
    create.add_argument("--expires", help="ISO date or datetime (UTC unless it says otherwise)")
    listing = keys_sub.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    listing.add_argument("--json", action="store_true")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id (or by name, when unique)")
    revoke.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    revoke.add_argument("key")
    keys.set_defaults(func=cmd_keys)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    _tool(bench_sub, "engine", "paged engine throughput on GPU vs transformers and the roofline", cmd_bench_engine)
    _tool(bench_sub, "serve", "load-test any OpenAI-compatible URL: TTFT, ITL, e2e, req/s", cmd_bench_serve)
    _tool(bench_sub, "embeddings", "embedding inputs/s: paged engine vs the llama.cpp runner", cmd_bench_embeddings)

    _tool(sub, "sim", "simulate routing strategies over N replicas (turnout sim --help)", cmd_sim)
    return parser


# Libraries whose INFO lines are per-request noise: httpx logs one per request it makes
# (a remote backend's metrics scrape, every 500 ms). Their warnings still show.
QUIET_LOGGERS = ("httpx", "httpcore")


def configure_logging() -> None:
    """The processes' logging: INFO and up on stderr, one line per record; chatty libraries
    at WARNING. `turnout serve --workers N` runs it again in each worker (gateway.app)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `turnout` console script."""
    configure_logging()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):
        args.args = unknown + args.args  # everything after the tool's name is its own
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
