"""`kind: litellm`: providers that do not speak OpenAI's API (Anthropic, Bedrock, Vertex, ...)
through litellm, mapped to this project's wire types and errors.

litellm is imported lazily (it is slow to import and optional); its responses are
converted field by field into our models rather than validated wholesale, so provider
extras litellm adds cannot break a response. Errors follow the one upstream status policy
(backends/remote/upstream_errors.py), applied to the provider's status.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import httpx

from backends.protocol import (
    BackendError,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ContextLengthExceeded,
    InvalidRequest,
    LoadReport,
    ModelCard,
    ResponseMessage,
    Usage,
)
from backends.remote.openai_http import _before
from backends.remote.upstream_errors import OVERLOADED_STATUSES, RemoteFailure, error_for_status

T = TypeVar("T")

_FINISH = {"stop": "stop", "length": "length", "content_filter": "content_filter", "tool_calls": "tool_calls", "function_call": "tool_calls"}
_litellm: Any = None
# Request fields this backend neither passes to litellm nor reads back from its answers.
_UNFORWARDED = ("top_k", "min_p", "repetition_penalty", "ignore_eos", "logit_bias", "logprobs", "top_logprobs", "echo")


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


def _finish(reason: Any) -> str | None:
    return _FINISH.get(reason) if reason else None


def _usage(raw: Any) -> Usage | None:
    if raw is None:
        return None
    prompt, completion = int(_get(raw, "prompt_tokens", 0) or 0), int(_get(raw, "completion_tokens", 0) or 0)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


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
                message=ResponseMessage(content=_get(_get(c, "message"), "content")),
                finish_reason=_finish(_get(c, "finish_reason")),  # type: ignore[arg-type]
            )
            for i, c in enumerate(_get(raw, "choices") or [])
        ]
        return ChatCompletion(
            id=_get(raw, "id") or f"chatcmpl-{uuid.uuid4().hex[:24]}",
            created=int(_get(raw, "created") or time.time()),
            model=request.model,
            choices=choices,
            usage=_usage(_get(raw, "usage")),
        )

    def chat_stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        kwargs = {**self._chat_kwargs(request), "stream": True}
        if request.wants_usage_chunk():
            kwargs["stream_options"] = {"include_usage": True}

        def convert(raw: Any) -> ChatCompletionChunk | None:
            choices = []
            for i, c in enumerate(_get(raw, "choices") or []):
                delta = _get(c, "delta")
                role, content = _get(delta, "role"), _get(delta, "content")
                choices.append(
                    ChunkChoice(
                        index=int(_get(c, "index", i) or 0),
                        delta=ChunkDelta(role="assistant" if role == "assistant" else None, content=content),
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
                CompletionChoice(index=i, text=_get(c, "text") or "", finish_reason=_finish(_get(c, "finish_reason")))  # type: ignore[arg-type]
                for i, c in enumerate(_get(raw, "choices") or [])
            ],
            usage=_usage(_get(raw, "usage")),
        )

    def completion_stream(self, request: CompletionRequest) -> AsyncIterator[Completion]:
        kwargs = {**self._completion_kwargs(request), "stream": True}

        def convert(raw: Any) -> Completion | None:
            choices = [
                CompletionChoice(
                    index=i,
                    # Text streams carry `text`; litellm's chat-backed ones may carry a delta.
                    text=_get(c, "text") or _get(_get(c, "delta"), "content") or "",
                    finish_reason=_finish(_get(c, "finish_reason")),  # type: ignore[arg-type]
                )
                for i, c in enumerate(_get(raw, "choices") or [])
            ]
            if not choices:
                return None
            return Completion(
                id=_get(raw, "id") or "cmpl-litellm", created=int(_get(raw, "created") or time.time()), model=request.model, choices=choices
            )

        return self._stream("atext_completion", kwargs, convert)

    # -- internals -----------------------------------------------------------------------------

    def _common(self, request: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
        if request.keep_alive is not None:  # no provider keeps a model loaded on request
            raise InvalidRequest(f"keep_alive applies to local models; backend {self.name!r} ({self.model}) cannot honour it", param="keep_alive")
        for param in _UNFORWARDED:  # what this backend does not pass on or read back: refused, never dropped
            if getattr(request, param, None) not in (None, False):
                raise InvalidRequest(f"{param} is not supported by backend {self.name!r} ({self.model})", param=param)
        if isinstance(request, ChatCompletionRequest) and (tool_param := request.tool_calling_param()) is not None:
            raise InvalidRequest(f"tool calling is not supported by backend {self.name!r} yet", param=tool_param)
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
        return kwargs

    def _chat_kwargs(self, request: ChatCompletionRequest) -> dict[str, Any]:
        kwargs = self._common(request)
        # Providers know system, user and assistant; developer is OpenAI's new name for system.
        kwargs["messages"] = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
            for m in request.messages
        ]
        if request.response_format is not None and request.response_format.type != "text":
            # json_object and json_schema as OpenAI spells them; litellm maps them per provider.
            kwargs["response_format"] = request.response_format.model_dump(exclude_none=True)
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
                stream = await _before(first_deadline, getattr(_lib(), fn)(**kwargs))
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
            close = getattr(stream, "aclose", None)
            if close is not None:
                try:
                    await close()
                except Exception:  # closing a broken stream may fail again; nothing to do
                    pass

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
            text = str(getattr(exc, "message", "") or exc).removeprefix("litellm.UnsupportedParamsError: ")
            return InvalidRequest(f"backend {self.name!r}: {text.split('. To drop', 1)[0]}")
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
