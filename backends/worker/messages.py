"""The worker pipe's messages. Its clients (the serving process that owns the worker, and any
HTTP processes sharing it) send `Hello`, `Submit`, `Abort` and (the owner) `Shutdown`; the
worker answers each client with batches (one ZeroMQ message holds every output ready at once:
under load, one send per engine step rather than one per token).

msgspec, as vLLM v1 uses between its API server and EngineCore: typed structs, msgpack
encoding, no pickle, and decoding that checks types."""

from __future__ import annotations

import json

import msgspec

from backends.generation import GenerationDelta
from backends.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, EmbeddingRequest, TextContentPart


class WorkerSpec(msgspec.Struct, frozen=True):
    """What a worker process builds: one local backend."""

    kind: str  # "llamacpp" | "paged"
    name: str
    model: str
    model_id: str
    options: dict[str, object] = {}
    task: str = "generate"  # "embed": an embedding model, serving embeddings only


class Message(msgspec.Struct, tag=True, tag_field="op", array_like=True):
    """Tagged by class name (the first element of each: messages travel as arrays, which
    encode and decode faster than maps), so one list may hold any mix of messages."""


# -- gateway -> worker --------------------------------------------------------------------------


class Hello(Message):
    """An HTTP process sharing the worker (`turnout serve --workers N`) names itself and the
    address it receives on; from then on the worker sends it its requests' outputs and load
    reports. (The owner, the process that started the worker, gave its address at spawn.)"""

    client: str
    pid: int
    address: str


class Submit(Message):
    request_id: str
    kind: str  # "chat" | "completions" | "embeddings"
    body: bytes  # the request's JSON, as validated by the gateway
    client: str = ""  # who gets the outputs: a Hello's client, or "" for the owner


class Abort(Message):
    request_id: str


class Shutdown(Message):
    pass


ToWorker = Hello | Submit | Abort | Shutdown


# -- worker -> gateway --------------------------------------------------------------------------


class Ready(Message):
    """The model is loaded and requests may come."""

    pid: int
    context_window: int
    detail: str = ""  # e.g. the llama.cpp CPU variant in use


class LoadFailed(Message):
    """The model could not be loaded; the worker exits after sending this."""

    message: str


class Started(Message):
    """A request was rendered, tokenized and accepted by the engine."""

    request_id: str
    prompt_tokens: int
    prompt_text: str = ""  # text completions' prompt, for `echo`
    tool_format: str = ""  # the format tool calls are parsed from (backends.tools.formats), when tools were offered


class Delta(Message):
    request_id: str
    delta: GenerationDelta


class StepDeltas(Message):
    """One engine step's deltas for one client, as two parallel lists (a direct engine's
    thread sends one a step): cheaper to build and encode on the host-bound engine thread
    than a `Delta` per sequence, and the HTTP process fans them out."""

    request_ids: list[str]
    deltas: list[GenerationDelta]


class Embedded(Message):
    """An embeddings request's answer, whole: each input's finished vector (normalised, cut
    to `dimensions`) as little-endian float32 bytes, in input order."""

    request_id: str
    vectors: list[bytes]
    prompt_tokens: int


class Failed(Message):
    """A request ended with an error (an OpenAI error's fields)."""

    request_id: str
    status: int
    type: str
    message: str
    code: str | None = None
    param: str | None = None
    retry_after: float | None = None


class Load(Message):
    """The worker's load (LoadReport's fields), engine counters, and its memory."""

    kv_usage: float
    kv_free_blocks: int
    block_size: int
    running: int
    waiting: int
    max_running: int
    prefix_cache_hit_rate: float
    healthy: bool
    rss_bytes: int
    stats: dict[str, float] = {}


FromWorker = Ready | LoadFailed | Started | Delta | StepDeltas | Embedded | Failed | Load

to_worker_encoder = msgspec.msgpack.Encoder()
to_worker_decoder = msgspec.msgpack.Decoder(list[ToWorker])
from_worker_encoder = msgspec.msgpack.Encoder()
from_worker_decoder = msgspec.msgpack.Decoder(list[FromWorker])


# -- a Submit's body ------------------------------------------------------------------------------


def decode_embedding_request(body: bytes) -> EmbeddingRequest:
    """An embeddings Submit's request, validated as the gateway validated it."""
    return EmbeddingRequest.model_validate_json(body)


def decode_request(kind: str, body: bytes) -> ChatCompletionRequest | CompletionRequest:
    """A Submit's request, validated as the gateway validated it (json.loads, then the model).
    A long chat is validated one message (and a long content list one part) at a time: one
    pydantic call holds the GIL throughout, so run in a thread, this lets the worker's loop
    in between (deltas of other requests, aborts), where one call for 100,000 messages held
    it for 0.2 s."""
    if kind != "chat":
        return CompletionRequest.model_validate_json(body)
    data = json.loads(body)  # C, GIL held: 33 ms for 3.7 MB
    messages = data.get("messages") if isinstance(data, dict) else None
    if isinstance(messages, list):
        many = len(messages) > _PIECEWISE_ITEMS
        data["messages"] = [_message(item) if many or _long_content(item) else item for item in messages]
    return ChatCompletionRequest.model_validate(data)


_PIECEWISE_ITEMS = 64  # lists longer than this are validated item by item


def _long_content(item: object) -> bool:
    return isinstance(item, dict) and isinstance(item.get("content"), list) and len(item["content"]) > _PIECEWISE_ITEMS


def _message(item: object) -> ChatMessage:
    if _long_content(item):
        assert isinstance(item, dict)
        item = {**item, "content": [TextContentPart.model_validate(part) for part in item["content"]]}
    return ChatMessage.model_validate(item)
