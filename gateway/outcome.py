"""What one request did: filled in along the request path, handed to every sink at the end
(Prometheus, the access log, the experiment sample log)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class RequestOutcome:
    """One request's facts. Timings are seconds; None where they do not apply."""

    request_id: str
    route: str  # "chat" | "completions"
    model: str  # the alias the client asked for
    stream: bool = False
    key_name: str | None = None  # never the secret
    tenant: str | None = None
    backend: str | None = None
    variant: str | None = None
    experiment: str | None = None
    status: int = 200
    error_code: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    ended_at: float | None = None
    # The client's address as RequestContextMiddleware decided it (`state["client_ip"]`): the
    # socket peer, or what a trusted proxy's X-Forwarded-For names (gateway.client_address).
    client_ip: str | None = None
    trace_id: str | None = None
    prompt: str | None = None  # only when the config says prompts may be logged
    resumed_from: list[str] = field(default_factory=list)  # backends a stream failed on and left (gateway.resume)

    def first_token(self) -> None:
        """Mark the first generated token (once)."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def finish(self, status: int | None = None) -> None:
        if status is not None:
            self.status = status
        self.ended_at = time.perf_counter()

    @property
    def e2e_s(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (decode speed as the client sees it)."""
        if self.first_token_at is None or self.ended_at is None or self.completion_tokens < 2:
            return None
        return (self.ended_at - self.first_token_at) / (self.completion_tokens - 1)
