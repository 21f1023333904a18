"""`kind: litellm`: providers that do not speak OpenAI's API (Anthropic, Bedrock, Vertex, ...)
through litellm, mapped to this project's wire types and errors.

litellm is imported lazily (it is slow to import and optional); its responses are
converted field by field into our models rather than validated wholesale, so provider
extras litellm adds cannot break a response. Errors follow the one upstream status policy
(backends/remote/upstream_errors.py), applied to the provider's status.

Tool calling (tools, tool_choice, parallel_tool_calls and the tool history) and `n` are
passed on in OpenAI's shape, which litellm translates per provider; what a provider lacks is
a 400 naming it (drop_params off), what this backend cannot pass on is refused by name.
A streamed `n > 1` is served as n one-choice streams merged under their choice indices:
litellm's stream wrapper keeps one finish reason per stream, so it cannot carry several.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import httpx

from backends.protocol import (
    BackendError,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChunkChoice,
    ChunkDelta,
    ChunkFunctionCall,
    ChunkToolCall,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ContextLengthExceeded,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    InvalidRequest,
    LoadReport,
    ModelCard,
    ResponseFunctionCall,
    ResponseMessage,
    ResponseToolCall,
    Usage,
)
from backends.remote.openai_http import _before
from backends.remote.upstream_errors import OVERLOADED_STATUSES, RemoteFailure, error_for_status

T = TypeVar("T")

_FINISH = {"stop": "stop", "length": "length", "content_filter": "content_filter", "tool_calls": "tool_calls", "function_call": "tool_calls"}
_litellm: Any = None
# Request fields this backend neither passes to litellm nor reads back from its answers.
_UNFORWARDED = ("top_k", "min_p", "repetition_penalty", "ignore_eos", "logit_bias", "logprobs", "top_logprobs", "echo", "continue_final_message")
# The first parameter litellm's UnsupportedParamsError names ("... does not support parameters: ['seed'], ...").
_UNSUPPORTED = re.compile(r"does not support parameters: \[\s*'([^']+)'")


def _lib() -> Any:
    """Import litellm once, configured for a server: no network fetch of its cost map at
    import (gateways often have no egress), httpx transport (one HTTP stack, respx-testable)."""
    global _litellm
    if _litellm is None:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm

        litellm.disable_aiohttp_transport = True
        litellm.suppress_debug_info = True
        litellm.telemetry = False
        _litellm = litellm
    return _litellm


def _get(obj: Any, key: str, default: Any = None) -> Any:
    """Attribute or key access: litellm objects are pydantic models that also act as dicts."""
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _set(obj: Any, key: str, value: Any) -> None:
    """Attribute or key assignment, as `_get` reads."""
    if isinstance(obj, dict):
        obj[key] = value
    else:
        setattr(obj, key, value)


def _finish(reason: Any) -> str | None:
    return _FINISH.get(reason) if reason else None


def _usage(raw: Any) -> Usage | None:
    """Usage as litellm reports it (its total where it gives one)."""
    if raw is None:
        return None
    prompt, completion = int(_get(raw, "prompt_tokens", 0) or 0), int(_get(raw, "completion_tokens", 0) or 0)
    total = _get(raw, "total_tokens")
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total if isinstance(total, int) else prompt + completion)


def _message(m: ChatMessage) -> dict[str, Any]:
    """A history message in OpenAI's shape, which litellm translates per provider (an
    assistant's tool_calls into Anthropic's tool_use blocks, a tool result into tool_result)."""
    # Providers know system, user, assistant and tool; developer is OpenAI's new name for system.
    # An assistant that only called tools has no content (an empty text block is an error to some).
    out: dict[str, Any] = {
        "role": "system" if m.role == "developer" else m.role,
        "content": None if m.content is None and m.tool_calls else m.text(),
    }
    if m.name:
        out["name"] = m.name
    if m.tool_calls:
        out["tool_calls"] = [call.model_dump() for call in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _response_tool_calls(raw: Any) -> list[ResponseToolCall] | None:
    """A non-streamed message's tool calls (litellm's `message.tool_calls`), None without any."""
    calls = [
        ResponseToolCall(
            id=_get(call, "id") or f"call_{uuid.uuid4().hex[:24]}",  # a client must be able to answer it
            function=ResponseFunctionCall(name=_get(fn, "name") or "", arguments=_get(fn, "arguments") or ""),
        )
        for call in raw or []
        for fn in (_get(call, "function"),)
    ]
    return calls or None


def _chunk_tool_calls(raw: Any) -> list[ChunkToolCall] | None:
    """A streamed delta's tool-call fragments, as the provider streamed them (through litellm):
    index, id, type and name where it sent them, and each fragment of the arguments."""
    calls = [
        ChunkToolCall(
            index=int(_get(call, "index", position) or 0),
            id=_get(call, "id"),
            type="function" if _get(call, "type") == "function" else None,
            function=ChunkFunctionCall(name=_get(fn, "name"), arguments=_get(fn, "arguments")),
        )
        for position, call in enumerate(raw or [])
        for fn in (_get(call, "function"),)
    ]
    return calls or None


class LiteLLMBackend:
    """A Backend over `litellm.acompletion` / `atext_completion` with a litellm model string."""

    def __init__(
        self,
        name: str,
        model: str,
        *,
        model_id: str | None = None,
        api_key_env: str | None = None,
        url: str | None = None,
        first_token_timeout_s: float = 60,
        total_timeout_s: float = 600,
        max_concurrency: int = 100,
        **litellm_kwargs: Any,
    ) -> None:
        """`model` is litellm's model string ("anthropic/claude-3-haiku-20240307");
        `url` an optional api_base; `litellm_kwargs` (aws_region_name, ...) go to every call."""
        self.name = name
        self.model = model
        self.model_id = model_id or model.rsplit("/", 1)[-1]
        self.api_base = url
        self.api_key: str | None = None
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise ValueError(f"backend {name!r}: environment variable {api_key_env} (api_key_env) is not set")
        self.first_token_timeout_s = first_token_timeout_s
        self.total_timeout_s = total_timeout_s
        self.max_concurrency = max_concurrency
        self.litellm_kwargs = litellm_kwargs
        self._in_flight = 0
        self._unreachable = False

    async def start(self) -> None:
        """Import litellm now rather than on the first request."""
        await asyncio.to_thread(_lib)

    async def close(self) -> None:
        """Nothing to release: litellm owns its HTTP clients."""

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def models(self) -> list[ModelCard]:
        return [ModelCard(id=self.model_id, owned_by=self.model.split("/", 1)[0])]

    def load(self) -> LoadReport:
        """Providers publish no load: our own in-flight count, unhealthy while unreachable."""
        return LoadReport(running=self._in_flight, max_running=self.max_concurrency, healthy=not self._unreachable)

    # -- the Backend protocol ------------------------------------------------------------------

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion:
        raw = await self._call("acompletion", self._chat_kwargs(request))
        choices = [
            ChatChoice(
                index=int(_get(c, "index", i) or 0),
                message=ResponseMessage(content=_get(message, "content"), tool_calls=_response_tool_calls(_get(message, "tool_calls"))),
                finish_reason=_finish(_get(c, "finish_reason")),  # type: ignore[arg-type]
            )
            for i, c in enumerate(_get(raw, "choices") or [])
            for message in (_get(c, "message"),)
        ]
        return ChatCompletion(
            id=_get(raw, "id") or f"chatcmpl-{uuid.uuid4().hex[:24]}",
            created=int(_get(raw, "created") or time.time()),
            model=request.model,
            choices=choices,
            usage=_usage(_get(raw, "usage")),
        )

    def chat_stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        kwargs = self._stream_kwargs(request, self._chat_kwargs(request))

        def convert(raw: Any) -> ChatCompletionChunk | None:
            choices = []
            for i, c in enumerate(_get(raw, "choices") or []):
                delta = _get(c, "delta")
                role, content, tool_calls = _get(delta, "role"), _get(delta, "content"), _chunk_tool_calls(_get(delta, "tool_calls"))
                choices.append(
                    ChunkChoice(
                        index=int(_get(c, "index", i) or 0),
                        delta=ChunkDelta(
                            role="assistant" if role == "assistant" else None,
                            # litellm puts "" beside tool-call fragments; OpenAI's deltas have null.
                            content=None if tool_calls and not content else content,
                            tool_calls=tool_calls,
                        ),
                        finish_reason=_finish(_get(c, "finish_reason")),  # type: ignore[arg-type]
                    )
                )
            usage = _usage(_get(raw, "usage")) if request.wants_usage_chunk() else None
            if not choices and usage is None:
                return None
            return ChatCompletionChunk(
                id=_get(raw, "id") or "chatcmpl-litellm",
                created=int(_get(raw, "created") or time.time()),
                model=request.model,
                choices=choices,
                usage=usage,
            )

        return self._stream("acompletion", kwargs, convert)

    async def completion(self, request: CompletionRequest) -> Completion:
        raw = await self._call("atext_completion", self._completion_kwargs(request))
        return Completion(
            id=_get(raw, "id") or f"cmpl-{uuid.uuid4().hex[:24]}",
            created=int(_get(raw, "created") or time.time()),
            model=request.model,
            choices=[
                CompletionChoice(
                    index=int(_get(c, "index", i) or 0),
                    text=_get(c, "text") or "",
                    finish_reason=_finish(_get(c, "finish_reason")),  # type: ignore[arg-type]
                )
                for i, c in enumerate(_get(raw, "choices") or [])
            ],
            usage=_usage(_get(raw, "usage")),
        )

    def completion_stream(self, request: CompletionRequest) -> AsyncIterator[Completion]:
        kwargs = self._stream_kwargs(request, self._completion_kwargs(request))

        def convert(raw: Any) -> Completion | None:
            choices = [
                CompletionChoice(
                    index=int(_get(c, "index", i) or 0),
                    # Text streams carry `text`; litellm's chat-backed ones may carry a delta.
                    text=_get(c, "text") or _get(_get(c, "delta"), "content") or "",
                    finish_reason=_finish(_get(c, "finish_reason")),  # type: ignore[arg-type]
                )
                for i, c in enumerate(_get(raw, "choices") or [])
            ]
            usage = _usage(_get(raw, "usage")) if request.wants_usage_chunk() else None
            if not choices and usage is None:
                return None
            return Completion(
                id=_get(raw, "id") or "cmpl-litellm",
                created=int(_get(raw, "created") or time.time()),
                model=request.model,
                choices=choices,
                usage=usage,
            )

        return self._stream("atext_completion", kwargs, convert)

    async def embeddings(self, request: EmbeddingRequest) -> EmbeddingResponse:
        """`litellm.aembedding`: input, dimensions, encoding_format and user passed on in
        OpenAI's shape (a provider without one is a 400 naming it: drop_params off);
        keep_alive and truncate, which no provider call takes, refused by name."""
        for param in ("keep_alive", "truncate"):
            if getattr(request, param) is not None:
                raise InvalidRequest(f"{param} is not supported by backend {self.name!r} ({self.model})", param=param)
        kwargs: dict[str, Any] = {
            "model": self.model,
            "input": request.input if isinstance(request.input, list) else [request.input],
            "timeout": self.total_timeout_s,
            "num_retries": 0,
            "drop_params": False,
            **self.litellm_kwargs,
        }
        if self.api_key:
            kwargs["api_key"] = self.api_key
        if self.api_base:
            kwargs["api_base"] = self.api_base
        for field in ("dimensions", "user"):
            value = getattr(request, field)
            if value is not None:
                kwargs[field] = value
        if "encoding_format" in request.model_fields_set:
            kwargs["encoding_format"] = request.encoding_format
        raw = await self._call("aembedding", kwargs)
        data = [
            Embedding(index=int(_get(item, "index", i)), embedding=_get(item, "embedding"))
            for i, item in enumerate(_get(raw, "data") or [])
        ]
        usage = _get(raw, "usage")
        prompt = int(_get(usage, "prompt_tokens", 0) or 0)
        total = _get(usage, "total_tokens")
        return EmbeddingResponse(
            data=data, model=request.model, usage=EmbeddingUsage(prompt_tokens=prompt, total_tokens=total if isinstance(total, int) else prompt)
        )

    # -- internals -----------------------------------------------------------------------------

    def _common(self, request: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
        if request.keep_alive is not None:  # no provider keeps a model loaded on request
            raise InvalidRequest(f"keep_alive applies to local models; backend {self.name!r} ({self.model}) cannot honour it", param="keep_alive")
        for param in _UNFORWARDED:  # what this backend does not pass on or read back: refused, never dropped
            if getattr(request, param, None) not in (None, False):
                raise InvalidRequest(f"{param} is not supported by backend {self.name!r} ({self.model})", param=param)
        if getattr(request, "add_generation_prompt", None) is False:
            raise InvalidRequest(f"add_generation_prompt is not supported by backend {self.name!r} ({self.model})", param="add_generation_prompt")
        if request.stream_options is not None and request.stream_options.continuous_usage_stats:
            raise InvalidRequest(
                f"stream_options.continuous_usage_stats is not supported by backend {self.name!r} ({self.model})",
                param="stream_options.continuous_usage_stats",
            )
        kwargs: dict[str, Any] = {
            "model": self.model,
            "timeout": self.total_timeout_s,
            "num_retries": 0,  # the gateway retries, across replicas and fallbacks
            # A field the provider lacks is a 400 naming it (litellm's UnsupportedParamsError), never dropped.
            "drop_params": False,
            **self.litellm_kwargs,
        }
        if self.api_key:
            kwargs["api_key"] = self.api_key
        if self.api_base:
            kwargs["api_base"] = self.api_base
        limit = request.output_limit()
        if limit is not None:
            kwargs["max_tokens"] = limit
        for field in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "user"):
            value = getattr(request, field)
            if value is not None:
                kwargs[field] = value
        if request.stop_list():
            kwargs["stop"] = request.stop_list()
        if request.n is not None and request.n > 1:  # n=1 is the default: a provider without n still serves it
            kwargs["n"] = request.n
        return kwargs

    def _chat_kwargs(self, request: ChatCompletionRequest) -> dict[str, Any]:
        kwargs = self._common(request)
        kwargs["messages"] = [_message(m) for m in request.messages]
        if request.response_format is not None and request.response_format.type != "text":
            # json_object and json_schema as OpenAI spells them; litellm maps them per provider.
            kwargs["response_format"] = request.response_format.model_dump(exclude_none=True)
        if request.tools:
            for i, tool in enumerate(request.tools):
                if tool.function.strict:  # litellm's translations (Anthropic's, ...) drop it: refused, not dropped
                    raise InvalidRequest(
                        f"strict function tools are not supported by backend {self.name!r} ({self.model})", param=f"tools.{i}.function.strict"
                    )
            # OpenAI's shapes; litellm maps them per provider (Anthropic's tool_choice "any",
            # disable_parallel_tool_use). Without tools, tool_choice "auto" or "none" (the only
            # ones valid then) and parallel_tool_calls mean nothing, and some providers refuse them.
            kwargs["tools"] = [tool.model_dump(exclude_none=True) for tool in request.tools]
            if request.tool_choice is not None:
                choice = request.tool_choice
                kwargs["tool_choice"] = choice if isinstance(choice, str) else choice.model_dump()
            if request.parallel_tool_calls is not None:
                kwargs["parallel_tool_calls"] = request.parallel_tool_calls
        return kwargs

    @staticmethod
    def _stream_kwargs(request: ChatCompletionRequest | CompletionRequest, kwargs: dict[str, Any]) -> dict[str, Any]:
        """`kwargs` for a streamed call: usage in the last chunk when the client (or the gateway,
        which settles token limits with it) asked for it."""
        kwargs = {**kwargs, "stream": True}
        if request.wants_usage_chunk():
            kwargs["stream_options"] = {"include_usage": True}
        return kwargs

    def _completion_kwargs(self, request: CompletionRequest) -> dict[str, Any]:
        kwargs = self._common(request)
        kwargs["prompt"] = request.single_prompt()
        return kwargs

    async def _call(self, fn: str, kwargs: dict[str, Any]) -> Any:
        deadline = asyncio.get_running_loop().time() + self.total_timeout_s
        self._in_flight += 1
        try:
            result = await _before(deadline, getattr(_lib(), fn)(**kwargs))
            self._unreachable = False
            return result
        except Exception as exc:
            raise self._error(exc) from exc
        finally:
            self._in_flight -= 1

    async def _stream(self, fn: str, kwargs: dict[str, Any], convert: Callable[[Any], T | None]) -> AsyncIterator[T]:
        """Yield converted chunks: the first within first_token_timeout_s, all within
        total_timeout_s. Closing early closes litellm's stream and so the provider's response."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        total_deadline = start + self.total_timeout_s
        first_deadline = min(start + self.first_token_timeout_s, total_deadline)
        self._in_flight += 1
        stream: Any = None
        try:
            try:
                stream = await _before(first_deadline, self._open_stream(fn, kwargs))
                self._unreachable = False
            except Exception as exc:
                raise self._error(exc, "first token") from exc
            chunks = stream.__aiter__()
            got_first = False
            while True:
                try:
                    raw = await _before(total_deadline if got_first else first_deadline, anext(chunks))
                except StopAsyncIteration:
                    return
                except Exception as exc:
                    raise self._error(exc, "total" if got_first else "first token") from exc
                item = convert(raw)
                if item is not None:
                    got_first = True
                    yield item
        finally:
            self._in_flight -= 1
            await _close_all([stream] if stream is not None else [])

    async def _open_stream(self, fn: str, kwargs: dict[str, Any]) -> Any:
        """litellm's stream for `kwargs`; for n > 1, n one-choice streams merged into one
        (`_MergedStreams`), the provider taking n or the same 400 as a non-streamed call."""
        call = getattr(_lib(), fn)
        n = kwargs.get("n", 1)
        if n == 1:
            return await call(**kwargs)
        model, provider, *_ = _lib().get_llm_provider(
            self.model, custom_llm_provider=self.litellm_kwargs.get("custom_llm_provider"), api_base=self.api_base
        )
        if "n" not in (_lib().get_supported_openai_params(model=model, custom_llm_provider=provider) or []):
            raise InvalidRequest(f"backend {self.name!r}: {provider} does not support parameters: ['n'], for model={model}", param="n")
        one = {key: value for key, value in kwargs.items() if key != "n"}
        # One seed would sample n identical choices: choice i is sampled with seed + i.
        calls = [asyncio.ensure_future(call(**{**one, **({"seed": one["seed"] + i} if "seed" in one else {})})) for i in range(n)]
        try:
            return _MergedStreams(list(await asyncio.gather(*calls)))
        except BaseException:
            for pending in calls:
                pending.cancel()
            opened = await asyncio.gather(*calls, return_exceptions=True)
            await _close_all([s for s in opened if not isinstance(s, BaseException)])
            raise

    def _error(self, exc: BaseException, phase: str = "total") -> BackendError:
        """Map a litellm exception (or one of our deadlines) to our errors.

        litellm wraps transport failures in its own classes (a refused connection arrives as
        an InternalServerError), so the cause chain is searched for httpx's exceptions and
        for the provider's own HTTP status (Anthropic's 529 "overloaded" becomes a 500).
        """
        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, TimeoutError):
            return RemoteFailure(f"provider {self.name!r} timed out ({phase})", failure="timeout")
        ex = _lib().exceptions
        chain = _causes(exc)
        upstream_status = next((c.response.status_code for c in chain if isinstance(c, httpx.HTTPStatusError)), None)
        status = upstream_status or getattr(exc, "status_code", None)
        message = _provider_message(str(getattr(exc, "message", "") or exc))
        if isinstance(exc, ex.UnsupportedParamsError):  # raised before anything is sent
            text = str(getattr(exc, "message", "") or exc).removeprefix("litellm.UnsupportedParamsError: ").split(". To drop", 1)[0]
            named = _UNSUPPORTED.search(text)
            return InvalidRequest(f"backend {self.name!r}: {text}", param=named.group(1) if named else None)
        if isinstance(exc, ex.ContextWindowExceededError):
            return ContextLengthExceeded(message, param="messages")
        if isinstance(exc, ex.APIConnectionError) or any(isinstance(c, (httpx.ConnectError, httpx.ConnectTimeout)) for c in chain):
            self._unreachable = True
            return RemoteFailure(f"could not reach provider {self.name!r}", failure="connect")
        if isinstance(exc, ex.Timeout) or any(isinstance(c, httpx.TimeoutException) for c in chain):
            return RemoteFailure(f"provider {self.name!r} timed out ({phase})", failure="timeout")
        # litellm's classes say what its providers' statuses meant, where no status came along.
        if isinstance(exc, (ex.RateLimitError, ex.ServiceUnavailableError)) and status not in OVERLOADED_STATUSES:
            status = 503
        elif isinstance(exc, (ex.AuthenticationError, ex.PermissionDeniedError)) and status not in (401, 403):
            status = 401
        if not isinstance(status, int) or status < 400:
            return RemoteFailure(f"provider {self.name!r} failed: {message}", failure="server")
        if status in OVERLOADED_STATUSES:
            message = f"provider {self.name!r} is throttling requests: {message}"
        return error_for_status(f"provider {self.name!r}", status, message, retry_after=_retry_after_of(exc))


class _MergedStreams:
    """n litellm streams of one choice each, as one stream of n choices: stream i's chunks
    come as choice i, as they arrive, under the first chunk's id; their usage is summed into
    one last chunk (the prompt was sent, and billed, n times). Closing it closes them all."""

    def __init__(self, streams: list[Any]) -> None:
        self._streams = streams
        self._iterators = [stream.__aiter__() for stream in streams]
        self._pending: dict[asyncio.Future[Any], int] = {}
        self._ready: deque[Any] = deque()
        self._usage: dict[int, Any] = {}
        self._id: str | None = None
        for index in range(len(streams)):
            self._pull(index)

    def _pull(self, index: int) -> None:
        self._pending[asyncio.ensure_future(anext(self._iterators[index]))] = index

    def __aiter__(self) -> _MergedStreams:
        return self

    async def __anext__(self) -> Any:
        while not self._ready:
            if not self._pending:
                if not self._usage:
                    raise StopAsyncIteration
                totals = {key: sum(int(_get(u, key, 0) or 0) for u in self._usage.values()) for key in ("prompt_tokens", "completion_tokens")}
                self._usage = {}
                return {"id": self._id, "choices": [], "usage": {**totals, "total_tokens": sum(totals.values())}}
            done, _ = await asyncio.wait(self._pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=self._pending.__getitem__):
                index = self._pending.pop(task)
                try:
                    raw = task.result()
                except StopAsyncIteration:
                    continue
                self._pull(index)
                self._take(raw, index)
        return self._ready.popleft()

    def _take(self, raw: Any, index: int) -> None:
        """Queue stream `index`'s chunk as choice `index`, keeping its usage for the sum."""
        self._id = self._id or _get(raw, "id")
        _set(raw, "id", self._id)
        usage = _get(raw, "usage")
        if usage is not None:
            self._usage[index] = usage
            _set(raw, "usage", None)
        choices = _get(raw, "choices") or []
        for choice in choices:
            _set(choice, "index", index)
        if choices:
            self._ready.append(raw)

    async def aclose(self) -> None:
        for task in self._pending:
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        self._pending = {}
        await _close_all(self._streams)


async def _close_all(streams: list[Any]) -> None:
    """Close litellm streams (and so their provider responses); a broken one may fail again."""
    for stream in streams:
        close = getattr(stream, "aclose", None)
        if close is not None:
            try:
                await close()
            except Exception:  # nothing more to do with it
                pass


def _causes(exc: BaseException) -> list[BaseException]:
    """exc and its causes/contexts, nearest first (bounded: chains can be cyclic)."""
    out: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in out and len(out) < 16:
        out.append(current)
        current = current.__cause__ or current.__context__
    return out


def _provider_message(text: str) -> str:
    """The provider's own message out of litellm's "litellm.X: ProviderException - {json}"."""
    brace = text.find("{")
    if brace >= 0:
        try:
            body, _ = json.JSONDecoder().raw_decode(text[brace:])  # tolerates litellm's trailing advice
        except ValueError:
            body = None
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
    head, sep, rest = text.partition(" - ")
    return rest.strip() if sep and head.startswith("litellm.") else text


def _retry_after_of(exc: BaseException) -> float:
    """The provider's Retry-After (litellm keeps the provider's headers apart), default 1s."""
    headers = getattr(exc, "litellm_response_headers", None) or getattr(getattr(exc, "response", None), "headers", None) or {}
    try:
        return max(0.0, float(headers.get("retry-after", 1.0)))
    except (TypeError, ValueError):
        return 1.0
