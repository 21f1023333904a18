"""Ollama's native API, its wire types (github.com/ollama/ollama, docs/api.md): the request
bodies of /api/chat, /api/generate, /api/embed, /api/embeddings, /api/show and /api/pull,
and the records the gateway answers with.

A field Ollama defines that turnout cannot honour is refused here, by its validator, so
that gateway.body.parse_body answers it with a 400 naming the field (Ollama's own shape,
`{"error": ...}`, from the URL): never silently dropped. Fields Ollama does not define are
ignored, as Ollama's JSON decoding ignores them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from backends.protocol import FunctionDefinition, ResponseFormat, Text, parse_keep_alive

# -- requests ----------------------------------------------------------------------------------


class _In(BaseModel):
    # strict, as the contract's models: Go's decoder takes no "0.5" for a float either.
    model_config = ConfigDict(extra="ignore", strict=True)


def _refuse_if(value: Any, message: str) -> Any:
    """`value`, unless it is set (not None, False, empty or zero): then `message` as a 400."""
    if value:
        raise ValueError(message)
    return value


def _keep_alive(value: float | str | None) -> float | str | None:
    if value is not None:
        parse_keep_alive(value)
    return value


class Options(_In):
    """`options`: the runtime parameters turnout maps onto the contract's sampling fields.
    Any other option (num_ctx, mirostat, num_gpu, ...) is set by the backend's configuration,
    not per request: a 400 names it (Ollama would ignore it; turnout never drops a field)."""

    model_config = ConfigDict(extra="allow", strict=True)

    num_predict: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None  # the contract's bound
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @field_validator("num_predict")
    @classmethod
    def _predict(cls, v: int | None) -> int | None:
        if v == -2:
            raise ValueError("-2 (fill the context) is not supported: give a number of tokens, or -1 for no limit")
        if v is not None and v < -1:
            raise ValueError("must be -1 (no limit) or a number of tokens")
        return v

    @model_validator(mode="after")
    def _known_only(self) -> Options:
        for key, value in (self.model_extra or {}).items():
            if value is not None:
                raise ValueError(
                    f"option '{key}' is not supported per request by turnout (the backend's configuration sets it): leave it out"
                )
        return self


class EmbedOptions(_In):
    """`options` of /api/embed and /api/embeddings: none applies to embeddings here."""

    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="after")
    def _none(self) -> EmbedOptions:
        for key, value in (self.model_extra or {}).items():
            if value is not None:
                raise ValueError(f"option '{key}' is not supported for embeddings by turnout: leave it out")
        return self


class ToolCallFunction(_In):
    name: Text
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCall(_In):
    function: ToolCallFunction
    id: Text | None = None


class Message(_In):
    role: Literal["system", "user", "assistant", "tool"]
    content: Text | None = None
    images: list[str] | None = None
    thinking: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: Text | None = None

    @field_validator("images")
    @classmethod
    def _no_images(cls, v: list[str] | None) -> list[str] | None:
        return _refuse_if(v, "images are not supported by turnout: the models it serves take text only")

    @field_validator("thinking")
    @classmethod
    def _no_thinking(cls, v: str | None) -> str | None:
        return _refuse_if(v, "thinking is not supported by turnout: it serves no thinking models")


class Tool(_In):
    type: Literal["function"] = "function"
    function: FunctionDefinition


Format = Literal["", "json"] | dict[str, Any]


class _Generation(_In):
    """What /api/chat and /api/generate share."""

    model: Text = Field(min_length=1)
    format: Format | None = None
    options: Options | None = None
    stream: bool | None = None  # absent or null: streamed, as in Ollama
    keep_alive: float | Text | None = None
    think: bool | Text | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    truncate: bool | None = None
    shift: bool | None = None

    _keep = field_validator("keep_alive")(_keep_alive)

    @field_validator("format")
    @classmethod
    def _schema(cls, v: Format | None) -> Format | None:
        if isinstance(v, dict):
            try:
                ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"name": "format", "schema": v}})
            except ValidationError as exc:
                raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return v

    @field_validator("think")
    @classmethod
    def _no_think(cls, v: bool | str | None) -> bool | str | None:
        return _refuse_if(v, "think is not supported by turnout (it serves no thinking models): leave it out or set it to false")

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, v: Any) -> Any:
        return _refuse_if(v, "log probabilities are not supported on turnout's Ollama API (use /v1/chat/completions)")

    @field_validator("truncate", "shift")
    @classmethod
    def _no_truncation(cls, v: bool | None) -> bool | None:
        return _refuse_if(v, "turnout does not cut a prompt to fit the context (one over it is a 400): leave it out or set it to false")

    def streamed(self) -> bool:
        return self.stream is not False


class ChatRequest(_Generation):
    """`POST /api/chat`. No messages: only load (or, with keep_alive 0, unload) the model."""

    messages: list[Message] = Field(default_factory=list)
    tools: list[Tool] | None = None


class GenerateRequest(_Generation):
    """`POST /api/generate`. An empty prompt: only load (or unload) the model."""

    prompt: Text | None = None
    system: Text | None = None
    suffix: str | None = None
    template: str | None = None
    raw: bool | None = None
    images: list[str] | None = None
    context: list[int] | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        return _refuse_if(v, "suffix is not supported by turnout (no fill-in-the-middle)")

    @field_validator("template")
    @classmethod
    def _no_template(cls, v: str | None) -> str | None:
        return _refuse_if(v, "template is not supported by turnout: prompts use the model's own chat template (or send raw: true)")

    @field_validator("images")
    @classmethod
    def _no_images(cls, v: list[str] | None) -> list[str] | None:
        return _refuse_if(v, "images are not supported by turnout: the models it serves take text only")

    @field_validator("context")
    @classmethod
    def _no_context(cls, v: list[int] | None) -> list[int] | None:
        return _refuse_if(v, "context is not supported by turnout: send the conversation to /api/chat as messages")

    @field_validator("width", "height", "steps")
    @classmethod
    def _no_images_out(cls, v: int | None) -> int | None:
        return _refuse_if(v is not None, "image generation is not supported by turnout")

    @model_validator(mode="after")
    def _raw_alone(self) -> GenerateRequest:
        if self.raw and self.system:
            raise ValueError("system cannot be used with raw: true (a raw prompt is sent as is, with no template)")
        if self.raw and self.format:
            raise ValueError("format cannot be used with raw: true (a raw prompt is a text completion, which takes no format)")
        return self


class EmbedRequest(_In):
    """`POST /api/embed`."""

    model: Text = Field(min_length=1)
    input: Text | list[Text] = ""
    truncate: bool = True
    dimensions: int | None = Field(default=None, ge=1)
    keep_alive: float | Text | None = None
    options: EmbedOptions | None = None

    _keep = field_validator("keep_alive")(_keep_alive)


class EmbeddingsRequest(_In):
    """`POST /api/embeddings`, the legacy one-prompt form."""

    model: Text = Field(min_length=1)
    prompt: Text = ""
    keep_alive: float | Text | None = None
    options: EmbedOptions | None = None

    _keep = field_validator("keep_alive")(_keep_alive)


class _Named(_In):
    """A request naming a model as `model` or, as older clients do, `name`."""

    model: Text | None = None
    name: Text | None = None

    @model_validator(mode="after")
    def _one_name(self) -> _Named:
        if not (self.model or self.name):
            raise ValueError("model is required")
        return self

    def model_name(self) -> str:
        return self.model or self.name or ""


class ShowRequest(_Named):
    """`POST /api/show`."""

    verbose: bool = False


class PullRequest(_Named):
    """`POST /api/pull` (admin key only)."""

    insecure: bool | None = None
    stream: bool | None = None

    @field_validator("insecure")
    @classmethod
    def _secure(cls, v: bool | None) -> bool | None:
        return _refuse_if(v, "insecure is not supported: turnout pulls over HTTPS only")


# -- answers -----------------------------------------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def line(self) -> bytes:
        """One NDJSON record (or a whole JSON answer): the JSON, null fields left out."""
        return self.model_dump_json(exclude_none=True).encode() + b"\n"


class OutFunction(_Out):
    name: str
    arguments: dict[str, Any]


class OutToolCall(_Out):
    function: OutFunction


class OutMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str = ""
    tool_calls: list[OutToolCall] | None = None


class Metrics(_Out):
    """The final record's counts and durations (nanoseconds)."""

    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class ChatRecord(Metrics):
    model: str
    created_at: str
    message: OutMessage
    done: bool
    done_reason: str | None = None


class GenerateRecord(Metrics):
    model: str
    created_at: str
    response: str
    done: bool
    done_reason: str | None = None


class EmbedAnswer(_Out):
    model: str
    embeddings: list[list[float]]
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None


class EmbeddingAnswer(_Out):
    embedding: list[float]


class ErrorRecord(_Out):
    error: str


class Details(_Out):
    parent_model: str = ""
    format: str = ""
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


class TagModel(_Out):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: Details


class Tags(_Out):
    models: list[TagModel]


class RunningModel(_Out):
    name: str
    model: str
    size: int
    digest: str
    details: Details
    expires_at: str | None = None
    size_vram: int = 0
    context_length: int | None = None


class Running(_Out):
    models: list[RunningModel]


class ShowAnswer(_Out):
    modelfile: str
    parameters: str
    template: str
    details: Details
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str
    license: str | None = None


class Progress(_Out):
    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


class Version(_Out):
    version: str
