"""Structured access logs: one JSON object a line per finished request.

Never a key's secret; prompts only when the config sets `server.log_prompts`. `client_ip`
is the peer, or the client a trusted proxy names (`server.trusted_proxies`), never what an
arbitrary caller's X-Forwarded-For claims.
"""

from __future__ import annotations

import json
import logging
import time

from gateway.outcome import RequestOutcome

log = logging.getLogger("turnout.access")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def access_record(outcome: RequestOutcome, *, log_prompts: bool = False) -> dict[str, object]:
    """The JSON fields of one access-log line."""
    record: dict[str, object] = {
        "ts": round(time.time(), 3),
        "request_id": outcome.request_id,
        "trace_id": outcome.trace_id,
        "client_ip": outcome.client_ip,
        "key": outcome.key_name,
        "tenant": outcome.tenant,
        "route": outcome.route,
        "model": outcome.model,
        "backend": outcome.backend,
        "experiment": outcome.experiment,
        "variant": outcome.variant,
        "stream": outcome.stream,
        "status": outcome.status,
        "error": outcome.error_code,
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "ttft_ms": _ms(outcome.ttft_s),
        "tpot_ms": _ms(outcome.tpot_s),
        "e2e_ms": _ms(outcome.e2e_s),
        "resumed_from": outcome.resumed_from or None,
    }
    if log_prompts and outcome.prompt is not None:
        record["prompt"] = outcome.prompt
    return record


def write_access_log(outcome: RequestOutcome, *, log_prompts: bool = False) -> None:
    """Log one line (cheap when the `turnout.access` logger is disabled)."""
    if log.isEnabledFor(logging.INFO):
        log.info(json.dumps(access_record(outcome, log_prompts=log_prompts), separators=(",", ":")))
