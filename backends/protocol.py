"""The one contract: OpenAI wire types, the Backend protocol and its optional capabilities,
LoadReport, and the errors every layer raises (with the one builder of OpenAI's error body).

Everything that produces tokens (in-process runners, the paged engine, remote servers)
implements `Backend`; the gateway only ever talks to this module's types.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------


class _Request(BaseModel):
    # OpenAI ignores fields it does not know; strict so that "0.5" is not a float and
    # "yes" is not a bool (OpenAI rejects both).
    model_config = ConfigDict(extra="ignore", strict=True)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_unicode(text: str) -> str:
    """`text`, unless it holds a lone UTF-16 surrogate (JSON's `"\\ud800"`): such a string
    cannot be encoded as UTF-8, so no backend could take it (a tokenizer or an upstream's
    body would fail with a 500). ASCII, the common case, is an O(1) check."""
    if text.isascii():
        return text
    found = _SURROGATE.search(text)
    if found is not None:
        raise ValueError(f"must be valid Unicode text: it contains a lone surrogate (U+{ord(found.group()):04X})")
    return text


# Every request string that reaches a backend (text, names, ids, stops) is Text.
Text = Annotated[str, AfterValidator(_valid_unicode)]
TokenId = Annotated[int, Field(ge=0)]  # ids past the vocabulary are the engine's to reject


def find_surrogate(value: Any, path: tuple[str | int, ...] = ()) -> str | None:
    """Where in a parsed JSON value (dicts, lists, strings) a lone surrogate is, as a dotted
    path (`tools.0.function.name`), or None. For fields the models do not declare, which
    remote backends forward as sent; walked only once encoding them has failed."""
    if isinstance(value, str):
        return (".".join(map(str, path)) or "body") if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and _SURROGATE.search(key):
                return ".".join(map(str, (*path, key)))
            found = find_surrogate(item, (*path, key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = find_surrogate(item, (*path, index))
            if found is not None:
                return found
    return None


class TextContentPart(_Request):
    type: Literal["text"]
    text: Text


def _check_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema`, when it is a valid JSON Schema (draft 2020-12's metaschema); otherwise a
    ValueError naming the offending keyword and where it is."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(map(str, exc.path)) or "(root)"
        keyword = exc.path[-1] if exc.path else exc.validator
        raise ValueError(
            f"invalid JSON Schema: keyword {keyword!r} at {where}: {exc.message} (fails the metaschema's {exc.validator!r})"
        ) from None
    return schema


class FunctionCall(_Request):
    name: Text
    arguments: Text  # JSON text, as OpenAI sends it

    def parsed_arguments(self) -> dict[str, Any]:
        """The arguments as a JSON object (chat templates render them so); ValueError otherwise."""
        try:
            value = json.loads(self.arguments)
        except ValueError:
            raise ValueError("function.arguments must be a JSON object, as text") from None
        if not isinstance(value, dict):
            raise ValueError("function.arguments must be a JSON object, as text")
        return value


class ToolCall(_Request):
    """A call an assistant message made (the history a tool result refers back to)."""

    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall

    @field_validator("function")
    @classmethod
    def _object_arguments(cls, v: FunctionCall) -> FunctionCall:
        v.parsed_arguments()
        return v


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class FunctionDefinition(_Request):
    name: FunctionName
    description: Text | None = None
    # None: the function takes no arguments constraint (any JSON object).
    parameters: Annotated[dict[str, Any], AfterValidator(_check_json_schema)] | None = None
    strict: bool | None = None

    def parameters_schema(self) -> dict[str, Any]:
        """The arguments' JSON Schema (any object when the function declares none)."""
        return self.parameters if self.parameters is not None else {"type": "object"}


class ToolDefinition(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class _ChosenFunction(_Request):
    name: FunctionName


class NamedToolChoice(_Request):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`: that function, called once."""

    type: Literal["function"]
    function: _ChosenFunction


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Validated when missing too: only an assistant message may go without content.
    content: Text | list[TextContentPart] | None = Field(default=None, validate_default=True)
    name: Text | None = None
    # Tool calling's history: the calls an assistant made, and (role tool) which call a
    # result answers.
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Text | None = None

    @field_validator("content", mode="after")
    @classmethod
    def _content_required(cls, v: str | list[TextContentPart] | None, info: ValidationInfo) -> str | list[TextContentPart] | None:
        role = info.data.get("role")  # absent when the role itself was invalid
        if v is None and role is not None and role != "assistant":
            raise ValueError(f"content is required for {role} messages (only an assistant message may omit it or send null)")
        return v

    def text(self) -> str:
        """The message's content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False
    # vLLM's extension: usage so far on every chunk (the gateway asks for it where a route
    # may resume a stream elsewhere: it needs the prompt's token count before the end).
    continuous_usage_stats: bool = False


class JsonSchemaFormat(_Request):
    """`response_format.json_schema`, as OpenAI's Structured Outputs define it."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: Text | None = None
    # `schema` would shadow BaseModel.schema(): the field is `schema_`, "schema" on the wire.
    schema_: Annotated[dict[str, Any], AfterValidator(_check_json_schema)] = Field(alias="schema")
    strict: bool | None = None

    @model_serializer(mode="wrap")
    def _wire_names(self, handler: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        data = handler(self)
        if "schema_" in data:
            data["schema"] = data.pop("schema_")
        return data


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.json_schema is required when response_format.type is 'json_schema'")
        return self

    def schema_object(self) -> dict[str, Any] | None:
        """The JSON Schema output must follow, when type is json_schema."""
        return self.json_schema.schema_ if self.type == "json_schema" and self.json_schema is not None else None


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: float | int | str) -> float:
    """Ollama's keep_alive as seconds: a number of seconds or a duration ("30s", "5m",
    "1h", "1h30m"); negative keeps the model loaded for good (returned as -1), 0 unloads it
    as soon as its requests are done."""
    if isinstance(value, bool):
        raise ValueError("keep_alive must be a number of seconds or a duration such as '5m'")
    if isinstance(value, (int, float)):
        return -1.0 if value < 0 else float(value)
    text = value.strip()
    if text.lstrip("-").replace(".", "", 1).isdigit():
        return parse_keep_alive(float(text))
    negative = text.startswith("-")
    rest, total = text.lstrip("-"), 0.0
    while rest:
        number = ""
        while rest and (rest[0].isdigit() or rest[0] == "."):
            number, rest = number + rest[0], rest[1:]
        unit = next((u for u in ("ms", "s", "m", "h") if rest.startswith(u)), None)
        if not number or unit is None:
            raise ValueError(f"keep_alive {value!r} is not a duration (use seconds, or e.g. '30s', '5m', '1h')")
        total += float(number) * _DURATION_UNITS[unit]
        rest = rest[len(unit) :]
    if not text.lstrip("-"):
        raise ValueError("keep_alive must not be empty")
    return -1.0 if negative else total


MAX_CHOICES = 128  # OpenAI's bound on n
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
StopList = Text | Annotated[list[Text], Field(max_length=4)]


class _SamplingFields(_Request):
    """Fields shared by chat and text completions."""

    model: Text = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    stop: StopList | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: Text | None = None
    # vLLM / llama.cpp extensions that OpenAI-compatible servers accept.
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    ignore_eos: bool | None = None
    # Ollama's: how long a local model stays loaded after this request (local backends).
    keep_alive: float | Text | None = None

    @field_validator("keep_alive")
    @classmethod
    def _duration(cls, v: float | str | None) -> float | str | None:
        if v is not None:
            parse_keep_alive(v)
        return v

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not key.isdigit():  # token ids are >= 0
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        return v

    def stop_list(self) -> list[str]:
        """`stop` normalised to a list of non-empty strings."""
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in stops if s]

    def wants_usage_chunk(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def choices(self) -> int:
        """How many answers the request asks for (`n`)."""
        return self.n or 1


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's extensions: render the chat without the assistant's generation prompt, and
    # continue the final (assistant) message rather than start a new one. The gateway's
    # stream resume (gateway/resume.py) sends these to the backend that takes over.
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, v: list[ToolDefinition] | None) -> list[ToolDefinition] | None:
        names = [t.function.name for t in v or []]
        if len(set(names)) != len(names):
            raise ValueError("tools must have distinct function names")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _names_a_tool(cls, v: str | NamedToolChoice | None, info: ValidationInfo) -> str | NamedToolChoice | None:
        # tools is validated first (declared first); absent from info.data when it was invalid.
        names = [t.function.name for t in info.data.get("tools") or []]
        if (v == "required" or isinstance(v, NamedToolChoice)) and not names and "tools" in info.data:
            raise ValueError("tool_choice requires tools: no tools were given")
        if isinstance(v, NamedToolChoice) and names and v.function.name not in names:
            raise ValueError(f"tool_choice names function {v.function.name!r}, which is not among the tools ({', '.join(names)})")
        return v

    @model_validator(mode="after")
    def _continues_an_assistant(self) -> ChatCompletionRequest:
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
            if self.messages[-1].role != "assistant":
                raise ValueError("continue_final_message needs the last message to be the assistant's")
        return self

    def generation_prompt(self) -> bool:
        """Whether the rendered chat ends with the assistant's generation prompt (HF's
        add_generation_prompt: on unless turned off, and off when continuing)."""
        return self.add_generation_prompt is not False and not self.continue_final_message

    def output_limit(self) -> int | None:
        """max_completion_tokens wins over the deprecated max_tokens, as in OpenAI."""
        return self.max_completion_tokens or self.max_tokens

    def tools_in_use(self) -> list[ToolDefinition]:
        """The tools the model is offered: none when tool_choice is "none" (the model then
        neither sees them nor calls them)."""
        return [] if self.tool_choice == "none" else list(self.tools or [])


class CompletionRequest(_SamplingFields):
    prompt: Text | list[TokenId] | list[Text] | list[list[TokenId]]
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: Text | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ValueError("only one prompt per request is supported")
        if isinstance(p, list) and not p:
            raise ValueError("prompt must not be empty")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

    def single_prompt(self) -> str | list[int]:
        """The one prompt, as text or token ids."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            return p[0]  # type: ignore[return-value]
        return p  # type: ignore[return-value]

    def output_limit(self) -> int | None:
        return self.max_tokens


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's bound on the inputs of one request
_EmbeddingText = Annotated[str, Field(min_length=1), AfterValidator(_valid_unicode)]
_EmbeddingTokens = Annotated[list[TokenId], Field(min_length=1)]


class EmbeddingRequest(_Request):
    """`POST /v1/embeddings`: one input or a batch, as text or token ids. Nothing may be
    empty; the text batch comes before the token forms in the union so that an empty item of
    a text batch is reported by its index (`input.1`)."""

    model: Text = Field(min_length=1)
    input: (
        _EmbeddingText
        | Annotated[list[_EmbeddingText], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
        | _EmbeddingTokens
        | Annotated[list[_EmbeddingTokens], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: Text | None = None
    # Ollama's /api/embed: how long a local model stays loaded after this request.
    keep_alive: float | Text | None = None
    # Ollama's `truncate` (default true there): cut an input at the context window rather
    # than refuse it. OpenAI has no such field: over the window is a 400.
    truncate: bool | None = None

    @model_validator(mode="after")
    def _keep_alive(self) -> EmbeddingRequest:
        if self.keep_alive is not None:
            parse_keep_alive(self.keep_alive)
        return self

    def inputs(self) -> list[str | list[int]]:
        """The inputs, one per embedding: texts or token-id lists."""
        given = self.input
        if isinstance(given, str):
            return [given]
        if isinstance(given[0], (str, list)):
            return list(given)  # type: ignore[arg-type]
        return [given]  # type: ignore[list-item]

    def output_limit(self) -> int | None:
        """Embeddings generate nothing (rate limits count their input only)."""
        return 0

    def choices(self) -> int:
        return 1


# ---------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Response):
    content: list[TokenLogprob] | None = None


class ResponseFunctionCall(_Response):
    name: str
    arguments: str  # JSON text


class ResponseToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


FinishReason = Literal["stop", "length", "content_filter", "tool_calls"]


class ChatChoice(_Response):
    index: int = 0
    message: ResponseMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class ChatCompletion(_Response):
    id: str = Field(default_factory=lambda: _new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChunkFunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None


class ChunkToolCall(_Response):
    """A streamed call: the first delta of each carries id, type and function.name (with
    arguments ""), the next ones fragments of function.arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ChunkFunctionCall


class ChunkDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ChunkToolCall] | None = None


class ChunkChoice(_Response):
    index: int = 0
    delta: ChunkDelta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


@dataclass(slots=True)
class RawChunk:
    """A streamed chunk forwarded as the upstream's own JSON bytes (its `model` already
    rewritten to the id the client asked for), with only what the gateway must read of it:
    usage (limits, metrics), whether it has choices (a usage-only chunk the client did not
    ask for is dropped) and whether it carries text (time to first token). Remote backends
    yield these from `chat_stream_raw` / `completion_stream_raw`: parsing every chunk into
    models and serialising it again cost more than the rest of the gateway per chunk."""

    data: bytes
    usage: Usage | None = None
    has_choices: bool = True
    has_text: bool = False  # generated text or a tool call
    text: str = ""  # the generated text (a chat delta's content, a completion's text)


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(_Response):
    id: str = Field(default_factory=lambda: _new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "turnout"
    # turnout extensions, ignored by OpenAI clients.
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Embedding(_Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32s (encoding_format base64)


class EmbeddingUsage(_Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(_Response):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# ---------------------------------------------------------------------------
# Errors. Every failure a client can be told about is an APIError: its status and OpenAI's
# error fields travel with it, so one handler answers all of them and one function reads
# the status for logs and metrics.
# ---------------------------------------------------------------------------


def error_body(message: str, type: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body: `{"error": {"message", "type", "param", "code"}}` (the only builder)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class APIError(Exception):
    """An error with an HTTP status and OpenAI's error fields."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        """OpenAI's error body."""
        return error_body(self.message, self.type, param=self.param, code=self.code)

    def response_headers(self) -> dict[str, str]:
        """Headers the error response carries (Retry-After on 429s and 503s)."""
        return {}


class BackendError(APIError):
    """An error a backend raised. `failure` (connect | timeout | server | protocol), where
    set, says how the backend failed, for the retry and circuit policies."""

    failure: str | None = None


class InvalidRequest(BackendError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class ModelNotFound(BackendError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class Overloaded(BackendError):
    """The backend cannot take the request now; the client should retry later (503)."""

    status = 503
    type = "server_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def response_headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class UpstreamError(BackendError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    """A backend gave nothing back within one of the route's deadlines: a 502
    `upstream_error` (as every backend failure is), counted as a timeout by the retry and
    circuit policies."""

    failure = "timeout"


# ---------------------------------------------------------------------------
# Load reports and the Backend protocol
# ---------------------------------------------------------------------------

# The LoadReport fields carried as ORCA named metrics, by their header names.
_ORCA_FIELDS = {
    "kv_usage": float,
    "kv_free_blocks": int,
    "block_size": int,
    "running": int,
    "waiting": int,
    "max_running": int,
    "prefix_cache_hit_rate": float,
    "healthy": int,
}


@dataclass
class LoadReport:
    """A backend's load as routers see it. kv_* are 0 for backends without a paged cache."""

    kv_usage: float = 0.0
    kv_free_blocks: int = 0
    block_size: int = 0
    running: int = 0
    waiting: int = 0
    max_running: int = 1
    prefix_cache_hit_rate: float = 0.0
    healthy: bool = True
    timestamp: float = field(default_factory=time.time)

    def to_header(self) -> str:
        """Envoy ORCA text form for the `endpoint-load-metrics` response header."""
        # getattr, not asdict: asdict deep-copies every field, and this runs once a request.
        parts = [f"named_metrics.{name}={float(getattr(self, name)):g}" for name in _ORCA_FIELDS]
        return "TEXT " + ", ".join(parts)

    @classmethod
    def from_header(cls, header: str) -> LoadReport:
        """Parse `to_header`'s output (unknown metrics are ignored)."""
        body = header.removeprefix("TEXT").strip()
        kwargs: dict[str, Any] = {}
        for item in body.split(","):
            key, _, value = item.strip().partition("=")
            name = key.removeprefix("named_metrics.")
            if name in _ORCA_FIELDS and value:
                kwargs[name] = _ORCA_FIELDS[name](float(value))
        if "healthy" in kwargs:
            kwargs["healthy"] = bool(kwargs["healthy"])
        return cls(**kwargs)


@runtime_checkable
class Backend(Protocol):
    """What the gateway needs of anything that produces tokens."""

    name: str

    async def start(self) -> None:
        """Load models / open connections. Called once before the first request."""

    async def close(self) -> None:
        """Release everything; in-flight requests are cancelled."""

    def models(self) -> list[ModelCard]:
        """The models this backend serves, by the ids clients use."""

    def load(self) -> LoadReport:
        """A current load report (cheap; called per request by routers)."""

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion: ...

    def chat_stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]: ...

    async def completion(self, request: CompletionRequest) -> Completion: ...

    def completion_stream(self, request: CompletionRequest) -> AsyncIterator[Completion]: ...


# ---------------------------------------------------------------------------
# Optional capabilities. A backend declares one by having its methods; the gateway asks
# with isinstance (once, when it builds a policy's dispatcher), never by probing attributes.
# ---------------------------------------------------------------------------


@runtime_checkable
class Passthrough(Protocol):
    """A backend that forwards the client's own JSON body (`body`, the bytes as they came),
    so fields the gateway does not model reach the upstream intact; streams come back as the
    upstream's bytes (RawChunk). Remote OpenAI-compatible servers.

    A whole answer's start (the upstream's response headers) must come within
    `first_byte_timeout_s` (None: only the backend's own deadlines apply), else an
    UpstreamTimeout-like error with failure "timeout": the route's first-token deadline for
    a non-streamed call."""

    async def chat_raw(
        self, request: ChatCompletionRequest, body: bytes, *, first_byte_timeout_s: float | None = None
    ) -> ChatCompletion: ...

    async def completion_raw(
        self, request: CompletionRequest, body: bytes, *, first_byte_timeout_s: float | None = None
    ) -> Completion: ...

    def chat_stream_raw(self, request: ChatCompletionRequest, body: bytes) -> AsyncIterator[RawChunk]: ...

    def completion_stream_raw(self, request: CompletionRequest, body: bytes) -> AsyncIterator[RawChunk]: ...

    async def embeddings_raw(
        self, request: EmbeddingRequest, body: bytes, *, first_byte_timeout_s: float | None = None
    ) -> EmbeddingResponse: ...


@runtime_checkable
class Embeds(Protocol):
    """A backend that turns inputs into embedding vectors (`POST /v1/embeddings`): the local
    engines (pooling over the model's last hidden states) and remote servers (passthrough).
    The backend honours `encoding_format` and `dimensions`, or refuses them with a 400."""

    async def embeddings(self, request: EmbeddingRequest) -> EmbeddingResponse: ...


@runtime_checkable
class PushesLoad(Protocol):
    """A backend whose load reports ride on its responses (remote): the gateway sets
    `on_load_report` and is told of each. Other backends are asked with `load()`."""

    on_load_report: Callable[[LoadReport], None] | None


@runtime_checkable
class ReportsStats(Protocol):
    """A backend with engine counters of its own, under vLLM's metric names (local engines)."""

    def stats(self) -> dict[str, float]: ...
