"""What crosses between the HTTP processes of `turnout serve --workers N` and the engine host,
the one process that supervises the local models they share (gateway/engine_host.py).

The host is told everything it needs with each `Open` (the backend's definition, the memory
budget), so it keeps no config of its own and a restarted host picks up where the HTTP
processes are. Requests' tokens never pass through it: an `Opened` names the worker's address
and each HTTP process talks to the worker directly (backends/worker/pipe.py)."""

from __future__ import annotations

import msgspec

from backends.worker.messages import Hello, Message, WorkerSpec


class LocalModel(msgspec.Struct, frozen=True):
    """A local backend's definition: what the host builds its WorkerBackend from."""

    spec: WorkerSpec
    keep_alive_s: float
    preload: bool = False
    context_window: int | None = None
    max_running: int = 1
    block_size: int = 0
    model_path: str | None = None


# -- HTTP process -> host -----------------------------------------------------------------------


class Open(Message):
    """Load the model if it is not loaded; with `hold`, count a request on it until its `End`
    (keep_alive starts counting only when no request holds the model)."""

    call: int
    client: str
    model: LocalModel
    hold: bool
    budget_bytes: int | None = None


class End(Message):
    """A held request ended; the request's own keep_alive, when it gave one, applies."""

    lease: int
    keep_alive: float | None = None


class Unload(Message):
    call: int
    client: str
    name: str


# -- host -> HTTP process -----------------------------------------------------------------------


class Opened(Message):
    call: int
    lease: int  # 0 when not held
    pid: int  # the worker's
    address: str  # the worker's inbox
    context_window: int


class Refused(Message):
    """An Open or Unload that failed, as the OpenAI error the request answers."""

    call: int
    status: int
    type: str
    message: str
    code: str | None = None
    retry_after: float | None = None


class Done(Message):
    call: int


class Resident(msgspec.Struct, frozen=True):
    """A local model as the host sees it (what `turnout ps` shows)."""

    name: str
    state: str
    pid: int | None
    address: str
    memory_bytes: int
    expires_at: float | None
    in_flight: int
    restarts: int
    last_exit: str | None
    load_error: str | None
    context_window: int | None


class Residents(Message):
    """Sent to every client twice a second and whenever a model's state changes."""

    host_pid: int
    residents: list[Resident]


class Exited(Message):
    """A worker process ended: its requests in every HTTP process end with WorkerDied."""

    name: str
    pid: int
    reason: str


ToHost = Hello | Open | End | Unload
FromHost = Opened | Refused | Done | Residents | Exited

to_host_encoder = msgspec.msgpack.Encoder()
to_host_decoder = msgspec.msgpack.Decoder(ToHost)
from_host_encoder = msgspec.msgpack.Encoder()
from_host_decoder = msgspec.msgpack.Decoder(FromHost)
