"""What an upstream's HTTP status means to the gateway's client: the one policy both remote
kinds (`remote`, `litellm`) apply.

- 4xx: the client's own fault. It passes through with the upstream's status and OpenAI error
  fields, except:
- 401/403: the upstream refused *the gateway's* credentials. Passing that on would tell the
  client its key is wrong; it is a misconfigured backend, a 502.
- 429, 503 (and 529, Anthropic's "overloaded"): the upstream throttles or sheds the gateway,
  so the system, not the caller, is saturated. DESIGN.md keeps 429 for a caller over its own
  limit: a 503 with the upstream's Retry-After, retryable on another backend.
- anything else (5xx, no answer, a broken answer): a 502 `RemoteFailure` whose `failure`
  (connect | timeout | server | protocol) feeds the retry and circuit policies.
"""

from __future__ import annotations

import logging

from backends.protocol import InvalidRequest, Overloaded, UpstreamError

log = logging.getLogger("turnout.remote")

OVERLOADED_STATUSES = frozenset({429, 503, 529})

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class RemoteFailure(UpstreamError):
    """A 502: the upstream could not give an answer. `failure` is one of
    connect | timeout | server | protocol (see policies.retry.classify)."""

    def __init__(self, message: str, *, failure: str, upstream_status: int | None = None) -> None:
        super().__init__(message)
        self.failure = failure
        self.upstream_status = upstream_status


class UpstreamClientError(InvalidRequest):
    """An upstream 4xx passed through: the same status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, type: str | None, code: str | None, param: str | None) -> None:
        super().__init__(message, param=param, code=code)
        self.status = status
        self.type = type or _TYPE_BY_STATUS.get(status, "invalid_request_error")


class UpstreamOverloaded(Overloaded):
    """The upstream throttles or sheds the gateway: a 503 with its Retry-After."""


def error_for_status(
    upstream: str,
    status: int,
    message: str,
    *,
    type: str | None = None,
    code: str | None = None,
    param: str | None = None,
    retry_after: float = 1.0,
) -> InvalidRequest | Overloaded | RemoteFailure:
    """The error for an upstream answer with `status` >= 400 (`upstream`: how to name it)."""
    if status in OVERLOADED_STATUSES:
        return UpstreamOverloaded(message or f"{upstream} is overloaded", retry_after=retry_after)
    if status in (401, 403):
        log.error("%s refused the gateway's credentials (%s): %s", upstream, status, message)
        return RemoteFailure(f"{upstream} refused the gateway's credentials", failure="server", upstream_status=status)
    if 400 <= status < 500:
        return UpstreamClientError(status, message or f"upstream answered {status}", type=type, code=code, param=param)
    return RemoteFailure(
        f"{upstream} answered {status}" + (f": {message}" if message else ""), failure="server", upstream_status=status
    )
