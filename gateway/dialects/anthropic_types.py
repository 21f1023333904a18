"""Anthropic's Messages API as pydantic models: the request of `POST /v1/messages` and
`POST /v1/messages/count_tokens`, and the Message answered (docs.anthropic.com, "Messages").

The request models forbid unknown fields (Anthropic's "Extra inputs are not permitted"). Fields
and content blocks that Anthropic defines but this server cannot serve are accepted by the
models only to be refused by name (`refused_fields`, `_Refused`): a 400 that says what, never
a silent drop. Validation errors are worded the Anthropic way by `validation_message`.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from backends.protocol import Text

# Block types Anthropic defines that this server cannot serve (no images, documents, citations
# sources, thinking or server-side tools behind the contract).
UNSUPPORTED_BLOCKS = frozenset(
    {
        "image", "document", "search_result", "thinking", "redacted_thinking", "server_tool_use",
        "web_search_tool_result", "web_fetch_tool_result", "code_execution_tool_result",
        "bash_code_execution_tool_result", "text_editor_code_execution_tool_result",
        "tool_search_tool_result", "mcp_tool_use", "mcp_tool_result", "container_upload",
        "tool_reference", "compaction",
    }
)  # fmt: skip
SERVED_BLOCKS = ("text", "tool_use", "tool_result")

# Top-level request fields Anthropic defines that have no counterpart behind the contract,
# each with why (the 400's wording). A field is refused only when it asks for something:
# null, and the values that ask for nothing beyond what is served, pass (see `refused_fields`).
UNSERVED_FIELDS = {
    "thinking": "extended thinking is not supported by this server",
    "container": "containers (code execution) are not supported by this server",
    "mcp_servers": "MCP servers are not supported by this server",
    "context_management": "context management is not supported by this server",
    "diagnostics": "diagnostics are not supported by this server",
    "inference_geo": "choosing an inference region is not supported by this server",
    "user_profile_id": "user profiles are not supported by this server",
    "workspace_id": "workspaces are not supported by this server",
}


class _Strict(BaseModel):
    # Anthropic rejects fields it does not define; strict types, as the contract's.
    model_config = ConfigDict(extra="forbid", strict=True)


class CacheControl(_Strict):
    """A prompt-caching breakpoint: a hint with no effect on the answer. Accepted; the paged
    engine caches prompt prefixes on its own, and usage reports no cache tokens."""

    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(_Strict):
    type: Literal["text"]
    text: Text
    cache_control: CacheControl | None = None
    citations: list[Any] | None = None

    @field_validator("citations")
    @classmethod
    def _no_citations(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise ValueError("citations are not supported by this server")
        return v


class ToolUseBlock(_Strict):
    """A call the assistant made, in the history."""

    type: Literal["tool_use"]
    id: Text = Field(min_length=1)
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    input: dict[str, Any]
    cache_control: CacheControl | None = None
    caller: dict[str, Any] | None = None  # Anthropic echoes who called; only direct calls exist here

    @field_validator("caller")
    @classmethod
    def _direct(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v.get("type") != "direct":
            raise ValueError("only direct tool calls are supported by this server")
        return v


def _content_tag(value: Any) -> str:
    return "str" if isinstance(value, str) else "list"


def _result_block_tag(value: Any) -> str:
    return "block:text" if isinstance(value, dict) and value.get("type") == "text" else "block:refused"


class ToolResultBlock(_Strict):
    """A tool's result, in a user turn: text only."""

    type: Literal["tool_result"]
    tool_use_id: Text = Field(min_length=1)
    content: (
        Annotated[
            Annotated[Text, Tag("str")]
            | Annotated[
                list[Annotated[Annotated[TextBlock, Tag("block:text")] | Annotated[_Refused, Tag("block:refused")], Discriminator(_result_block_tag)]],
                Tag("list"),
            ],
            Discriminator(_content_tag),
        ]
        | None
    ) = None
    is_error: bool | None = None
    cache_control: CacheControl | None = None

    def text(self) -> str:
        """The result as one string (text blocks joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(block.text for block in self.content)  # type: ignore[union-attr]


class _Refused(BaseModel):
    """What a content block that is none of the served ones validates as: never, with the
    reason (a type Anthropic defines that is not served, or one it does not define)."""

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError("Input should be an object (a content block)")
        kind = value.get("type")
        if kind is None:
            raise ValueError("a content block needs a type")
        if kind in UNSUPPORTED_BLOCKS:
            raise ValueError(f"content blocks of type {kind!r} are not supported by this server")
        if kind in SERVED_BLOCKS:  # in a tool result, where only text is
            raise ValueError(f"content blocks of type {kind!r} cannot appear in a tool_result's content")
        expected = ", ".join(repr(b) for b in SERVED_BLOCKS)
        raise ValueError(f"Input tag {kind!r} found using 'type' does not match any of the expected tags: {expected}")


ToolResultBlock.model_rebuild()


def _block_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else None
    return f"block:{kind}" if kind in SERVED_BLOCKS else "block:refused"


Block = Annotated[
    Annotated[TextBlock, Tag("block:text")]
    | Annotated[ToolUseBlock, Tag("block:tool_use")]
    | Annotated[ToolResultBlock, Tag("block:tool_result")]
    | Annotated[_Refused, Tag("block:refused")],
    Discriminator(_block_tag),
]
Content = Annotated[Annotated[Text, Tag("str")] | Annotated[list[Block], Tag("list")], Discriminator(_content_tag)]


class InputMessage(_Strict):
    role: Literal["user", "assistant"]
    content: Content

    @model_validator(mode="after")
    def _blocks_in_their_turn(self) -> InputMessage:
        for i, block in enumerate(self.blocks()):
            if isinstance(block, ToolUseBlock) and self.role != "assistant":
                raise ValueError(f"tool_use blocks may only appear in assistant messages (content.{i})")
            if isinstance(block, ToolResultBlock) and self.role != "user":
                raise ValueError(f"tool_result blocks may only appear in user messages (content.{i})")
        return self

    def blocks(self) -> list[TextBlock | ToolUseBlock | ToolResultBlock]:
        """The content as blocks (a string is one text block)."""
        if isinstance(self.content, str):
            return [TextBlock(type="text", text=self.content)]
        return list(self.content)  # type: ignore[arg-type]


class Tool(_Strict):
    """A client tool. Server tools (`web_search_...`, `bash_...`) are refused by their type."""

    type: Literal["custom"] | None = None
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: Text | None = None
    input_schema: dict[str, Any]
    strict: bool | None = None
    cache_control: CacheControl | None = None
    eager_input_streaming: bool | None = None  # tool input is streamed as generated either way
    defer_loading: bool | None = None
    input_examples: list[dict[str, Any]] | None = None
    allowed_callers: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _client_tools_only(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") not in (None, "custom"):
            raise ValueError(f"server tools (type {value['type']!r}) are not supported by this server; only client tools (type 'custom')")
        return value

    @field_validator("input_schema")
    @classmethod
    def _object_schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        if v.get("type") != "object":
            raise ValueError("the schema's type must be 'object'")
        return v

    @field_validator("defer_loading")
    @classmethod
    def _loaded(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("deferred tool loading (tool search) is not supported by this server")
        return v

    @field_validator("input_examples")
    @classmethod
    def _no_examples(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if v:
            raise ValueError("tool input examples are not supported by this server")
        return v

    @field_validator("allowed_callers")
    @classmethod
    def _direct_callers(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and set(v) - {"direct"}:
            raise ValueError("only direct callers are supported by this server")
        return v


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _name_for_tool(self) -> ToolChoice:
        if self.type == "tool" and self.name is None:
            raise ValueError("name is required when type is 'tool'")
        if self.type != "tool" and self.name is not None:
            raise ValueError(f"name is only for type 'tool', not {self.type!r}")
        if self.type == "none" and self.disable_parallel_tool_use is not None:
            raise ValueError("disable_parallel_tool_use is not for type 'none'")
        return self


class Metadata(_Strict):
    user_id: Text | None = None


class OutputFormat(_Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Strict):
    format: OutputFormat | None = None
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None

    @field_validator("effort")
    @classmethod
    def _no_effort(cls, v: str | None) -> str | None:
        if v is not None:
            raise ValueError("choosing an effort level is not supported by this server")
        return v


SystemPrompt = Annotated[Annotated[Text, Tag("str")] | Annotated[list[TextBlock], Tag("list")], Discriminator(_content_tag)]


class Prompt(_Strict):
    """What both routes take: the conversation, its system prompt and tools."""

    model: Text = Field(min_length=1)
    messages: list[InputMessage] = Field(min_length=1)
    system: SystemPrompt | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    output_config: OutputConfig | None = None
    # Defined by Anthropic, not served: validated by `refused_fields` (any JSON is taken here).
    thinking: Any = None
    container: Any = None
    mcp_servers: Any = None
    context_management: Any = None
    diagnostics: Any = None
    inference_geo: Any = None
    user_profile_id: Any = None
    workspace_id: Any = None
    cache_control: CacheControl | None = None

    def refused_fields(self) -> list[tuple[str, str]]:
        """(field, why) for every field set that asks for what this server cannot serve.
        `thinking: {"type": "disabled"}` asks for nothing, so it passes."""
        refused = []
        for name, why in UNSERVED_FIELDS.items():
            value = getattr(self, name)
            if value is None or value == [] or (name == "thinking" and isinstance(value, dict) and value == {"type": "disabled"}):
                continue
            refused.append((name, why))
        return refused

    def system_text(self) -> list[TextBlock]:
        """The system prompt as text blocks (none when absent or empty)."""
        if self.system is None:
            return []
        if isinstance(self.system, str):
            return [TextBlock(type="text", text=self.system)] if self.system else []
        return list(self.system)


class MessagesRequest(Prompt):
    """`POST /v1/messages`."""

    max_tokens: int = Field(ge=0)
    stop_sequences: list[Text] | None = None
    stream: bool | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None  # there is only the standard tier: both are served
    speed: Literal["standard", "fast"] | None = None

    def refused_fields(self) -> list[tuple[str, str]]:
        refused = super().refused_fields()
        if self.speed == "fast":
            refused.append(("speed", "fast mode is not supported by this server"))
        if self.max_tokens == 0:
            refused.append(("max_tokens", "0 (pre-warming the prompt cache) is not supported by this server; ask for at least 1"))
        return refused


class CountTokensRequest(Prompt):
    """`POST /v1/messages/count_tokens`: the prompt of a Messages request, without its
    sampling fields."""


# -- answers --------------------------------------------------------------------------------------

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "refusal"]


def new_id(prefix: str) -> str:
    """An id the Anthropic way: `msg_...`, `toolu_...`."""
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    service_tier: Literal["standard"] = "standard"


class TextOut(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ToolUseOut(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class Message(BaseModel):
    """Anthropic's answer."""

    id: str = Field(default_factory=lambda: new_id("msg"))
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[TextOut | ToolUseOut]
    model: str
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: Usage


class TokenCount(BaseModel):
    input_tokens: int
