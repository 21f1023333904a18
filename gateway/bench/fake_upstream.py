"""A fake OpenAI-compatible upstream, as cheap as Python allows, to isolate a gateway's own
cost in benchmarks (a program, not a test fixture).

Raw asyncio HTTP/1.1 on uvloop when installed: no framework, no validation, keep-alive,
pipelining-safe. It answers

- `POST /v1/chat/completions` and `POST /v1/completions`, streamed (SSE over chunked
  transfer encoding, a usage chunk when `stream_options.include_usage`, then `[DONE]`) or not;
  `max_tokens` (default 16) tokens of "tok", at once or at `--tokens-per-s`;
- `POST /v1/embeddings`: a fixed unit vector per input (float or base64);
- `GET /v1/models`, `GET /metrics` (vLLM-named load gauges, all idle), `GET /healthz`.

    .venv/bin/python -m gateway.bench.fake_upstream --port 9100 [--tokens-per-s 0] [--model fake]

Loopback only by default (it has no auth).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import struct
import time
from typing import Any

DEFAULT_MAX_TOKENS = 16
EMBEDDING_DIMS = 8
METRICS = (
    b"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0\n"
    b"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 0\n"
    b"# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc 0\n"
)


def _response(status: bytes, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: " + content_type
        + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip


def _chunk(data: bytes) -> bytes:
    """One chunk of chunked transfer encoding."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class Upstream:
    """The answers; `tokens_per_s` 0 means every token at once."""

    def __init__(self, model: str, tokens_per_s: float) -> None:
        self.model = model
        self.interval = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0
        self.models_body = json.dumps(
            {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "fake"}]}
        ).encode()
        self.served = 0

    def whole(self, chat: bool, n: int, prompt_tokens: int) -> bytes:
        text = "tok " * n
        created = int(time.time())
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        if chat:
            body: dict[str, Any] = {
                "id": "chatcmpl-fake", "object": "chat.completion", "created": created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
                "usage": usage,
            }  # fmt: skip
        else:
            body = {
                "id": "cmpl-fake", "object": "text_completion", "created": created, "model": self.model,
                "choices": [{"index": 0, "text": text, "finish_reason": "length"}], "usage": usage,
            }  # fmt: skip
        return json.dumps(body, separators=(",", ":")).encode()

    def embeddings(self, request: dict[str, Any], prompt_tokens: int) -> bytes:
        """One unit vector (EMBEDDING_DIMS) per input, as floats or base64 float32."""
        given = request.get("input")
        count = len(given) if isinstance(given, list) and given and isinstance(given[0], (str, list)) else 1
        vector = [1.0] + [0.0] * (EMBEDDING_DIMS - 1)
        packed: Any = vector
        if request.get("encoding_format") == "base64":
            packed = base64.b64encode(struct.pack(f"<{EMBEDDING_DIMS}f", *vector)).decode()
        body = {
            "object": "list", "model": self.model,
            "data": [{"object": "embedding", "index": i, "embedding": packed} for i in range(count)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }  # fmt: skip
        return json.dumps(body, separators=(",", ":")).encode()

    def events(self, chat: bool, n: int, prompt_tokens: int, usage: bool) -> list[bytes]:
        """The SSE events of one streamed answer (the first carries the role, the last the
        finish reason), each `data: ...\\n\\n`."""
        created = int(time.time())
        head = (
            '{"id":"chatcmpl-fake","object":"chat.completion.chunk","created":%d,"model":%s,"choices":'
            if chat
            else '{"id":"cmpl-fake","object":"text_completion","created":%d,"model":%s,"choices":'
        ) % (created, json.dumps(self.model))
        out = []
        for i in range(n):
            finish = '"length"' if i == n - 1 else "null"
            if chat:
                role = '"role":"assistant",' if i == 0 else ""
                choice = '[{"index":0,"delta":{%s"content":"tok "},"finish_reason":%s}]' % (role, finish)
            else:
                choice = '[{"index":0,"text":"tok ","finish_reason":%s}]' % finish
            out.append(("data: " + head + choice + "}\n\n").encode())
        if usage:
            u = '{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}' % (prompt_tokens, n, prompt_tokens + n)
            out.append(("data: " + head + '[],"usage":' + u + "}\n\n").encode())
        out.append(b"data: [DONE]\n\n")
        return out


class _Connection(asyncio.Protocol):
    """One keep-alive connection: requests are parsed from the buffer and answered in order."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.queue: asyncio.Queue[tuple[bytes, bytes, bytes] | None] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.worker is not None:
            self.worker.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            lines = head.split(b"\r\n")
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            method, path, _ = (lines[0].split(b" ") + [b"", b""])[:3]
            if not self._answer_now(method, path, body):
                self.queue.put_nowait((method, path, body))
                if self.worker is None:
                    self.worker = asyncio.get_running_loop().create_task(self._work())

    def _answer_now(self, method: bytes, path: bytes, body: bytes) -> bool:
        """Answer synchronously when nothing is queued and no waiting is needed (the
        common case: one request at a time per connection, tokens at once)."""
        if self.worker is not None and not self.queue.empty():
            return False
        if self.worker is not None and self._busy:
            return False
        answer = self._plain(method, path, body)
        if answer is None:
            return False
        assert self.transport is not None
        self.transport.write(answer)
        return True

    _busy = False

    def _plain(self, method: bytes, path: bytes, body: bytes) -> bytes | None:
        """The whole answer when it needs no pacing, else None."""
        up = self.upstream
        path = path.split(b"?", 1)[0]
        if method == b"GET":
            if path == b"/v1/models":
                return _response(b"200 OK", up.models_body)
            if path == b"/metrics":
                return _response(b"200 OK", METRICS, b"text/plain; version=0.0.4")
            if path in (b"/healthz", b"/health"):
                return _response(b"200 OK", b'{"status":"ok"}')
            return _response(b"404 Not Found", b'{"error":{"message":"not found","type":"invalid_request_error"}}')
        if path not in (b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings"):
            return _response(b"404 Not Found", b'{"error":{"message":"not found","type":"invalid_request_error"}}')
        try:
            request = json.loads(body)
        except ValueError:
            return _response(b"400 Bad Request", b'{"error":{"message":"bad json","type":"invalid_request_error"}}')
        up.served += 1
        if path == b"/v1/embeddings":
            return _response(b"200 OK", up.embeddings(request, max(1, len(body) // 4)))
        chat = path == b"/v1/chat/completions"
        n = int(request.get("max_tokens") or request.get("max_completion_tokens") or DEFAULT_MAX_TOKENS)
        prompt_tokens = max(1, len(body) // 4)
        if not request.get("stream"):
            if up.interval:
                return None  # paced: the worker sleeps n intervals first
            return _response(b"200 OK", up.whole(chat, n, prompt_tokens))
        if up.interval:
            return None
        options = request.get("stream_options") or {}
        events = up.events(chat, n, prompt_tokens, bool(options.get("include_usage")))
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        return head + b"".join(_chunk(e) for e in events) + b"0\r\n\r\n"

    async def _work(self) -> None:
        """Paced answers, one request after another (HTTP/1.1 answers in order)."""
        assert self.transport is not None
        up = self.upstream
        while True:
            item = await self.queue.get()
            if item is None:
                return
            self._busy = True
            try:
                method, path, body = item
                unpaced = not up.interval or method == b"GET" or path.split(b"?", 1)[0] == b"/v1/embeddings"
                answer = self._plain(method, path, body) if unpaced else None
                if answer is not None:
                    self.transport.write(answer)
                    continue
                request = json.loads(body)
                chat = path.split(b"?", 1)[0] == b"/v1/chat/completions"
                n = int(request.get("max_tokens") or request.get("max_completion_tokens") or DEFAULT_MAX_TOKENS)
                prompt_tokens = max(1, len(body) // 4)
                if not request.get("stream"):
                    await asyncio.sleep(up.interval * n)
                    self.transport.write(_response(b"200 OK", up.whole(chat, n, prompt_tokens)))
                    continue
                options = request.get("stream_options") or {}
                events = up.events(chat, n, prompt_tokens, bool(options.get("include_usage")))
                self.transport.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
                )
                for i, event in enumerate(events):
                    if i < n:
                        await asyncio.sleep(up.interval)
                    if self.transport.is_closing():
                        break  # the client left: stop "generating"
                    self.transport.write(_chunk(event))
                else:
                    self.transport.write(b"0\r\n\r\n")
            finally:
                self._busy = False


async def serve(host: str, port: int, model: str, tokens_per_s: float, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled."""
    upstream = Upstream(model, tokens_per_s)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(upstream), host, port, backlog=1024, reuse_address=True)
    if ready is not None:
        ready.set()
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--model", default="fake")
    parser.add_argument("--tokens-per-s", type=float, default=0.0, help="0: every token at once (default)")
    args = parser.parse_args(argv)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(args.host, args.port, args.model, args.tokens_per_s))
    except KeyboardInterrupt:
        pass
    return 0


def _loop_factory() -> Any:
    """uvloop's event loop where installed (cheaper per request), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    raise SystemExit(main())
