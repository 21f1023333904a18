"""The worker pipe's messages. The gateway sends `Submit`, `Abort` and `Shutdown`; the worker
answers with batches (one ZeroMQ message holds every output ready at once: under load, one
send per engine step rather than one per token).

msgspec, as vLLM v1 uses between its API server and EngineCore: typed structs, msgpack
encoding, no pickle, and decoding that checks types."""

from __future__ import annotations

import msgspec

from backends.generation import GenerationDelta


class WorkerSpec(msgspec.Struct, frozen=True):
    """What a worker process builds: one local backend."""

    kind: str  # "llamacpp" | "paged"
    name: str
    model: str
    model_id: str
    options: dict[str, object] = {}


class _Message(msgspec.Struct, tag=True, tag_field="op"):
    """Tagged by class name, so one list may hold any mix of messages."""


# -- gateway -> worker --------------------------------------------------------------------------


class Submit(_Message):
    request_id: str
    kind: str  # "chat" | "completions"
    body: bytes  # the request's JSON, as validated by the gateway


class Abort(_Message):
    request_id: str


class Shutdown(_Message):
    pass


ToWorker = Submit | Abort | Shutdown


# -- worker -> gateway --------------------------------------------------------------------------


class Ready(_Message):
    """The model is loaded and requests may come."""

    pid: int
    context_window: int
    detail: str = ""  # e.g. the llama.cpp CPU variant in use


class LoadFailed(_Message):
    """The model could not be loaded; the worker exits after sending this."""

    message: str


class Started(_Message):
    """A request was rendered, tokenized and accepted by the engine."""

    request_id: str
    prompt_tokens: int
    prompt_text: str = ""  # text completions' prompt, for `echo`


class Delta(_Message):
    request_id: str
    delta: GenerationDelta


class Failed(_Message):
    """A request ended with an error (an OpenAI error's fields)."""

    request_id: str
    status: int
    type: str
    message: str
    code: str | None = None
    param: str | None = None
    retry_after: float | None = None


class Load(_Message):
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


FromWorker = Ready | LoadFailed | Started | Delta | Failed | Load

to_worker_encoder = msgspec.msgpack.Encoder()
to_worker_decoder = msgspec.msgpack.Decoder(list[ToWorker])
from_worker_encoder = msgspec.msgpack.Encoder()
from_worker_decoder = msgspec.msgpack.Decoder(list[FromWorker])
