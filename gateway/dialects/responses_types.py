"""OpenAI's Responses API as pydantic models (the shapes of the `openai` package's
`types/responses`): the request of `POST /v1/responses` and the Response object with its
output items. Only what turnout serves is modelled in full; the rest of the request is
declared so that gateway.dialects.responses_translate can refuse it by name.

Nested request models allow extra fields and the translation refuses each by its path
(`input.0.content.1.prompt_cache_breakpoint`): a field the API defines but turnout does not
honour is a 400 that names it, never dropped.

Union members carry tags with a dash (`item-message`): gateway.errors leaves such parts out
of a validation error's param, so an error reads `input.2.content`, not
`input.2.item-message.content`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from backends.protocol import FunctionName, Text


def new_id(prefix: str) -> str:
    """An id in the Responses API's style: `resp_...`, `msg_...`, `fc_...`, `call_...`."""
    return f"{prefix}_{uuid.uuid4().hex}"


class _In(BaseModel):
    # strict: "0.5" is not a float, "yes" not a bool (OpenAI rejects both); extra fields are
    # kept so the translation can refuse them by name.
    model_config = ConfigDict(extra="allow", strict=True)


def _tag_by_type(known: tuple[str, ...], prefix: str, default: str | None = None) -> Any:
    """A discriminator choosing a union member by the value's `type` (`default` when it has
    none): `<prefix>-<type>` for the known types, `<prefix>-other` for any other type, and
    the first member for a value that is not an object (whose error then says so)."""

    def tag(value: Any) -> str:
        if not isinstance(value, dict):
            return f"{prefix}-{known[0]}"
        kind = value.get("type", default)
        return f"{prefix}-{kind}" if kind in known else f"{prefix}-other"

    return Discriminator(tag)


# -- content ------------------------------------------------------------------------------------


class InputText(_In):
    type: Literal["input_text"]
    text: Text


class OutputTextPart(_In):
    """An assistant message's text sent back as history (an earlier response's output)."""

    type: Literal["output_text"]
    text: Text
    annotations: list[Any] | None = None  # history: the model's own, nothing to act on
    logprobs: list[Any] | None = None


class OtherPart(_In):
    """Any other content part (input_image, input_file, input_audio, refusal): refused."""

    type: Any = None


ContentPart = Annotated[
    Annotated[InputText, Tag("part-input_text")] | Annotated[OutputTextPart, Tag("part-output_text")] | Annotated[OtherPart, Tag("part-other")],
    _tag_by_type(("input_text", "output_text"), "part"),
]


# -- input items --------------------------------------------------------------------------------


class MessageItem(_In):
    """A message: `{role, content}` (EasyInputMessage), `type: "message"` optional."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Text | list[ContentPart]
    # An earlier output message sent back as history carries these: nothing to act on.
    id: Text | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None


class FunctionCallItem(_In):
    """A call the model made in an earlier turn (the history a function_call_output answers)."""

    type: Literal["function_call"]
    call_id: Text = Field(min_length=1)
    name: FunctionName
    arguments: Text
    id: Text | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, v: str) -> str:
        try:
            value = json.loads(v)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise ValueError("arguments must be a JSON object, as text")
        return v


class FunctionCallOutputItem(_In):
    """The result of a function call, by its call_id."""

    type: Literal["function_call_output"]
    call_id: Text = Field(min_length=1)
    output: Text | list[ContentPart]
    id: Text | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class OtherItem(_In):
    """Any other input item (reasoning, item_reference, computer_call, ...): refused."""

    type: Any = None


InputItem = Annotated[
    Annotated[MessageItem, Tag("item-message")]
    | Annotated[FunctionCallItem, Tag("item-function_call")]
    | Annotated[FunctionCallOutputItem, Tag("item-function_call_output")]
    | Annotated[OtherItem, Tag("item-other")],
    _tag_by_type(("message", "function_call", "function_call_output"), "item", default="message"),
]


# -- tools and formats --------------------------------------------------------------------------


class FunctionTool(_In):
    """A function tool, in the Responses shape (flat: no `function` wrapper)."""

    type: Literal["function"]
    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class OtherTool(_In):
    """A built-in tool (web_search, file_search, computer_use, mcp, ...): refused."""

    type: Any = None


Tool = Annotated[
    Annotated[FunctionTool, Tag("tool-function")] | Annotated[OtherTool, Tag("tool-other")],
    _tag_by_type(("function",), "tool"),
]


class FunctionChoice(_In):
    type: Literal["function"]
    name: FunctionName


class OtherChoice(_In):
    """tool_choice of a kind turnout does not serve (allowed_tools, a built-in tool, mcp)."""

    type: Any = None


ToolChoice = (
    Literal["auto", "none", "required"]
    | Annotated[
        Annotated[FunctionChoice, Tag("choice-function")] | Annotated[OtherChoice, Tag("choice-other")],
        _tag_by_type(("function",), "choice"),
    ]
)


class TextFormat(_In):
    """`text.format`: text, json_object, or json_schema with name, schema, strict."""

    type: Literal["text", "json_object", "json_schema"]
    name: Text | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: Text | None = None
    strict: bool | None = None


class TextConfig(_In):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class StreamOptions(_In):
    include_obfuscation: bool | None = None


Metadata = Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]], Field(max_length=16)]


class ResponsesRequest(_In):
    """`POST /v1/responses`. The fields after `user` are the API's that turnout does not
    serve; each is refused by name when set (gateway.dialects.responses_translate)."""

    model: Text = Field(min_length=1)
    input: Text | list[InputItem]
    instructions: Text | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: Text | None = None
    safety_identifier: Text | None = None  # an end user's id, as `user`
    prompt_cache_key: Text | None = None  # a hint; the engines' prefix caches need no key
    metadata: Metadata | None = None
    store: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    service_tier: Text | None = None
    # Not served (refused when set):
    previous_response_id: Any = None
    conversation: Any = None
    include: Any = None
    reasoning: Any = None
    background: Any = None
    top_logprobs: Any = None
    max_tool_calls: Any = None
    prompt: Any = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None
    context_management: Any = None
    moderation: Any = None
    image: Any = None
    access_programs: Any = None
    background_options: Any = None


# -- the Response object ------------------------------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class OutputText(_Out):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(_Out):
    type: Literal["message"] = "message"
    id: str = Field(default_factory=lambda: new_id("msg"))
    status: ItemStatus = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = Field(default_factory=list)


class FunctionCallOutput(_Out):
    """A function call the model made (`function_call`)."""

    type: Literal["function_call"] = "function_call"
    id: str = Field(default_factory=lambda: new_id("fc"))
    call_id: str
    name: str
    arguments: str
    status: ItemStatus = "completed"


OutputItem = OutputMessage | FunctionCallOutput


class InputTokensDetails(_Out):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(_Out):
    reasoning_tokens: int = 0


class ResponseUsage(_Out):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(_Out):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseError(_Out):
    code: str
    message: str


Status = Literal["in_progress", "completed", "incomplete", "failed"]


class ResponseObject(_Out):
    """The Response: its status and output, usage, and the request's settings echoed."""

    id: str = Field(default_factory=lambda: new_id("resp"))
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Status = "in_progress"
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    # The request's settings, echoed.
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str = "default"
    truncation: Literal["auto", "disabled"] = "disabled"
    store: bool = False
    background: bool = False
    previous_response_id: None = None
    reasoning: dict[str, Any] = Field(default_factory=lambda: {"effort": None, "summary": None})
